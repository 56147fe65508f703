"""Activation-aware weight scaling (Lin et al., "AWQ", 2023), from the math.

A linear y = x Wᵀ is unchanged by y = (x / s) (W · diag(s))ᵀ for any per-input-channel s > 0.
Quantizing W · diag(s) instead of W moves rounding error between input channels: a column
scaled up by s keeps relatively more precision, and its error reaches y divided by s again. The
channels worth protecting are those whose activations are large, so AWQ takes

    s = mean|x|^α,   normalised by sqrt(max(s) · min(s)) so that W · diag(s) and x / s stay in
                     range (done in log space, which is the same thing and cannot underflow),

and picks α in [0, 1] by grid search, minimising the output error on calibration rows X summed
over the linears that read X (Q/K/V, gate/up: siblings share one s, since x / s is then
computed once):

    Σᵢ ‖X Wᵢᵀ − (X / s) Q(Wᵢ · diag(s))ᵀ‖².

α = 0 is s = 1, plain round-to-nearest, so the result is never worse than RTN on those rows.
The module stores 1 / s as `input_scale` (in the model's dtype); the search uses that rounded
value, so the error it measures is the error of the module it builds. Everything runs in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnopt.quantization.modules import quantize_weight

ALPHAS = tuple(i / 20 for i in range(21))
MAX_ROWS = 512  # calibration rows kept per input for the loss: enough to rank α, cheap to search


class InputStats:
    """Streaming statistics of one linear input X: mean |x| per input channel over every row
    seen, and a uniform random sample of at most `max_rows` rows (each row draws a random
    priority; the highest `max_rows` priorities so far are kept). With `hessian`, also
    H = Σ xᵀx over every row (fp32, [K, K]), what GPTQ weighs rounding errors by."""

    def __init__(self, max_rows: int = MAX_ROWS, seed: int = 0, hessian: bool = False):
        self.max_rows = max_rows
        self.abs_sum: Tensor | None = None
        self.hessian: Tensor | None = None
        self._keep_hessian = hessian
        self.count = 0
        self.rows: Tensor | None = None
        self._priority: Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        abs_sum = x.abs().sum(0)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        if self._keep_hessian:
            xtx = x.T @ x
            self.hessian = xtx if self.hessian is None else self.hessian + xtx
        self.count += x.shape[0]
        priority = torch.rand(x.shape[0], generator=self._generator).to(x.device)
        if self.rows is None:
            self.rows, self._priority = x[:0], priority[:0]
        # cat copies: the rows kept never alias an activation the model may later change.
        rows, priority = torch.cat((self.rows, x)), torch.cat((self._priority, priority))
        if rows.shape[0] > self.max_rows:
            keep = priority.topk(self.max_rows).indices
            rows, priority = rows[keep], priority[keep]
        self.rows, self._priority = rows, priority

    @property
    def mean_abs(self) -> Tensor:
        if self.abs_sum is None:
            raise ValueError("InputStats has seen no rows: run calibration inputs through it")
        return self.abs_sum / self.count


@dataclass(frozen=True)
class AWQResult:
    """The search's outcome for one group of linears reading the same input."""

    input_scale: Tensor | None  # [K] = 1 / s in the model's dtype; None when α = 0 (RTN) won
    alpha: float
    rtn_errors: list[float]  # per linear: ‖ΔY‖ / ‖Y‖ on the calibration rows with plain RTN
    awq_errors: list[float]  # ... with the chosen scale


def channel_scale(mean_abs: Tensor, alpha: float) -> Tensor:
    """s = mean|x|^α / sqrt(max · min), computed as exp(α (log m − (log max + log min) / 2)).
    Channels that never fire are floored at 1e-4 of the largest mean, so s stays finite."""
    m = mean_abs.float()
    log_m = m.clamp_min(m.max().clamp_min(torch.finfo(torch.float32).tiny) * 1e-4).log()
    return (alpha * (log_m - (log_m.max() + log_m.min()) / 2)).exp()


def search_scale(weights: Sequence[Tensor], stats: InputStats, group_size: int,
                 dtype: torch.dtype, alphas: Sequence[float] = ALPHAS) -> AWQResult:
    """Grid-search α for linears `weights` ([Nᵢ, K] each) that all read the input `stats`
    describes; `dtype` is what the module will store (scales, input_scale)."""
    if stats.rows is None:
        raise ValueError("search_scale needs calibration rows: InputStats has seen none")
    rows = stats.rows
    targets = [rows @ w.detach().float().T for w in weights]

    def squared_errors(input_scale: Tensor | None) -> list[float]:
        x_in = rows if input_scale is None else rows * input_scale.float()
        return [(y - x_in @ quantize_weight(w, group_size, input_scale, dtype)
                 .dequantize(torch.float32).T).square().sum().item()
                for w, y in zip(weights, targets, strict=True)]

    baseline = squared_errors(None)
    best_alpha, best_scale, best_errors = 0.0, None, baseline
    for alpha in alphas:
        if alpha == 0:
            continue  # s = 1: the baseline
        input_scale = (1 / channel_scale(stats.mean_abs, alpha)).to(dtype)
        errors = squared_errors(input_scale)
        if sum(errors) < sum(best_errors):
            best_alpha, best_scale, best_errors = alpha, input_scale, errors
    norms = [y.square().sum().item() for y in targets]
    relative = lambda errors: [(e / max(n, 1e-30)) ** 0.5
                               for e, n in zip(errors, norms, strict=True)]
    return AWQResult(best_scale, best_alpha, relative(baseline), relative(best_errors))
