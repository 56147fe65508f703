"""Plain-PyTorch implementations of every attnopt op: the ground truth the kernels are tested
against, and the CPU path where ATen already has a fast kernel for each step.

Each function states the op's semantics exactly; the docstrings of `attnopt.backends.ops` point
here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in fp32; fp32 and fp64 in their own precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax(
    x: Tensor,
    dim: int,
    scale: float = 1.0,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    fill: float = float("-inf"),
    keep_mask: bool = False,
    safe: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """softmax(where(mask, fill, x * scale + bias), dim), computed in fp32 (fp64 for fp64 input).

    - `bias` is additive and broadcasts to `x`.
    - `mask` is boolean and broadcasts to `x`: positions where it is True take `fill`
      (`masked_fill` semantics); with `keep_mask=True` the mask marks positions to *keep* and
      the others take `fill` (`where(mask, scores, fill)`, the SDPA convention).
    - `safe=True` gives 0 for rows whose scores are all -inf (`aten._safe_softmax`); otherwise
      such rows are NaN, exactly as `torch.softmax` gives them.
    - The result has dtype `dtype` (default: `x.dtype`) and is contiguous.
    """
    s = x.to(compute_dtype(x.dtype))
    if scale != 1.0:
        s = s * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask if keep_mask else mask, fill)
    y = torch.softmax(s, dim)
    if safe:
        y = y.masked_fill((s == float("-inf")).all(dim, keepdim=True), 0.0)
    return y.to(dtype or x.dtype).contiguous()


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreMods:
    """The variants of attention's scores beyond q·kᵀ·scale + mask, each off by default. They
    compose in this order, in the compute precision (fp32; fp64 for fp64 q), each step
    rounded as the models that write them round it:

        s = q·kᵀ·scale
        s = softcap · tanh(s / softcap)                   softcap > 0 (Gemma 2)
        s = s + biases[0] + biases[1] + ...                additive, one add each, in order;
                                                           each broadcasts to [B, Hq, Lq, Lk]
        s = s + alibi_slopes[h] · (j - p_i)                in-kernel ALiBi, [Hq] slopes
        s = s + mask, or key j dropped where mask is False (the op's own `mask`)
        key j dropped unless p_i - window_left <= j <= p_i + window_right   (-1: unbounded)
        key j dropped if j > p_i                           (`is_causal`)
        out = Σ_j e^{s_j} v_j / (Σ_j e^{s_j} + e^{sinks[h]})   a per-head sink logit: a term
                                                           of the denominator with no value

    p_i = i + Lk - Lq is query i's position among the keys (bottom-right, as `is_causal`), so
    ALiBi and the window follow the last query to the last key in decode and chunked
    prefill. A dropped key is -inf: a NaN score there is ignored. Rows that keep no key give 0
    (with or without a sink)."""

    softcap: float = 0.0
    biases: tuple[Tensor, ...] = ()
    alibi_slopes: Tensor | None = None
    window_left: int = -1
    window_right: int = -1
    sinks: Tensor | None = None

    @classmethod
    def of(cls, softcap: float = 0.0, biases: Sequence[Tensor] | None = None,
           alibi_slopes: Tensor | None = None, window_left: int = -1, window_right: int = -1,
           sinks: Tensor | None = None) -> ScoreMods:
        """From the ops' flat arguments."""
        return cls(float(softcap), tuple(biases or ()), alibi_slopes, int(window_left),
                   int(window_right), sinks)

    @property
    def windowed(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def plain(self) -> bool:
        """No variant at all: the attention of q·kᵀ·scale + mask alone."""
        return not (self.softcap or self.biases or self.alibi_slopes is not None
                    or self.windowed or self.sinks is not None)

    def check(self, q: Tensor, lk: object) -> None:
        """The data-free checks (shapes, dtypes, ranges) against q [B, Hq, Lq, D] and Lk keys;
        every path runs them, the fake implementations too."""
        b, hq, lq, _ = q.shape
        if not (self.softcap >= 0 and math.isfinite(self.softcap)):
            raise ValueError(f"softcap must be 0 (off) or a positive number, got {self.softcap}")
        if self.window_left < -1 or self.window_right < -1:
            raise ValueError(f"window_left and window_right must be -1 (unbounded) or >= 0, got "
                             f"{self.window_left} and {self.window_right}")
        scores = (b, hq, lq, lk)
        for i, bias in enumerate(self.biases):
            trailing = zip(bias.shape[::-1], scores[::-1], strict=False)
            if not bias.dtype.is_floating_point or bias.dim() > 4 or any(
                    n != 1 and n != w for n, w in trailing):
                raise ValueError(f"biases[{i}] must be a floating tensor broadcasting to the "
                                 f"scores [B, Hq, Lq, Lk] = {list(scores)}, got {bias.dtype} "
                                 f"{tuple(bias.shape)}")
        for name in ("alibi_slopes", "sinks"):
            t = getattr(self, name)
            if t is not None and (t.shape != (hq,) or not t.dtype.is_floating_point):
                raise ValueError(f"{name} must be a floating [Hq={hq}] tensor, one value per "
                                 f"query head, got {t.dtype} {tuple(t.shape)}")


PLAIN = ScoreMods()


def key_band(rel: Tensor, is_causal: bool, mods: ScoreMods) -> Tensor | None:
    """Which keys the window and the causal flag keep, from rel = j - p_i (any broadcast
    shape): p_i - window_left <= j <= p_i + window_right, and j <= p_i when causal; None
    when neither applies."""
    keep = None
    right = 0 if is_causal else mods.window_right
    if is_causal and mods.window_right >= 0:
        right = min(right, mods.window_right)
    if right >= 0:
        keep = rel <= right
    if mods.window_left >= 0:
        left = rel >= -mods.window_left
        keep = left if keep is None else keep & left
    return keep


def relative_positions(lq: int, lk: int, device: torch.device) -> Tensor:
    """[Lq, Lk] int64: j - p_i with p_i = i + Lk - Lq (bottom-right aligned)."""
    return (torch.arange(lk, device=device)[None, :]
            - torch.arange(lq, device=device)[:, None] - (lk - lq))


def alibi_bias(slopes: Tensor, rel: Tensor, dtype: torch.dtype) -> Tensor:
    """slopes[h] · (j - p_i) in `dtype`, the product rounded once, from rel = j - p_i [Lq, Lk]
    (-> [Hq, Lq, Lk]) or [B, 1, Lq, Lk] (-> [B, Hq, Lq, Lk])."""
    return slopes.to(dtype).view(-1, 1, 1) * rel.to(dtype)


# The memory layouts the attention ops write their [B, Hq, Lq, Dv] output in: "bhld" is
# contiguous; "blhd" is a contiguous [B, Lq, Hq, Dv] viewed as [B, Hq, Lq, Dv] (SDPA's flash
# layout), which the reshape that merges the heads after attention, out.transpose(1, 2)
# .reshape(B, Lq, Hq · Dv), reads without a copy. The rewriting passes pick the layout of the
# node they replace, so the graph around the op keeps its strides and needs no copy.
OUT_LAYOUTS = ("bhld", "blhd")


def new_attention_out(q: Tensor, dv: int, layout: str = "bhld") -> Tensor:
    """An uninitialised [B, Hq, Lq, Dv] output for q [B, Hq, Lq, D] in q's dtype, in `layout`."""
    b, hq, lq, _ = q.shape
    if layout == "bhld":
        return q.new_empty((b, hq, lq, dv))
    if layout == "blhd":
        return q.new_empty((b, lq, hq, dv)).transpose(1, 2)
    raise ValueError(f"layout must be one of {OUT_LAYOUTS}, got {layout!r}")


def in_layout(out: Tensor, layout: str) -> Tensor:
    """`out` [B, H, L, D] in `layout` (a copy unless it already is)."""
    if layout == "bhld":
        return out.contiguous()
    if layout == "blhd":
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(f"layout must be one of {OUT_LAYOUTS}, got {layout!r}")


def attention_scores(q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool,
                     scale: float, mods: ScoreMods = PLAIN) -> Tensor:
    """The scores of `attention` in the compute precision, [B, Hq, Lq, Lk], every step of
    `ScoreMods` applied: dropped keys are -inf."""
    hq, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    cdt = compute_dtype(q.dtype)
    kf = k.to(cdt).repeat_interleave(hq // k.shape[1], dim=1)
    s = (q.to(cdt) @ kf.transpose(-1, -2)) * scale
    if mods.softcap:
        s = torch.tanh(s / mods.softcap) * mods.softcap
    for bias in mods.biases:
        s = s + bias.to(cdt)
    positional = mods.alibi_slopes is not None or mods.windowed or is_causal
    rel = relative_positions(lq, lk, q.device) if positional else None
    if mods.alibi_slopes is not None:
        s = s + alibi_bias(mods.alibi_slopes, rel, cdt)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(cdt)
    keep = key_band(rel, is_causal, mods) if positional else None
    return s if keep is None else s.masked_fill(~keep, float("-inf"))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    mods: ScoreMods = PLAIN,
) -> Tensor:
    """softmax(q @ kᵀ * scale + mask) @ v over q [B, Hq, Lq, D], k [B, Hkv, Lk, D],
    v [B, Hkv, Lk, Dv], computed in fp32 (fp64 for fp64 input), with the variants of `mods`
    (`ScoreMods`: softcap, additive biases, ALiBi, sliding window, sinks).

    - Grouped-query attention: Hq is a multiple of Hkv; query head h reads KV head
      h // (Hq // Hkv). K/V are never repeated in memory by the kernels.
    - `mask` broadcasts to [B, Hq, Lq, Lk]: boolean means True = attend (SDPA convention); a
      float mask is added to the scaled scores.
    - `is_causal`: bottom-right aligned, query i attends keys j <= i + (Lk - Lq), so a chunk of
      new queries at the end of a longer cache sees the whole past (chunked prefill, decode).
      With Lq == Lk this is the usual lower-triangular mask.
    - Rows where every key is masked give 0 (as SDPA gives them), not NaN.
    - `scale` defaults to 1/sqrt(D). The result is contiguous [B, Hq, Lq, Dv] in q's dtype.
    """
    mods.check(q, k.shape[2])
    cdt = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = attention_scores(q, k, mask, is_causal, scale, mods)
    if mods.sinks is not None:  # one more logit per row, whose probability is dropped
        sink = mods.sinks.to(cdt).view(1, -1, 1, 1).expand(*s.shape[:3], 1)
        s = torch.cat([s, sink], -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # fully masked rows: 0/0 -> 0
    # nan_to_num would also hide NaNs from NaN inputs; keep those visible.
    p = torch.where(torch.isnan(s).any(-1, keepdim=True), float("nan"), p)
    if mods.sinks is not None:
        p = p[..., :-1]
    vf = v.to(cdt).repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return (p @ vf).to(q.dtype).contiguous()


def w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None,
                 group_size: int) -> Tensor:
    """x @ dequantize(W)ᵀ + bias in fp32, returned in x's dtype. `dequantize` is exact in fp32
    (a 4-bit code times a 16-bit scale), so this is the float reference of the int4 weight."""
    from attnopt.backends import int4

    w = int4.dequantize(qweight, scales, zeros, group_size, x.shape[-1], torch.float32)
    out = x.float() @ w.T
    return (out if bias is None else out + bias.float()).to(x.dtype)


# --- mixture of experts ----------------------------------------------------------------------

MOE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swiglu_oai")


class ExpertForm(NamedTuple):
    """What an expert computes besides its weights: the gating of its first projection and
    where the routing weight applies. The default is Mixtral's SwiGLU expert.

    - `activation`: h = act(gate) ⊙ up with act SiLU ("silu"), exact GELU ("gelu") or its tanh
      form ("gelu_tanh"); or GPT-OSS's clamped SwiGLU ("swiglu_oai"):
      g = min(gate, limit), u = clamp(up, -limit, limit), h = (u + 1) ⊙ g σ(alpha g).
      `alpha` and `limit` are read only by "swiglu_oai".
    - `interleaved`: gate and up are the even and odd rows of the [2I, H] gate/up matrix
      (GPT-OSS) rather than its first and second halves (transformers' `.chunk(2, -1)`).
    - `weight_on_input`: each expert sees its token scaled by the routing weight, w x, and its
      output is summed unweighted (Llama-4), rather than weighting the expert's output.
    """

    activation: str = "silu"
    interleaved: bool = False
    alpha: float = 1.702
    limit: float = 7.0
    weight_on_input: bool = False

    @staticmethod
    def of(form: str | ExpertForm) -> ExpertForm:
        """An activation name means the default form with that activation."""
        return form if isinstance(form, ExpertForm) else ExpertForm(form)

    def split(self, gate_up: Tensor) -> tuple[Tensor, Tensor]:
        """(gate, up) of a [S, 2I] gate/up projection, in its layout (views)."""
        if self.interleaved:
            return gate_up[:, 0::2], gate_up[:, 1::2]
        inter = gate_up.shape[1] // 2
        return gate_up[:, :inter], gate_up[:, inter:]

    def gated(self, gate_up: Tensor) -> Tensor:
        """h [S, I] from the [S, 2I] gate/up projection (in its dtype)."""
        gate, up = self.split(gate_up)
        if self.activation == "swiglu_oai":
            g = gate.clamp(max=self.limit)
            return (up.clamp(-self.limit, self.limit) + 1) * (g * torch.sigmoid(g * self.alpha))
        return moe_activation(gate, self.activation) * up


def moe_activation(gate: Tensor, activation: str) -> Tensor:
    """act(gate) for the activations of the form act(gate) ⊙ up: SiLU, exact (erf) GELU,
    tanh-approximated GELU (transformers' "silu"/"swish", "gelu", "gelu_pytorch_tanh")."""
    if activation == "silu":
        return torch.nn.functional.silu(gate)
    if activation == "gelu":
        return torch.nn.functional.gelu(gate)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh")
    raise ValueError(f"activation={activation!r} is not one of {MOE_ACTIVATIONS}")


def check_moe(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate_up: Tensor,
              w_down: Tensor, form: str | ExpertForm = "silu", b_gate_up: Tensor | None = None,
              b_down: Tensor | None = None) -> None:
    """The checks of `moe` that need no look at the data (shapes, dtypes, form): every path
    runs them, the fake implementation too."""
    check_moe_routing(x, topk_ids, topk_weights, form)
    h = x.shape[1]
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != h or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [E, 2I, H={h}], got {tuple(w_gate_up.shape)}")
    e, i = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if tuple(w_down.shape) != (e, h, i):
        raise ValueError(f"w_down must be [E, H, I] = {[e, h, i]} to match w_gate_up "
                         f"{tuple(w_gate_up.shape)}, got {tuple(w_down.shape)}")
    if not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise ValueError(f"x, w_gate_up and w_down must share one dtype, got {x.dtype}, "
                         f"{w_gate_up.dtype} and {w_down.dtype}")
    check_moe_experts(topk_ids, b_gate_up, b_down, e, i, h)


def check_moe_routing(x: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                      form: str | ExpertForm) -> None:
    """The form, x [T, H] and the routing ids and weights [T, k]: checks that read shapes and
    dtypes only (no guard on a data-dependent T), whatever the expert weights' format."""
    form = ExpertForm.of(form)
    if form.activation not in MOE_ACTIVATIONS:
        raise ValueError(f"activation={form.activation!r} is not one of {MOE_ACTIVATIONS}")
    if form.activation == "swiglu_oai" and not form.limit > 0:
        raise ValueError(f"swiglu_oai needs a positive limit, got {form.limit}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"moe takes x as a floating [T, H] tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be [T, k] int32 or int64, got {topk_ids.dtype} "
                         f"{tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a floating tensor shaped like topk_ids "
                         f"{tuple(topk_ids.shape)}, got {topk_weights.dtype} "
                         f"{tuple(topk_weights.shape)}")
    if topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows but x has {x.shape[0]} tokens")


def check_moe_experts(topk_ids: Tensor, b_gate_up: Tensor | None, b_down: Tensor | None, e: int,
                      i: int, h: int) -> None:
    """E experts of intermediate size I over H: the biases' shapes (`check_moe_biases`), and no
    routed pair when E = 0 (every id would be out of range, known without the data)."""
    if e == 0 and topk_ids.numel():
        raise ValueError(f"moe: w_gate_up has no experts (E = 0) but topk_ids routes "
                         f"{tuple(topk_ids.shape)} (token, slot) pairs to them")
    check_moe_biases(b_gate_up, b_down, e, i, h)


def check_moe_biases(b_gate_up: Tensor | None, b_down: Tensor | None, e: int, i: int,
                     h: int) -> None:
    """Each bias is optional: b_gate_up [E, 2I] (rows as in w_gate_up), b_down [E, H]."""
    for name, b, shape in (("b_gate_up", b_gate_up, (e, 2 * i)), ("b_down", b_down, (e, h))):
        if b is not None and (tuple(b.shape) != shape or not b.is_floating_point()):
            raise ValueError(f"{name} must be a floating [E, N] = {list(shape)}, got {b.dtype} "
                             f"{tuple(b.shape)}")


def check_moe_ids(topk_ids: Tensor, num_experts: int) -> None:
    """Every expert id in [0, E). Reads the ids (a device sync on a GPU), so only the reference
    and CPU paths run it; the Triton path (`triton/moe.py`) and the ONNX translation make the
    rows of tokens with an out-of-range id NaN instead."""
    if topk_ids.numel() == 0:
        return
    lo, hi = (int(v) for v in topk_ids.aminmax())
    if lo < 0 or hi >= num_experts:
        bad = lo if lo < 0 else hi
        raise ValueError(f"moe: topk_ids holds expert id {bad}, outside [0, {num_experts}) "
                         f"(w_gate_up has {num_experts} experts)")


def moe(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    activation: str | ExpertForm = "silu",
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
) -> Tensor:
    """The routed experts of a sparse mixture-of-experts block, as transformers' `MixtralExperts`
    (and Qwen2-MoE's, OLMoE's, GPT-OSS's) compute them:

        out[t] = Σ_j topk_weights[t, j] · (W_down[e] h + b_down[e]),
        h = gated(W_gate_up[e] x[t] + b_gate_up[e]),   e = topk_ids[t, j],

    over x [T, H], topk_ids [T, k] (int32 or int64, each in [0, E)), topk_weights [T, k] (any
    floating dtype), w_gate_up [E, 2I, H], w_down [E, H, I] and the optional biases
    b_gate_up [E, 2I] and b_down [E, H] (any floating dtype; absent means 0). `activation` is
    an activation name or an `ExpertForm`, which says how `gated` splits the [2I] projection
    into gate and up and combines them, and whether the routing weight scales the expert's
    input instead (`weight_on_input`: out[t] = Σ_j expert_e(topk_weights[t, j] x[t]), the
    scaled input rounded to x's dtype as in eager). x and both weights share one dtype; the
    result is a contiguous [T, H] in it. An expert may get no tokens or all of them, and the
    same expert twice for one token counts twice. An id outside [0, E) is a ValueError here
    and on the CPU path; the Triton and ONNX paths, which cannot raise without a device sync
    (or at all, in a graph), make that token's output row NaN instead.

    Precision, for 16-bit x (fp32 x computes in fp32 throughout, fp64 in fp64):
    1. gate and up products accumulate in fp32, take their bias in fp32 and stay fp32 through
       the gating;
    2. that intermediate is rounded once to x's dtype — it is the second GEMM's operand, as in
       eager, where every `F.linear` output is 16-bit;
    3. the down product accumulates in fp32, takes its bias and is multiplied by the routing
       weight in fp32, and the k outputs of a token are summed in fp32;
    4. the sum is rounded once to x's dtype.
    Eager transformers rounds more often (gate/up and down outputs to 16 bits; each weighted
    output to 16 bits before a 16-bit `index_add_`), so it agrees with this to 16-bit rounding.
    """
    form = ExpertForm.of(activation)
    check_moe(x, topk_ids, topk_weights, w_gate_up, w_down, form, b_gate_up, b_down)
    cdt = compute_dtype(x.dtype)
    return _moe_experts(x, topk_ids, topk_weights, w_gate_up.shape[0],
                        lambda e: (w_gate_up[e].to(cdt), w_down[e].to(cdt)), form,
                        b_gate_up, b_down)


def _moe_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, num_experts: int,
                 expert: Callable[[int], tuple[Tensor, Tensor]], form: ExpertForm,
                 b_gate_up: Tensor | None, b_down: Tensor | None) -> Tensor:
    """The expert loop of `moe`, with the precision documented there; `expert(e)` gives expert
    e's (gate_up [2I, H], down [H, I]) in the compute dtype and is called only for the experts
    that some token picked."""
    check_moe_ids(topk_ids, num_experts)
    cdt = compute_dtype(x.dtype)
    out = torch.zeros(x.shape, dtype=cdt, device=x.device)
    for e in range(num_experts):
        tokens, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        w_gate_up, w_down = expert(e)
        routing = topk_weights[tokens, slot, None].to(cdt)
        a = x[tokens].to(cdt)
        if form.weight_on_input:
            a = (a * routing).to(x.dtype).to(cdt)
        y = expert_mlp(a, w_gate_up, w_down, form, _row(b_gate_up, e, cdt),
                       _row(b_down, e, cdt), x.dtype)
        out.index_add_(0, tokens, y if form.weight_on_input else y * routing)
    return out.to(x.dtype)


def _row(b: Tensor | None, e: int, dtype: torch.dtype) -> Tensor | None:
    return None if b is None else b[e].to(dtype)


def expert_mlp(a: Tensor, w_gate_up: Tensor, w_down: Tensor, form: ExpertForm,
               b_gate_up: Tensor | None, b_down: Tensor | None,
               round_to: torch.dtype | None = None) -> Tensor:
    """One expert on rows a [S, H], all in one compute dtype: W_down gated(W_gate_up a + b) + b.
    `round_to` rounds the intermediate h to that dtype first (`moe`'s step 2)."""
    gate_up = a @ w_gate_up.T
    if b_gate_up is not None:
        gate_up = gate_up + b_gate_up
    h = form.gated(gate_up)
    if round_to is not None:
        h = h.to(round_to).to(a.dtype)
    y = h @ w_down.T
    return y if b_down is None else y + b_down


def check_moe_w4a16(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up_qweight: Tensor,
                    gate_up_scales: Tensor, gate_up_zeros: Tensor, down_qweight: Tensor,
                    down_scales: Tensor, down_zeros: Tensor, group_size: int,
                    activation: str | ExpertForm = "silu", b_gate_up: Tensor | None = None,
                    b_down: Tensor | None = None) -> None:
    """The data-free checks of `moe_w4a16`: `check_moe`'s on the packed shapes."""
    from attnopt.backends import int4

    if group_size not in int4.GROUP_SIZES:
        raise ValueError(f"group_size must be one of {int4.GROUP_SIZES}, got {group_size}")
    check_moe_routing(x, topk_ids, topk_weights, activation)
    for name, q in (("gate_up_qweight", gate_up_qweight), ("down_qweight", down_qweight)):
        if q.dtype != torch.uint8 or q.dim() != 3:
            raise ValueError(f"{name} must be [E, N, Kp/2] uint8, got {q.dtype} "
                             f"{tuple(q.shape)}")
    h = x.shape[1]
    e, two_i = gate_up_qweight.shape[:2]
    if two_i % 2:
        raise ValueError(f"gate_up_qweight must be [E, 2I, Hp/2], got "
                         f"{tuple(gate_up_qweight.shape)}")
    i = two_i // 2
    for name, q, s, z, n, k in (("gate_up", gate_up_qweight, gate_up_scales, gate_up_zeros,
                                 two_i, h),
                                ("down", down_qweight, down_scales, down_zeros, h, i)):
        kp = int4.padded(k, group_size)
        if tuple(q.shape) != (e, n, kp // 2):
            raise ValueError(f"{name}_qweight must be [E, N, Kp/2] = {[e, n, kp // 2]} for "
                             f"hidden {h}, intermediate {i} and group_size {group_size}, got "
                             f"{tuple(q.shape)}")
        for what, t in (("scales", s), ("zeros", z)):
            if tuple(t.shape) != (e, n, kp // group_size) or not t.is_floating_point():
                raise ValueError(f"{name}_{what} must be a floating [E, N, Kp/g] = "
                                 f"{[e, n, kp // group_size]}, got {t.dtype} {tuple(t.shape)}")
    check_moe_experts(topk_ids, b_gate_up, b_down, e, i, h)


def moe_w4a16(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up_qweight: Tensor,
              gate_up_scales: Tensor, gate_up_zeros: Tensor, down_qweight: Tensor,
              down_scales: Tensor, down_zeros: Tensor, group_size: int,
              activation: str | ExpertForm = "silu", b_gate_up: Tensor | None = None,
              b_down: Tensor | None = None) -> Tensor:
    """`moe` on int4 expert weights: each expert matrix is packed as `int4.quantize_rtn` packs a
    2-D weight ([N, K] -> qweight [N, Kp/2], scales and zeros [N, Kp/g]), stacked over E.
    The weights of the experts some token picked are dequantized in fp32 (exact: a 4-bit code
    times a 16-bit scale; fp64 for fp64 x) and `moe`'s loop, form, biases and precision
    apply."""
    check_moe_w4a16(x, topk_ids, topk_weights, gate_up_qweight, gate_up_scales, gate_up_zeros,
                    down_qweight, down_scales, down_zeros, group_size, activation, b_gate_up,
                    b_down)
    from attnopt.backends import int4

    cdt = compute_dtype(x.dtype)
    h, inter = x.shape[1], gate_up_qweight.shape[1] // 2

    def expert(e: int) -> tuple[Tensor, Tensor]:
        return (int4.dequantize(gate_up_qweight[e], gate_up_scales[e], gate_up_zeros[e],
                                group_size, h, cdt),
                int4.dequantize(down_qweight[e], down_scales[e], down_zeros[e], group_size,
                                inter, cdt))

    return _moe_experts(x, topk_ids, topk_weights, gate_up_qweight.shape[0], expert,
                        ExpertForm.of(activation), b_gate_up, b_down)


def moe_backward(grad: Tensor, x: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                 w_gate_up: Tensor, w_down: Tensor, activation: str | ExpertForm = "silu",
                 b_gate_up: Tensor | None = None, b_down: Tensor | None = None,
                 ) -> tuple[Tensor, ...]:
    """Gradients of `moe` (without its rounding of the intermediate and of a scaled input) with
    respect to x, topk_weights, w_gate_up, w_down, b_gate_up and b_down (None for an absent
    bias), computed in fp32 (fp64 for fp64) and returned in their dtypes. For a pair (t, j) of
    expert e with a = x[t] (w x[t] with `weight_on_input`), w = topk_weights[t, j],
    G = grad[t] and `moe`'s gate, up, h and y:

        dy = w G (G),   dw = G · y (dx[t] · x[t] / w, i.e. Σ da ⊙ x[t]),
        dW_down += dy hᵀ,   db_down += dy,   dh = W_downᵀ dy,
        (dgate, dup) = gated's backward at (gate, up) applied to dh (`_gated_backward`),
        dW_gate_up += [dgate; dup] aᵀ,   db_gate_up += [dgate; dup] (rows in the form's layout),
        da = W_gate_upᵀ [dgate; dup],   dx[t] += da (w da).

    Written out rather than left to autograd: the op's backward runs inside a custom op, below
    the autograd dispatch key."""
    form = ExpertForm.of(activation)
    check_moe(x, topk_ids, topk_weights, w_gate_up, w_down, form, b_gate_up, b_down)
    check_moe_ids(topk_ids, w_gate_up.shape[0])
    cdt = compute_dtype(x.dtype)
    xf, gf, wf = x.to(cdt), grad.to(cdt), topk_weights.to(cdt)
    dx = torch.zeros(x.shape, dtype=cdt, device=x.device)
    dweights = torch.zeros(topk_weights.shape, dtype=cdt, device=x.device)
    dgate_up = torch.zeros(w_gate_up.shape, dtype=cdt, device=x.device)
    ddown = torch.zeros(w_down.shape, dtype=cdt, device=x.device)
    db_gate_up = None if b_gate_up is None else torch.zeros(b_gate_up.shape, dtype=cdt,
                                                           device=x.device)
    db_down = None if b_down is None else torch.zeros(b_down.shape, dtype=cdt, device=x.device)
    for e in range(w_gate_up.shape[0]):
        tokens, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        wgu, wd = w_gate_up[e].to(cdt), w_down[e].to(cdt)
        w = wf[tokens, slot, None]
        a = xf[tokens] * w if form.weight_on_input else xf[tokens]
        gate_up = a @ wgu.T
        if b_gate_up is not None:
            gate_up = gate_up + b_gate_up[e].to(cdt)
        h = form.gated(gate_up)
        if form.weight_on_input:
            dy = gf[tokens]
        else:
            y = h @ wd.T
            if b_down is not None:
                y = y + b_down[e].to(cdt)
            dweights[tokens, slot] = (gf[tokens] * y).sum(-1)
            dy = gf[tokens] * w
        ddown[e] = dy.T @ h
        if db_down is not None:
            db_down[e] = dy.sum(0)
        dgu = _gated_backward(gate_up, dy @ wd, form)
        dgate_up[e] = dgu.T @ a
        if db_gate_up is not None:
            db_gate_up[e] = dgu.sum(0)
        da = dgu @ wgu
        if form.weight_on_input:
            dweights[tokens, slot] = (da * xf[tokens]).sum(-1)
            da = da * w
        dx.index_add_(0, tokens, da)
    return (dx.to(x.dtype), dweights.to(topk_weights.dtype), dgate_up.to(w_gate_up.dtype),
            ddown.to(w_down.dtype),
            None if db_gate_up is None else db_gate_up.to(b_gate_up.dtype),
            None if db_down is None else db_down.to(b_down.dtype))


def _gated_backward(gate_up: Tensor, dh: Tensor, form: ExpertForm) -> Tensor:
    """d gate_up [S, 2I] (in the form's layout) from dh [S, I] for h = form.gated(gate_up).
    act(g) ⊙ u: dg = act'(g) u dh, du = act(g) dh. Clamped SwiGLU, h = (u' + 1) g' σ(α g'):
    dg' = (u' + 1) dh (σ(α g') + α g' σ(α g')(1 - σ(α g'))), du' = g' σ(α g') dh, each passed
    back where its clamp held the value (torch.clamp's gradient: inside the bounds, ends
    included)."""
    gate, up = form.split(gate_up)
    if form.activation == "swiglu_oai":
        g, u = gate.clamp(max=form.limit), up.clamp(-form.limit, form.limit)
        sig = torch.sigmoid(g * form.alpha)
        dg = (u + 1) * dh * (sig + form.alpha * g * sig * (1 - sig)) * (gate <= form.limit)
        du = g * sig * dh * ((up >= -form.limit) & (up <= form.limit))
    elif form.activation == "silu":
        dg, du = torch.ops.aten.silu_backward(dh * up, gate), moe_activation(gate, "silu") * dh
    else:
        approximate = "tanh" if form.activation == "gelu_tanh" else "none"
        dg = torch.ops.aten.gelu_backward(dh * up, gate, approximate=approximate)
        du = moe_activation(gate, form.activation) * dh
    out = torch.empty_like(gate_up)
    d_gate, d_up = form.split(out)
    d_gate.copy_(dg)
    d_up.copy_(du)
    return out


# --- paged attention (KV cache) ----------------------------------------------------------------


def check_paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor,
                          seq_lens: Tensor, k_scale: Tensor | None = None,
                          v_scale: Tensor | None = None, mask: Tensor | None = None,
                          mods: ScoreMods = PLAIN) -> None:
    """The checks of `paged_attention` that need no look at the data (shapes and dtypes): every
    path runs them, the fake implementation too."""
    if q.dim() != 4 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                       torch.float64):
        raise ValueError(f"paged_attention takes q as a floating [B, Hq, Lq, D] tensor, got "
                         f"{q.dtype} {tuple(q.shape)}")
    b, hq, _, d = q.shape
    if k_pool.dim() != 4 or v_pool.dim() != 4 or k_pool.shape[:3] != v_pool.shape[:3]:
        raise ValueError(f"k_pool and v_pool must be [num_blocks, block_size, Hkv, D] and "
                         f"[num_blocks, block_size, Hkv, Dv], got {tuple(k_pool.shape)} and "
                         f"{tuple(v_pool.shape)}")
    hkv = k_pool.shape[2]
    if k_pool.shape[3] != d or hkv == 0 or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_pool {tuple(k_pool.shape)}: the "
                         f"head dims must agree and Hq must be a multiple of Hkv")
    quantized = k_pool.dtype == torch.int8
    if quantized:
        if v_pool.dtype != torch.int8 or k_scale is None or v_scale is None:
            raise ValueError("int8 k_pool and v_pool need both k_scale and v_scale")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s.shape != k_pool.shape[:3] or s.dtype != torch.float32:
                raise ValueError(f"{name} must be float32 [num_blocks, block_size, Hkv] = "
                                 f"{list(k_pool.shape[:3])}, got {s.dtype} {tuple(s.shape)}")
    elif k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"k_pool and v_pool must be int8 or share q's dtype {q.dtype}, got "
                         f"{k_pool.dtype} and {v_pool.dtype}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError("k_scale and v_scale go with int8 pools only")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype not in (
            torch.int32, torch.int64):
        raise ValueError(f"block_table must be [B={b}, max_blocks] int32, got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be [B={b}] int32, got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise ValueError(f"mask must be bool (True = attend) or floating (added to the "
                             f"scores), got {mask.dtype}")
        # Key j of the mask is each sequence's j-th cached token, up to the table's capacity:
        # its last dim cannot follow the longest sequence without reading seq_lens.
        want = (b, hq, q.shape[2], block_table.shape[1] * k_pool.shape[1])
        if mask.dim() != 4 or mask.shape[3] != want[3] or any(
                n not in (1, w) for n, w in zip(mask.shape[:3], want[:3], strict=True)):
            raise ValueError(f"mask must be [B, Hq, Lq, max_blocks · block_size] = {list(want)}"
                             f", dims of size 1 broadcasting but the last: one column per slot "
                             f"of the block table (its capacity, not the longest sequence), got "
                             f"{tuple(mask.shape)}")
    # Biases, like the mask, have one column per slot of the block table.
    mods.check(q, block_table.shape[1] * k_pool.shape[1])


def dequantize_kv(x: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """A K or V pool (or a slice of one) as `dtype`: an int8 pool is x · scale, per (token,
    head) scale, computed in fp32 and rounded once to `dtype` (what the kernels compute in
    registers); a floating pool is only cast."""
    if scale is None:
        return x.to(dtype)
    return (x.to(torch.float32) * scale.to(torch.float32)[..., None]).to(dtype)


def paged_kv(pool: Tensor, scale: Tensor | None, blocks: Tensor, length: int,
             dtype: torch.dtype) -> Tensor:
    """The first `length` tokens of one sequence whose tokens lie in `pool` [num_blocks,
    block_size, H, D] in the blocks `blocks` (its row of the block table), as a contiguous
    [H, length, D] in `dtype`: token t is pool[blocks[t // block_size], t % block_size]."""
    block_size = pool.shape[1]
    ids = blocks[:(length + block_size - 1) // block_size].long()
    x = pool[ids].flatten(0, 1)[:length]
    if scale is not None:
        x = dequantize_kv(x, scale[ids].flatten(0, 1)[:length], dtype)
    return x.to(dtype).transpose(0, 1).contiguous()


def paged_attention(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    is_causal: bool = True,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    mask: Tensor | None = None,
    mods: ScoreMods = PLAIN,
) -> Tensor:
    """Attention of Lq new queries over a paged KV cache, sequence by sequence.

    - q [B, Hq, Lq, D]: the queries of the Lq newest tokens of each sequence (decode: Lq = 1;
      speculative or chunked decode: a few).
    - k_pool [num_blocks, block_size, Hkv, D], v_pool [num_blocks, block_size, Hkv, Dv]: the
      cache of one layer. Sequence b's token t is at block block_table[b, t // block_size],
      row t % block_size; seq_lens[b] tokens are cached, the Lq new ones included (they are
      written before attention is computed). Entries of the block table past a sequence's
      length are never read.
    - Grouped-query attention: query head h reads KV head h // (Hq // Hkv).
    - `is_causal`: bottom-right aligned against each sequence's own length: query i of
      sequence b sees keys j <= seq_lens[b] - Lq + i; otherwise all of j < seq_lens[b].
    - `mask` (optional: the model's own, for left padding, sliding windows, ...) broadcasts to
      [B, Hq, Lq, max_blocks · block_size]: row i is query i (the token at position
      seq_lens[b] - Lq + i), column j the sequence's j-th cached token. Its last dim is the
      block table's capacity whatever the lengths; its other dims may be 1. It applies on top
      of the lengths and `is_causal`: a bool mask keeps the keys where it is True, a floating
      one is added to the scaled scores (in the compute precision below). Columns at or past
      seq_lens[b] are never read.
    - `mods` (`ScoreMods`: softcap, biases, ALiBi, window, sinks) as in `attention`, over each
      sequence's own keys: p_i = seq_lens[b] - Lq + i, and biases laid out as the mask
      ([B, Hq, Lq, max_blocks · block_size], column j the j-th cached token).
    - Rows that see no key (seq_lens[b] = 0, seq_lens[b] < Lq with is_causal, or a mask that
      drops every key left) give 0.
    - int8 pools (k_pool and v_pool int8, with float32 k_scale and v_scale [num_blocks,
      block_size, Hkv]: one scale per cached token and KV head) stand for
      `dequantize_kv(pool, scale, q.dtype)`.
    - Computed as `attention` on the gathered K/V: in fp32 (fp64 for fp64 q); the result is a
      contiguous [B, Hq, Lq, Dv] in q's dtype.
    """
    check_paged_attention(q, k_pool, v_pool, block_table, seq_lens, k_scale, v_scale, mask,
                          mods)
    b, hq, lq, _ = q.shape
    out = q.new_empty((b, hq, lq, v_pool.shape[3]))
    for i, length in enumerate(seq_lens.tolist()):
        k = paged_kv(k_pool, k_scale, block_table[i], length, q.dtype)
        v = paged_kv(v_pool, v_scale, block_table[i], length, q.dtype)
        m = None if mask is None else sequence_columns(mask, b, i, length)
        biases = tuple(sequence_columns(t, b, i, length) for t in mods.biases)
        out[i] = attention(q[i:i + 1], k[None], v[None], m, is_causal, scale,
                           dataclasses.replace(mods, biases=biases))[0]
    return out


def sequence_columns(t: Tensor, batch: int, i: int, length: int) -> Tensor:
    """Sequence i's first `length` columns of a mask or bias laid out [B, Hq, Lq, capacity]
    (leading dims may broadcast): [1, Hq or 1, Lq or 1, length]."""
    return t.expand(batch, *t.shape[-3:])[i:i + 1, ..., :length]


# --- attention with past K/V (a cache grown by concatenation) ---------------------------------


def attention_with_past(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    mods: ScoreMods = PLAIN,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of attention over a KV cache that grows by concatenation (transformers'
    DynamicCache): returns (out, present_k, present_v).

    - present_k = cat([past_k, k], 2) and present_v = cat([past_v, v], 2), over past_k
      [B, Hkv, P, D] and k [B, Hkv, Lk, D] (past_v, v: Dv); P may be 0.
    - out = `attention(q, present_k, present_v, mask, is_causal, scale)`: the mask broadcasts
      to [B, Hq, Lq, P + Lk] (the present keys), `is_causal` is bottom-right over them (query
      i sees keys j <= i + P + Lk - Lq: with Lk = Lq the whole past and the new keys up to its
      own), GQA as there; so do `mods`' biases, and ALiBi and the window count positions
      among the present keys.
    """
    present_k, present_v = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
    return (attention(q, present_k, present_v, mask, is_causal, scale, mods), present_k,
            present_v)


# --- multi-head latent attention (DeepSeek's MLA, absorbed form) ------------------------------


def latent_attention(
    q_lat: Tensor,
    q_rot: Tensor,
    c_kv: Tensor,
    k_rot: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Multi-head latent attention in the absorbed form, over a latent that is its own value:

        out_lat = softmax((q_lat · c_kvᵀ + q_rot · k_rotᵀ) · scale + mask) · c_kv

    over q_lat [B, H, Lq, R] (the queries already in latent space: q_nope · W_UK per head),
    q_rot [B, H, Lq, P] (their rotary part), c_kv [B, 1, Lk, R] (the cached latent, one
    "KV head" every query head reads) and k_rot [B, 1, Lk, P] (the shared rotary key). That is
    `attention(cat(q_lat, q_rot), cat(c_kv, k_rot), c_kv, mask, is_causal, scale)` — MQA whose
    keys are [c_kv | k_rot] and whose values are c_kv, the same storage — so masks, the
    bottom-right causal flag, rows that see no key (0) and the compute precision (fp32, fp64
    for fp64) are `attention`'s. The result is contiguous [B, H, Lq, R] in q_lat's dtype.

    Why this is MLA: with keys k_h = [c · W_UK[h]ᵀ | k_rot] and values v_h = c · W_UV[h]ᵀ (the
    per-head expansion through kv_b_proj), q_h · k_hᵀ = (q_nope,h · W_UK[h]) · cᵀ + q_rot,h ·
    k_rotᵀ and softmax(·) · v_h = (softmax(·) · c) · W_UV[h]ᵀ: the same numbers, reassociated.
    So out_h = out_lat,h · W_UV[h]ᵀ is what attention over the expanded K/V gives, exactly up to
    rounding, while per cached token only R + P numbers are read.
    """
    check_latent_attention(q_lat, q_rot, c_kv, k_rot)
    return attention(torch.cat((q_lat, q_rot), -1), torch.cat((c_kv, k_rot), -1), c_kv, mask,
                     is_causal, scale)


def check_latent_attention(q_lat: Tensor, q_rot: Tensor, c_kv: Tensor, k_rot: Tensor) -> None:
    """The checks of `latent_attention` that need no look at the data (every path runs them)."""
    if q_lat.dim() != 4 or q_rot.dim() != 4 or q_lat.shape[:3] != q_rot.shape[:3]:
        raise ValueError(f"latent_attention takes q_lat [B, H, Lq, R] and q_rot [B, H, Lq, P], "
                         f"got {tuple(q_lat.shape)} and {tuple(q_rot.shape)}")
    b, _, _, rank = q_lat.shape
    want = [(b, 1, None, rank), (b, 1, None, q_rot.shape[3])]
    for name, t, (wb, wh, _, wd) in (("c_kv", c_kv, want[0]), ("k_rot", k_rot, want[1])):
        if t.dim() != 4 or t.shape[0] != wb or t.shape[1] != wh or t.shape[3] != wd:
            raise ValueError(f"{name} must be [B={wb}, 1, Lk, {wd}] (one latent head shared by "
                             f"every query head), got {tuple(t.shape)}")
    if c_kv.shape[2] != k_rot.shape[2]:
        raise ValueError(f"c_kv and k_rot must hold the same tokens, got {c_kv.shape[2]} and "
                         f"{k_rot.shape[2]}")
    dtypes = {q_lat.dtype, q_rot.dtype, c_kv.dtype, k_rot.dtype}
    if len(dtypes) != 1 or not q_lat.is_floating_point():
        raise ValueError(f"latent_attention's operands must share one floating dtype, got "
                         f"{sorted(map(str, dtypes))}")


def check_paged_latent_attention(q_lat: Tensor, q_rot: Tensor, ckv_pool: Tensor,
                                 krot_pool: Tensor, block_table: Tensor, seq_lens: Tensor,
                                 ckv_scale: Tensor | None = None,
                                 krot_scale: Tensor | None = None,
                                 mask: Tensor | None = None) -> None:
    """The data-free checks of `paged_latent_attention`: q_rot and the rope pool fit q_lat and
    the latent pool, which hold one head; then `check_paged_attention`'s, on stand-ins of the
    concatenated query and key (views of one element: nothing is allocated)."""
    if q_lat.dim() != 4 or q_rot.dim() != 4 or q_lat.shape[:3] != q_rot.shape[:3]:
        raise ValueError(f"paged_latent_attention takes q_lat [B, H, Lq, R] and q_rot "
                         f"[B, H, Lq, P], got {tuple(q_lat.shape)} and {tuple(q_rot.shape)}")
    if q_rot.dtype != q_lat.dtype:
        raise ValueError(f"q_lat and q_rot must share one dtype, got {q_lat.dtype} and "
                         f"{q_rot.dtype}")
    rank, rope = q_lat.shape[3], q_rot.shape[3]
    for name, pool, width in (("ckv_pool", ckv_pool, rank), ("krot_pool", krot_pool, rope)):
        if pool.dim() != 4 or pool.shape[2] != 1 or pool.shape[3] != width:
            raise ValueError(f"{name} must be [num_blocks, block_size, 1, {width}] (one latent "
                             f"head), got {tuple(pool.shape)}")
    if ckv_pool.shape[:2] != krot_pool.shape[:2] or ckv_pool.dtype != krot_pool.dtype:
        raise ValueError(f"ckv_pool and krot_pool must have the same blocks and dtype, got "
                         f"{ckv_pool.dtype} {tuple(ckv_pool.shape)} and {krot_pool.dtype} "
                         f"{tuple(krot_pool.shape)}")
    q = q_lat.new_empty(()).expand(*q_lat.shape[:3], rank + rope)
    k_pool = ckv_pool.new_empty(()).expand(*ckv_pool.shape[:3], rank + rope)
    check_paged_attention(q, k_pool, ckv_pool, block_table, seq_lens, ckv_scale, krot_scale,
                          mask)


def paged_latent_attention(
    q_lat: Tensor,
    q_rot: Tensor,
    ckv_pool: Tensor,
    krot_pool: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    is_causal: bool = True,
    ckv_scale: Tensor | None = None,
    krot_scale: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """`latent_attention` over a paged latent cache, sequence by sequence: `paged_attention`'s
    conventions with the latent as keys and values.

    - ckv_pool [num_blocks, block_size, 1, R] and krot_pool [num_blocks, block_size, 1, P]:
      one layer of `attnopt.cache.PagedKVCache` for an MLA model (its "K" is the latent, its
      "V" the rotary key, as transformers' DeepSeek hands them to the cache). Sequence b's
      token t is at block block_table[b, t // block_size], row t % block_size; seq_lens[b]
      tokens are cached, the Lq new ones included. Table entries past a length are never read.
    - `is_causal`: bottom-right against each sequence's own length; `mask` broadcasts to
      [B, H, Lq, max_blocks · block_size] (column j: the j-th cached token), bool (True =
      attend) or additive, applied on top of the lengths, as in `paged_attention`.
    - int8 pools, with float32 ckv_scale and krot_scale [num_blocks, block_size, 1], stand for
      `dequantize_kv(pool, scale, q_lat.dtype)`.
    - Rows that see no key give 0. The result is contiguous [B, H, Lq, R] in q_lat's dtype.
    """
    check_paged_latent_attention(q_lat, q_rot, ckv_pool, krot_pool, block_table, seq_lens,
                                 ckv_scale, krot_scale, mask)
    b, h, lq, _ = q_lat.shape
    out = q_lat.new_empty((b, h, lq, q_lat.shape[3]))
    for i, length in enumerate(seq_lens.tolist()):
        c = paged_kv(ckv_pool, ckv_scale, block_table[i], length, q_lat.dtype)
        k_rot = paged_kv(krot_pool, krot_scale, block_table[i], length, q_lat.dtype)
        m = None if mask is None else mask.expand(b, -1, -1, -1)[i:i + 1, ..., :length]
        out[i] = latent_attention(q_lat[i:i + 1], q_rot[i:i + 1], c[None], k_rot[None], m,
                                  is_causal, scale)[0]
    return out
