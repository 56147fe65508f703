"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022), from the paper's math.

A linear y = x Wᵀ reads calibration rows X [R, K]. Changing its weight by ΔW changes the outputs
by ‖X ΔWᵀ‖² = Σₙ ΔWₙ H ΔWₙᵀ, H = XᵀX: every output row n is weighed by the same H. GPTQ rounds
W one column at a time and, after rounding column j, moves the not yet rounded columns so as to
cancel as much of that column's error as H allows (the optimal-brain-surgeon update):

    δ = (W[:, j] − Q[:, j]) / U[j, j],       W[:, j+1:] −= δ ⊗ U[j, j+1:]

with U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU); its rows are the inverse Hessians of the
remaining columns that the one-column-at-a-time elimination needs, all from one factorisation.

- Damping: H + λ·mean(diag H)·I (λ = `damp`, 0.1) keeps H positive definite with few rows.
  An input that never fired (H[j, j] = 0) gets H[j, j] = 1: its column is rounded to nearest
  and exchanges no error with the others.
- Groups: each group's scale and zero point are those `int4.scale_and_zero` gives (what RTN
  would store), computed from the columns as updated when the group's first column is reached.
- Act-order (`act_order`): columns in order of decreasing H[j, j], the inputs with the largest
  energy first, while they can still be compensated. The packed layout needs every group
  contiguous in K, so here groups keep their columns and their scale and zero are fixed up
  front from the original W ("static groups"); only the rounding order changes.
- Lazy batches: columns are processed in blocks of 128; the error of a block reaches the
  columns after it in one matrix product (the same arithmetic, as BLAS-3).

Everything runs in fp32 on the weight's device. The result is an ordinary `PackedInt4`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnopt.backends import int4

DAMP = 0.1  # measured on MiniLM: 0.01 fits the few calibration rows too closely
BLOCK = 128


def quantize_gptq(w: Tensor, hessian: Tensor, group_size: int, dtype: torch.dtype, *,
                  act_order: bool = False, damp: float = DAMP,
                  input_scale: Tensor | None = None) -> int4.PackedInt4:
    """GPTQ of `w [N, K]` given H = XᵀX `[K, K]` of its inputs. With `input_scale` (AWQ's,
    [K]) the layer computes (x · input_scale) Ŵᵀ, so Ŵ approximates W / input_scale under
    the Hessian of x · input_scale: diag(input_scale) H diag(input_scale)."""
    n, k = w.shape
    kp = int4.padded(k, group_size)
    wf = w.detach().float().clone()
    h = hessian.detach().float().clone()
    if input_scale is not None:
        s = input_scale.detach().float()
        wf, h = wf / s, h * s[:, None] * s[None, :]
    # Padding columns are inputs that never fire: zero weights, rounded to the zero point.
    wf = torch.nn.functional.pad(wf, (0, kp - k))
    h = torch.nn.functional.pad(h, (0, kp - k, 0, kp - k))
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())

    groups = kp // group_size
    scales = torch.empty(n, groups, dtype=dtype, device=wf.device)
    zeros = torch.empty(n, groups, device=wf.device)
    if act_order:
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
        scales[:], zeros[:] = int4.scale_and_zero(wf.view(n, groups, group_size), dtype)
    else:
        order = torch.arange(kp, device=wf.device)
    wf, h = wf[:, order], h[order][:, order]
    u = _inverse_cholesky(h)
    group_of = order // group_size  # the group of each column, in processing order
    codes = torch.empty(n, kp, device=wf.device)

    for start in range(0, kp, BLOCK):
        end = min(start + BLOCK, kp)
        block = wf[:, start:end].clone()
        errors = torch.empty_like(block)
        for i in range(end - start):
            j = start + i
            g = int(group_of[j])
            if not act_order and j % group_size == 0:  # a group never spans two blocks
                scales[:, g], zeros[:, g] = int4.scale_and_zero(block[:, i:i + group_size],
                                                                dtype)
            s, z = scales[:, g].float(), zeros[:, g]
            q = (block[:, i] / s + z).round().clamp(0, 15)
            codes[:, j] = q
            error = (block[:, i] - (q - z) * s) / u[j, j]
            block[:, i:] -= error[:, None] * u[j, j:end][None, :]
            errors[:, i] = error
        wf[:, end:] -= errors @ u[start:end, end:]

    natural = torch.empty_like(codes).index_copy_(1, order, codes)
    return int4.PackedInt4(int4.pack_uint4(natural), scales, zeros.to(dtype), group_size, k)


def _inverse_cholesky(h: Tensor) -> Tensor:
    """U upper triangular with UᵀU = H⁻¹. Should damping not be enough (H singular to fp32),
    it is raised tenfold until the factorisation succeeds."""
    extra = 0.0
    for _ in range(6):
        try:
            factor = torch.linalg.cholesky(h + extra * torch.eye(len(h), device=h.device))
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            extra = max(extra * 10, 1e-2 * h.diagonal().mean().item())
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with strong "
                     "damping; calibrate on more (or more varied) inputs")
