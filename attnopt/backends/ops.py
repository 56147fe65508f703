"""The attnopt:: op library: what rewritten graphs call.

Each op has a schema (inferred from the type hints; written out for the attention ops, whose
list of bias tensors with a default is beyond inference), a fake implementation for tracing, a
reference implementation (`backends/reference.py`), a CPU path, a Triton path and an autograd
formula. Which path runs is the `impl` argument, which the passes set from the `kernels` option
so the choice is visible in the graph and in the report:

- "auto": Triton on CUDA tensors, the CPU path (ATen kernels) otherwise;
- "triton": always Triton (on CPU tensors only under TRITON_INTERPRET=1, as in tests);
- "reference": plain PyTorch, the ground truth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from attnopt.backends import int4_cpu, moe_cpu, reference
from attnopt.backends.triton import HAVE_TRITON, interpreting

IMPLS = ("auto", "triton", "reference")


def triton_usable(device: torch.device) -> str | None:
    """None if Triton kernels can run on `device`, else the reason they cannot."""
    if not HAVE_TRITON:
        return "triton is not installed (pip install triton; Linux only)"
    if device.type == "cuda" or interpreting():
        return None
    return (
        f"Triton kernels need CUDA tensors, got {device.type}; set TRITON_INTERPRET=1 before "
        "importing triton to run them on CPU (slow, for tests)"
    )


def _use_triton(impl: str, x: Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl == "reference":
        return False
    reason = triton_usable(x.device)
    if impl == "triton" and reason:
        raise RuntimeError(f"attnopt: impl='triton' cannot run: {reason}")
    return impl == "triton" or (x.is_cuda and reason is None)


# --- softmax ---------------------------------------------------------------------------------


@torch.library.custom_op("attnopt::softmax", mutates_args=())
def softmax(
    x: Tensor,
    dim: int,
    scale: float,
    bias: Tensor | None,
    mask: Tensor | None,
    fill: float,
    keep_mask: bool = False,
    safe: bool = False,
    dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> Tensor:
    """softmax(where(mask, fill, x * scale + bias), dim) in fp32; see `reference.softmax`."""
    out_dtype = dtype or x.dtype
    if x.dim() > 0 and _use_triton(impl, x):
        from attnopt.backends.triton import softmax as kernel

        return kernel.softmax(x, dim, scale, bias, mask, fill, keep_mask, safe, out_dtype)
    if impl == "reference":
        return reference.softmax(x, dim, scale, bias, mask, fill, keep_mask, safe, out_dtype)
    return _softmax_cpu(x, dim, scale, bias, mask, fill, keep_mask, safe, out_dtype)


def _softmax_cpu(x, dim, scale, bias, mask, fill, keep_mask, safe, dtype) -> Tensor:
    """The reference math with one working buffer: the pre-ops run in place on a single fp32
    copy of the scores, and ATen's vectorised softmax upcasts on the fly when there are none."""
    cdt = reference.compute_dtype(x.dtype)
    if scale == 1.0 and bias is None and mask is None:
        s = x
    else:
        s = torch.mul(x, scale, out=torch.empty(x.shape, dtype=cdt, device=x.device))
        if bias is not None:
            s = s.add_(bias) if torch.broadcast_shapes(bias.shape, s.shape) == s.shape else s + bias
        if mask is not None:
            s = s.masked_fill_(~mask if keep_mask else mask, fill) \
                if torch.broadcast_shapes(mask.shape, s.shape) == s.shape \
                else s.masked_fill(~mask if keep_mask else mask, fill)
    y = torch.softmax(s, dim, dtype=cdt)
    if safe:
        y = y.masked_fill_((s == float("-inf")).all(dim, keepdim=True), 0.0)
    return y.to(dtype).contiguous()


@softmax.register_fake
def _(x, dim, scale, bias, mask, fill, keep_mask=False, safe=False, dtype=None, impl="auto"):
    return x.new_empty(x.shape, dtype=dtype or x.dtype)


def _softmax_setup(ctx, inputs, output):
    x, dim, scale, bias, mask, _fill, keep_mask, *_ = inputs
    ctx.save_for_backward(output, bias, mask)
    ctx.dim, ctx.scale, ctx.keep_mask = dim, scale, keep_mask
    ctx.x_dtype = x.dtype


def _softmax_backward(ctx, grad):
    # y = softmax(s): ds = y * (g - sum(g * y)); ds/dx = scale; ds/dbias = 1 (summed to its shape);
    # masked positions take a constant fill, so no gradient flows there.
    y, bias, mask = ctx.saved_tensors
    yf, gf = y.float(), grad.float()
    ds = yf * (gf - (gf * yf).sum(ctx.dim, keepdim=True))
    if mask is not None:
        ds = ds.masked_fill(~mask if ctx.keep_mask else mask, 0.0)
    dx = (ds * ctx.scale).to(ctx.x_dtype)
    dbias = None
    if bias is not None and bias.requires_grad:
        dbias = _sum_to_shape(ds, bias.shape).to(bias.dtype)
    return dx, None, None, dbias, None, None, None, None, None, None


def _sum_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast result back to `shape` (the gradient of a broadcast)."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


softmax.register_autograd(_softmax_backward, setup_context=_softmax_setup)


# --- attention ---------------------------------------------------------------------------------

# The variants of `reference.ScoreMods`, as trailing arguments with defaults so that graphs and
# callers that predate them keep working. Written out as a schema because a list of tensors
# with a default (`Tensor[]? biases=None`) is beyond what torch.library infers from hints.
_MODS_SCHEMA = ("float softcap=0., Tensor[]? biases=None, Tensor? alibi_slopes=None, "
                "int window_left=-1, int window_right=-1, Tensor? sinks=None")
# `layout`: the memory layout of the [B, Hq, Lq, Dv] output (`reference.OUT_LAYOUTS`). The
# passes ask for the layout of the node they replace, so the graph after it needs no copy.
_ATTENTION_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? mask, bool is_causal, float scale, "
                     f"str impl=\"auto\", {_MODS_SCHEMA}, str layout=\"bhld\") -> Tensor")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
    impl: str = "auto",
    softcap: float = 0.0,
    biases: Sequence[Tensor] | None = None,
    alibi_slopes: Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    sinks: Tensor | None = None,
    layout: str = "bhld",
) -> Tensor:
    """softmax(q @ kᵀ * scale + mask) @ v with GQA, bottom-right causal, and the variants of
    `reference.ScoreMods` (softcap, additive biases, ALiBi slopes, sliding window, sinks) in
    their order; `reference.attention` states the semantics. The output is laid out as
    `layout` says (`reference.OUT_LAYOUTS`)."""
    mods = reference.ScoreMods.of(softcap, biases, alibi_slopes, window_left, window_right,
                                  sinks)
    if _use_triton(impl, q):
        from attnopt.backends.triton import attention as kernel

        return kernel.attention(q, k, v, mask, is_causal, scale, mods, layout=layout)
    if impl == "reference":
        out = reference.attention(q, k, v, mask, is_causal, scale, mods)
    else:
        out = _attention_cpu(q, k, v, mask, is_causal, scale, mods)
    return reference.in_layout(out, layout)


attention = torch.library.custom_op("attnopt::attention", attention, mutates_args=(),
                                    schema=_ATTENTION_SCHEMA)


def _all_finite(*tensors: Tensor | None) -> bool:
    """Whether no element of the tensors is NaN or ±inf: one reduction each, in fp32 or wider
    (a sum that overflows says False, which only sends the caller to its exact fallback)."""
    return all(t is None or bool(torch.isfinite(t.sum(dtype=reference.compute_dtype(t.dtype))))
               for t in tensors)


def _sdpa_dtype(q: Tensor, mask: Tensor | None) -> torch.dtype:
    """The dtype SDPA must run in to add an additive mask in its own precision: SDPA takes the
    mask in q's dtype, and rounding an fp32 bias (ALiBi, relative positions) to bf16 moves the
    scores by up to a percent of its size. Eager upcast the scores to add it."""
    if mask is None or mask.dtype == torch.bool:
        return q.dtype
    return torch.promote_types(q.dtype, mask.dtype)


def _sdpa_mask(mask: Tensor | None, rel: Tensor, is_causal: bool, scale_dtype: torch.dtype,
               mods: reference.ScoreMods) -> Tensor | str | None:
    """The one mask SDPA takes for `mask` and `mods` over keys at relative positions `rel`
    (j - p_i): the additive term (a bias, ALiBi or the op's float mask) with the window and
    the causal band folded in as -inf, or a boolean; None for none. SDPA adds a single mask
    to q·kᵀ·scale, so it is exact only for at most one additive term and no softcap or sink;
    otherwise the reason it is not, for the caller to take the reference math. (Sinks are
    `_sdpa`'s.)"""
    if mods.softcap:
        return "a softcap is not SDPA's"
    additive = [*mods.biases, *([mask] if mask is not None and mask.dtype != torch.bool else [])]
    if mods.alibi_slopes is not None:  # computed as the reference computes it, in fp32
        additive.append(reference.alibi_bias(mods.alibi_slopes, rel, scale_dtype))
    if len(additive) > 1:
        return "two additive terms: one SDPA mask would add them in another order"
    keep = reference.key_band(rel, is_causal, mods)
    if mask is not None and mask.dtype == torch.bool:
        keep = mask if keep is None else keep & mask
    if not additive:
        return keep
    return additive[0] if keep is None else torch.where(keep, additive[0], -math.inf)


def _attention_cpu(q, k, v, mask, is_causal, scale, mods=reference.PLAIN) -> Tensor:
    """ATen's SDPA (flash on CPU), which reads grouped K/V without repeating them. SDPA's causal
    flag is top-left aligned and excludes a mask; ours is bottom-right and combines with one, so
    outside the case where they agree the causal part is folded into the mask, as is a window
    (a band of keys, -inf outside) and ALiBi (its bias computed as the reference does).

    SDPA adds one mask to the scores: what it cannot compute exactly — a softcap, or more
    than one additive term (a bias and a float mask: SDPA would add their sum, rounded in
    another order) — takes the reference math (`reference.attention`, the scores materialised
    in fp32, as eager does). Sinks are one more key for SDPA (`_sdpa`), exact.

    SDPA's CPU kernel gives 0 for a row whose query holds a NaN, and NaN for a row with a
    non-finite key at a position the mask drops; the op's semantics (`reference.attention`)
    are eager's: NaN, and the dropped key ignored. Inputs holding NaN or inf take the reference
    path, which costs one reduction of q, k and v to find out."""
    mods.check(q, k.shape[2])
    if not _all_finite(q, k, v):
        return reference.attention(q, k, v, mask, is_causal, scale, mods)
    lq, lk = q.shape[-2], k.shape[-2]
    if mask is None and mods.plain and (not is_causal or lq == lk):
        sdpa_mask = None  # SDPA's own causal flag agrees
    else:
        rel = reference.relative_positions(lq, lk, q.device)
        sdpa_mask = _sdpa_mask(mask, rel, is_causal, reference.compute_dtype(q.dtype), mods)
        if isinstance(sdpa_mask, str):
            return reference.attention(q, k, v, mask, is_causal, scale, mods)
        is_causal = False
    return _sdpa(q, k, v, sdpa_mask, is_causal, scale, mods.sinks)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
          scale: float, sinks: Tensor | None = None) -> Tensor:
    """SDPA in the dtype `_sdpa_dtype` picks, returned contiguous in q's dtype. Sinks (with
    is_causal False: the caller folds it into the mask) are one more key: K and V get a row
    of zeros, whose score is q·0·scale = 0 exactly (q is finite here), and the mask a last
    column holding each head's sink, so the softmax has e^sink in its denominator and the
    output nothing from it — what `reference.attention` computes."""
    if sinks is not None:
        b, hq, lq, _ = q.shape
        dtype = torch.promote_types(_sdpa_dtype(q, mask), sinks.dtype)
        if mask is None or mask.dtype == torch.bool:
            mask = torch.zeros((), dtype=dtype, device=q.device) if mask is None else \
                torch.zeros(mask.shape, dtype=dtype, device=q.device).masked_fill_(
                    ~mask, -math.inf)
        column = sinks.to(dtype).view(1, hq, 1, 1).expand(b, hq, lq, 1)
        mask = torch.cat([mask.to(dtype).expand(b, hq, lq, k.shape[2]), column], -1)
        k, v = (torch.cat([x, x.new_zeros((*x.shape[:2], 1, x.shape[3]))], 2) for x in (k, v))
    dtype = _sdpa_dtype(q, mask)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])
    return out.to(q.dtype).contiguous()


@attention.register_fake
def _(q, k, v, mask, is_causal, scale, impl="auto", softcap=0.0, biases=None,
      alibi_slopes=None, window_left=-1, window_right=-1, sinks=None, layout="bhld"):
    reference.ScoreMods.of(softcap, biases, alibi_slopes, window_left, window_right,
                           sinks).check(q, k.shape[2])
    return reference.new_attention_out(q, v.shape[-1], layout)


def _attention_setup(ctx, inputs, output):
    q, k, v, mask, is_causal, scale, *rest = inputs
    ctx.save_for_backward(q, k, v, mask)
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.mods = reference.ScoreMods.of(*rest[1:7])  # after impl, before layout
    ctx.biases_given = len(rest) > 2 and rest[2] is not None  # a list, maybe empty, or None


def _attention_backward(ctx, grad):
    # Recompute through the reference in fp32 and differentiate it: exact gradients, at the
    # memory cost of the unfused math (a Triton backward kernel is future work). The float
    # inputs of the variants (biases, ALiBi slopes, sinks) get gradients too.
    q, k, v, mask = ctx.saved_tensors
    mods = ctx.mods
    float_mask = mask is not None and mask.dtype != torch.bool

    def leaf(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().float().requires_grad_()

    with torch.enable_grad():
        qkv = [leaf(t) for t in (q, k, v)]
        m = leaf(mask) if float_mask else mask
        biases = [leaf(b) for b in mods.biases]
        slopes, sinks = leaf(mods.alibi_slopes), leaf(mods.sinks)
        out = reference.attention(*qkv, m, ctx.is_causal, ctx.scale, dataclasses.replace(
            mods, biases=tuple(biases), alibi_slopes=slopes, sinks=sinks))
        leaves = [t for t in (*qkv, m if float_mask else None, *biases, slopes, sinks)
                  if t is not None]
        grads = iter(torch.autograd.grad(out, leaves, grad.float(), allow_unused=True))

    def back(t: Tensor | None, wanted: bool = True) -> Tensor | None:
        g = next(grads) if wanted and t is not None else None
        return None if g is None else _sum_to_shape(g, t.shape).to(t.dtype)

    dq, dk, dv = (back(t) for t in (q, k, v))
    dmask = back(mask, float_mask)
    dbiases = [back(b) for b in mods.biases] if ctx.biases_given else None
    dslopes, dsinks = back(mods.alibi_slopes), back(mods.sinks)
    # One gradient per argument the op was called with (trailing defaults are not passed).
    return (dq, dk, dv, dmask, None, None, None, None, dbiases, dslopes, None, None,
            dsinks, None)[:len(ctx.needs_input_grad)]


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


# --- w4a16 linear ------------------------------------------------------------------------------


@torch.library.custom_op("attnopt::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bias: Tensor | None,
    group_size: int,
    impl: str = "auto",
) -> Tensor:
    """x @ Wᵀ + bias with W the packed int4 weight of `backends.int4`; `reference.w4a16_linear`.
    x is [..., K] in fp16/bf16 (fp32 is accepted); the result has x's dtype and shape [..., N]."""
    if _use_triton(impl, x):
        from attnopt.backends.triton import w4a16 as kernel

        out = kernel.w4a16_matmul(x.reshape(-1, x.shape[-1]), qweight, scales, zeros,
                                  group_size, bias)
        return out.view(*x.shape[:-1], out.shape[-1])
    if impl == "reference":
        return reference.w4a16_linear(x, qweight, scales, zeros, bias, group_size)
    return int4_cpu.linear(x, qweight, scales, zeros, bias, group_size)


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, bias, group_size, impl="auto"):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# --- moe -----------------------------------------------------------------------------------

# GPT-OSS's clamped SwiGLU constants, the defaults of `alpha` and `limit` (read only by
# activation="swiglu_oai").
SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT = 1.702, 7.0


def _form(activation: str, interleaved: bool, alpha: float, limit: float,
          weight_on_input: bool) -> reference.ExpertForm:
    return reference.ExpertForm(activation, interleaved, alpha, limit, weight_on_input)


@torch.library.custom_op("attnopt::moe", mutates_args=())
def moe(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    activation: str = "silu",
    impl: str = "auto",
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    interleaved: bool = False,
    alpha: float = SWIGLU_OAI_ALPHA,
    limit: float = SWIGLU_OAI_LIMIT,
    weight_on_input: bool = False,
) -> Tensor:
    """Routed experts: out[t] = Σ_j topk_weights[t, j] · (W_down[e] h + b_down[e]),
    h = gated(W_gate_up[e] x[t] + b_gate_up[e]), e = topk_ids[t, j], over x [T, H],
    w_gate_up [E, 2I, H], w_down [E, H, I], optional biases b_gate_up [E, 2I] and
    b_down [E, H]. `activation` ("silu", "gelu", "gelu_tanh" or GPT-OSS's clamped
    "swiglu_oai" with `alpha` and `limit`), `interleaved` (gate/up rows even/odd rather than
    halves) and `weight_on_input` (Llama-4: the weight scales the expert's input) are the
    fields of `reference.ExpertForm`; `reference.moe` states the semantics. The CPU path is
    `moe_cpu.moe`, the Triton one `triton.moe.fused_moe`."""
    form = _form(activation, interleaved, alpha, limit, weight_on_input)
    args = (x, topk_ids, topk_weights, w_gate_up, w_down, form, b_gate_up, b_down)
    if _use_triton(impl, x):
        from attnopt.backends.triton import moe as kernel

        return kernel.fused_moe(*args)
    if impl == "reference":
        return reference.moe(*args)
    return moe_cpu.moe(*args)


@moe.register_fake
def _(x, topk_ids, topk_weights, w_gate_up, w_down, activation="silu", impl="auto",
      b_gate_up=None, b_down=None, interleaved=False, alpha=SWIGLU_OAI_ALPHA,
      limit=SWIGLU_OAI_LIMIT, weight_on_input=False):
    reference.check_moe(x, topk_ids, topk_weights, w_gate_up, w_down,
                        _form(activation, interleaved, alpha, limit, weight_on_input),
                        b_gate_up, b_down)
    return x.new_empty(x.shape)


@torch.library.custom_op("attnopt::moe_backward", mutates_args=())
def moe_backward(
    grad: Tensor,
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    activation: str,
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    interleaved: bool = False,
    alpha: float = SWIGLU_OAI_ALPHA,
    limit: float = SWIGLU_OAI_LIMIT,
    weight_on_input: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of `moe` with respect to x, topk_weights, w_gate_up, w_down, b_gate_up
    and b_down, in fp32 (fp64 for fp64), expert by expert; see `reference.moe_backward`. An
    absent bias gets an empty [0] tensor (an op returns tensors only). An op of its own so that
    tracing a backward graph does not look into the data-dependent expert loop."""
    grads = reference.moe_backward(grad, x, topk_ids, topk_weights, w_gate_up, w_down,
                                   _form(activation, interleaved, alpha, limit,
                                         weight_on_input), b_gate_up, b_down)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@moe_backward.register_fake
def _(grad, x, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up=None,
      b_down=None, interleaved=False, alpha=SWIGLU_OAI_ALPHA, limit=SWIGLU_OAI_LIMIT,
      weight_on_input=False):
    return tuple(x.new_empty(0) if t is None else t.new_empty(t.shape)
                 for t in (x, topk_weights, w_gate_up, w_down, b_gate_up, b_down))


def _moe_setup(ctx, inputs, output):
    x, topk_ids, topk_weights, w_gate_up, w_down, activation, _impl, b_gate_up, b_down, \
        *form = inputs
    ctx.save_for_backward(x, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down)
    ctx.form = (activation, *form)


def _moe_backward(ctx, grad):
    # The routing ids are integers and get no gradient, nor do the form's settings.
    x, topk_ids, topk_weights, w_gate_up, w_down, b_gate_up, b_down = ctx.saved_tensors
    activation, interleaved, alpha, limit, weight_on_input = ctx.form
    dx, dweights, dgate_up, ddown, db_gate_up, db_down = moe_backward(
        grad, x, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up, b_down,
        interleaved, alpha, limit, weight_on_input)
    return (dx, None, dweights, dgate_up, ddown, None, None,
            db_gate_up if b_gate_up is not None else None,
            db_down if b_down is not None else None, None, None, None, None)


moe.register_autograd(_moe_backward, setup_context=_moe_setup)


@torch.library.custom_op("attnopt::moe_w4a16", mutates_args=())
def moe_w4a16(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up_qweight: Tensor,
    gate_up_scales: Tensor,
    gate_up_zeros: Tensor,
    down_qweight: Tensor,
    down_scales: Tensor,
    down_zeros: Tensor,
    group_size: int,
    activation: str = "silu",
    impl: str = "auto",
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    interleaved: bool = False,
    alpha: float = SWIGLU_OAI_ALPHA,
    limit: float = SWIGLU_OAI_LIMIT,
    weight_on_input: bool = False,
) -> Tensor:
    """`moe` with int4 expert weights: the same routed experts (form and float biases
    included), with w_gate_up [E, 2I, H] and w_down [E, H, I] the dequantized packed weights.
    Each expert matrix is packed as `int4.quantize_rtn` packs a 2-D weight, stacked over E:
    gate_up_qweight [E, 2I, Hp/2] uint8, gate_up_scales and gate_up_zeros [E, 2I, Hp/g];
    down_qweight [E, H, Ip/2], down scales and zeros [E, H, Ip/g] (Hp, Ip: H, I rounded up to
    group_size); `reference.moe_w4a16`. The CPU path is `moe_cpu.moe_w4a16` (ATen's int4 CPU
    kernel per non-empty expert: activations rounded to bf16), the Triton one
    `triton.moe.fused_moe_w4a16`. Inference only: there is no autograd formula (the quantize
    pass makes it only in graphs whose weights are frozen)."""
    args = (x, topk_ids, topk_weights, gate_up_qweight, gate_up_scales, gate_up_zeros,
            down_qweight, down_scales, down_zeros, group_size,
            _form(activation, interleaved, alpha, limit, weight_on_input), b_gate_up, b_down)
    if _use_triton(impl, x):
        from attnopt.backends.triton import moe as kernel

        return kernel.fused_moe_w4a16(*args)
    if impl == "reference":
        return reference.moe_w4a16(*args)
    return moe_cpu.moe_w4a16(*args)


@moe_w4a16.register_fake
def _(x, topk_ids, topk_weights, gate_up_qweight, gate_up_scales, gate_up_zeros, down_qweight,
      down_scales, down_zeros, group_size, activation="silu", impl="auto", b_gate_up=None,
      b_down=None, interleaved=False, alpha=SWIGLU_OAI_ALPHA, limit=SWIGLU_OAI_LIMIT,
      weight_on_input=False):
    reference.check_moe_w4a16(x, topk_ids, topk_weights, gate_up_qweight, gate_up_scales,
                              gate_up_zeros, down_qweight, down_scales, down_zeros, group_size,
                              _form(activation, interleaved, alpha, limit, weight_on_input),
                              b_gate_up, b_down)
    return x.new_empty(x.shape)


# --- handing CPU paths to Inductor ------------------------------------------------------------


def _softmax_as_aten(x, dim, scale, bias, mask, fill, keep_mask=False, safe=False, dtype=None,
                     impl="auto"):
    if x.is_cuda or impl != "auto":
        return NotImplemented  # the Triton path (or a forced impl) stays an opaque call
    return reference.softmax(x, dim, scale, bias, mask, fill, keep_mask, safe, dtype)


def inductor_decompositions() -> dict:
    """Ops whose CPU path is plain ATen math, given to Inductor as that math on CPU tensors so
    it fuses them into its loops (an opaque call would be slower there); elsewhere they stay
    opaque calls to our kernels."""
    return {
        torch.ops.attnopt.softmax.default: _softmax_as_aten,
        # attnopt::attention stays opaque: its CPU path is one SDPA call that Inductor would
        # call as it is, behind a check of the inputs for NaN/inf that picks the exact
        # reference path, a data-dependent branch Inductor's trace cannot hold.
        # attnopt::moe stays opaque: its CPU path validates the ids (a data-dependent error),
        # sorts and bins them, and picks torch._grouped_mm or a loop over the non-empty experts
        # from the operands' strides; Inductor would only call the same ATen kernels. So does
        # attnopt::moe_w4a16, whose CPU path calls ATen's int4 kernel once per expert.
    }


def _blocks(pool: Tensor, ids: Tensor) -> Tensor:
    """pool [num_blocks, block_size, ...] read through ids [B, nb]: [B, nb · block_size, ...].
    index_select, not pool[ids]: on CPU advanced indexing takes milliseconds for what
    index_select copies in microseconds."""
    rows = pool.index_select(0, ids.reshape(-1))
    return rows.view(ids.shape[0], ids.shape[1] * pool.shape[1], *pool.shape[2:])


# --- paged KV cache: the gather fallback -------------------------------------------------------


@torch.library.custom_op("attnopt::paged_gather", mutates_args=())
def paged_gather(
    pool: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """A static-cache view of one paged pool [num_blocks, block_size, H, D]: [B, H, nb ·
    block_size, D] in `dtype` (default the pool's), sequence b's token t at position t, read
    through block_table [B, nb]; zeros from seq_lens[b] on. An int8 pool is dequantized with
    its per (token, head) `scale`. What `attnopt.cache.PagedKVCache` returns to unmodified
    attention: a copy, which the kv_cache pass removes by reading the pool in place
    (`paged_attention`). One indexing kernel on every device, so no Triton path."""
    nb, block_size = block_table.shape[1], pool.shape[1]
    dtype = dtype or pool.dtype
    ids = block_table.long()
    x = reference.dequantize_kv(_blocks(pool, ids),
                                None if scale is None else _blocks(scale, ids), dtype)
    present = torch.arange(nb * block_size, device=pool.device) < seq_lens[:, None]
    return torch.where(present[:, :, None, None], x, 0).transpose(1, 2).contiguous()


@paged_gather.register_fake
def _(pool, block_table, seq_lens, scale=None, dtype=None):
    b, nb = block_table.shape
    return pool.new_empty((b, pool.shape[2], nb * pool.shape[1], pool.shape[3]),
                          dtype=dtype or pool.dtype)


# --- paged attention (KV cache) ----------------------------------------------------------------


def paged_attention(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    is_causal: bool = True,
    impl: str = "auto",
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    mask: Tensor | None = None,
    softcap: float = 0.0,
    biases: Sequence[Tensor] | None = None,
    alibi_slopes: Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    sinks: Tensor | None = None,
    layout: str = "bhld",
) -> Tensor:
    """Attention of q [B, Hq, Lq, D] (Lq new tokens per sequence, 1..16 in decode) over each
    sequence's cached keys, read in place from the paged pools k_pool [num_blocks, block_size,
    Hkv, D] and v_pool through block_table [B, max_blocks] and seq_lens [B] (int32); GQA by
    indexing; bottom-right causal against each sequence's own length; int8 pools with per
    (token, head) float32 scales; optionally the model's own `mask`, bool (True = attend) or
    additive, broadcast to [B, Hq, Lq, max_blocks · block_size] (column j: each sequence's j-th
    cached token); and the variants of `attention` (`reference.ScoreMods`; biases laid out as
    the mask). `reference.paged_attention` states the semantics;
    `attnopt.cache.PagedKVCache` holds such pools. The Triton path is split-KV flash decoding
    over the block table (`triton.paged_attention`). The output is laid out as `layout` says,
    as `attention`'s. Inference only: no autograd formula."""
    mods = reference.ScoreMods.of(softcap, biases, alibi_slopes, window_left, window_right,
                                  sinks)
    args = (q, k_pool, v_pool, block_table, seq_lens, scale, is_causal, k_scale, v_scale, mask,
            mods)
    if _use_triton(impl, q):
        from attnopt.backends.triton import paged_attention as kernel

        return kernel.paged_attention(*args, layout=layout)
    if impl == "reference":
        return reference.in_layout(reference.paged_attention(*args), layout)
    return reference.in_layout(_paged_attention_cpu(*args), layout)


paged_attention = torch.library.custom_op(
    "attnopt::paged_attention", paged_attention, mutates_args=(),
    schema="(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_table, Tensor seq_lens, "
           "float scale, bool is_causal=True, str impl=\"auto\", Tensor? k_scale=None, "
           f"Tensor? v_scale=None, Tensor? mask=None, {_MODS_SCHEMA}, "
           "str layout=\"bhld\") -> Tensor")


def _paged_attention_cpu(q, k_pool, v_pool, block_table, seq_lens, scale, is_causal,
                         k_scale, v_scale, mask, mods=reference.PLAIN) -> Tensor:
    """One batched SDPA (which reads grouped K/V unrepeated) over K/V gathered from the blocks
    up to the longest sequence, with a boolean mask for the ragged lengths, the bottom-right
    causal part and the window, combined with the model's mask. Reading seq_lens costs nothing
    on CPU tensors. Non-finite inputs take the reference path, an additive mask wider than q
    runs SDPA in its dtype, and what one SDPA mask cannot add exactly (softcap, sinks, two
    additive terms) takes the reference math, as in `_attention_cpu`."""
    reference.check_paged_attention(q, k_pool, v_pool, block_table, seq_lens, k_scale, v_scale,
                                    mask, mods)
    b, hq, lq, _ = q.shape
    block_size = k_pool.shape[1]
    lens = seq_lens.to(device=q.device, dtype=torch.int64)
    lk_max = int(lens.max()) if b else 0
    if lk_max == 0 or q.numel() == 0:
        return q.new_zeros((b, hq, lq, v_pool.shape[3]))
    nb = -(-lk_max // block_size)
    # Entries past a sequence's length may hold anything: point them at block 0 (masked out).
    used = torch.arange(nb, device=q.device) * block_size < lens[:, None]
    ids = torch.where(used, block_table[:, :nb].long(), 0)

    def gather(pool, pool_scale):  # [B, H, nb · block_size, D] in q's dtype
        x = _blocks(pool, ids)
        if pool_scale is not None:
            x = reference.dequantize_kv(x, _blocks(pool_scale, ids), q.dtype)
        return x.to(q.dtype).transpose(1, 2)

    k, v = gather(k_pool, k_scale), gather(v_pool, v_scale)
    if not _all_finite(q, k, v):  # stale blocks past a length are never read: see `ids`
        return reference.paged_attention(q, k_pool, v_pool, block_table, seq_lens, scale,
                                         is_causal, k_scale, v_scale, mask, mods)

    # The columns of the gathered keys, to which the mask and the biases are cut.
    width = nb * block_size
    keys = torch.arange(width, device=q.device)
    positions = lens[:, None] - lq + torch.arange(lq, device=q.device)  # [B, Lq]: p_i
    rel = (keys - positions[:, :, None])[:, None]  # [B, 1, Lq, Lk]
    attn_mask = _sdpa_mask(
        None if mask is None else mask[..., :width], rel, is_causal,
        reference.compute_dtype(q.dtype),
        dataclasses.replace(mods, biases=tuple(t[..., :width] for t in mods.biases)))
    if isinstance(attn_mask, str):
        return reference.paged_attention(q, k_pool, v_pool, block_table, seq_lens, scale,
                                         is_causal, k_scale, v_scale, mask, mods)
    # Past each sequence's length nothing is read: -inf (or False) there, whatever the rest.
    present = (keys < lens[:, None, None])[:, None]  # [B, 1, 1, Lk]
    if attn_mask is None or attn_mask.dtype == torch.bool:
        attn_mask = present if attn_mask is None else present & attn_mask
    else:
        attn_mask = torch.where(present, attn_mask, -math.inf)
    # Rows left with no key come out of SDPA as 0 (torch >= 2.5), from a bool mask and from an
    # all -inf float one alike.
    return _sdpa(q, k, v, attn_mask, False, scale, mods.sinks)


@paged_attention.register_fake
def _(q, k_pool, v_pool, block_table, seq_lens, scale, is_causal=True, impl="auto",
      k_scale=None, v_scale=None, mask=None, softcap=0.0, biases=None, alibi_slopes=None,
      window_left=-1, window_right=-1, sinks=None, layout="bhld"):
    reference.check_paged_attention(q, k_pool, v_pool, block_table, seq_lens, k_scale, v_scale,
                                    mask, reference.ScoreMods.of(
                                        softcap, biases, alibi_slopes, window_left,
                                        window_right, sinks))
    return reference.new_attention_out(q, v_pool.shape[3], layout)


# --- attention with past K/V (DynamicCache, for export) ----------------------------------------


def attention_with_past(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
    impl: str = "auto",
    softcap: float = 0.0,
    biases: Sequence[Tensor] | None = None,
    alibi_slopes: Tensor | None = None,
    window_left: int = -1,
    window_right: int = -1,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, present_k, present_v): `attention` over present_k = cat([past_k, k], 2) and
    present_v likewise, bottom-right causal over the present keys, with `attention`'s
    variants; `reference.attention_with_past`. It exists for export: ONNX's Attention takes the
    past and returns the present itself (`backends/onnx.py`), where transformers' DynamicCache
    step is a concatenation beside the attention. Run in PyTorch the concatenation is a copy
    whatever does it, so every path is the concatenation and then `attention`'s own path (SDPA
    on CPU, the Triton kernel on CUDA). Inference only: no autograd formula."""
    variants = (softcap, biases, alibi_slopes, window_left, window_right, sinks)
    if impl == "reference":
        return reference.attention_with_past(q, k, v, past_k, past_v, mask, is_causal, scale,
                                             reference.ScoreMods.of(*variants))
    present_k, present_v = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
    return (attention(q, present_k, present_v, mask, is_causal, scale, impl, *variants),
            present_k, present_v)


attention_with_past = torch.library.custom_op(
    "attnopt::attention_with_past", attention_with_past, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor past_k, Tensor past_v, Tensor? mask, "
           f"bool is_causal, float scale, str impl=\"auto\", {_MODS_SCHEMA}) "
           "-> (Tensor, Tensor, Tensor)")


@attention_with_past.register_fake
def _(q, k, v, past_k, past_v, mask, is_causal, scale, impl="auto", softcap=0.0, biases=None,
      alibi_slopes=None, window_left=-1, window_right=-1, sinks=None):
    present_k = k.new_empty((*k.shape[:2], past_k.shape[2] + k.shape[2], k.shape[3]))
    present_v = v.new_empty((*v.shape[:2], past_v.shape[2] + v.shape[2], v.shape[3]))
    reference.ScoreMods.of(softcap, biases, alibi_slopes, window_left, window_right,
                           sinks).check(q, present_k.shape[2])
    return q.new_empty((*q.shape[:-1], v.shape[-1])), present_k, present_v


# --- multi-head latent attention (MLA decoded from its latent) -----------------------------------


@torch.library.custom_op("attnopt::latent_attention", mutates_args=())
def latent_attention(
    q_lat: Tensor,
    q_rot: Tensor,
    c_kv: Tensor,
    k_rot: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
    impl: str = "auto",
) -> Tensor:
    """softmax((q_lat · c_kvᵀ + q_rot · k_rotᵀ) · scale + mask) · c_kv over a contiguous latent
    c_kv [B, 1, Lk, R] and rotary key k_rot [B, 1, Lk, P], for q_lat [B, H, Lq, R] and q_rot
    [B, H, Lq, P]: DeepSeek's MLA in the absorbed form, every query head reading the one latent
    head; `reference.latent_attention`. The Triton path is the paged kernel reading the latent
    as one block per sequence. Inference only: no autograd formula."""
    if _use_triton(impl, q_lat):
        from attnopt.backends.triton import latent_attention as kernel

        return kernel.latent_attention(q_lat, q_rot, c_kv, k_rot, mask, is_causal, scale)
    if impl == "reference":
        return reference.latent_attention(q_lat, q_rot, c_kv, k_rot, mask, is_causal, scale)
    reference.check_latent_attention(q_lat, q_rot, c_kv, k_rot)
    if not _all_finite(q_lat, q_rot, c_kv, k_rot):
        return reference.latent_attention(q_lat, q_rot, c_kv, k_rot, mask, is_causal, scale)
    lq, lk = q_lat.shape[2], c_kv.shape[2]
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q_lat.device).tril(lk - lq)
        mask = keep if mask is None else (
            mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, -math.inf))
    return _latent_sdpa(q_lat, q_rot, c_kv, k_rot, mask, scale)


def _latent_sdpa(q_lat: Tensor, q_rot: Tensor, c_kv: Tensor, k_rot: Tensor,
                 mask: Tensor | None, scale: float) -> Tensor:
    """The CPU paths' attention over the latent: one SDPA call with the H query heads folded
    into the query rows ([B, 1, H · Lq, R + P] against the single latent head), so that neither
    the latent nor the scores are repeated per head (SDPA's enable_gqa would copy the keys H
    times); `mask` (broadcasting to [B, H, Lq, Lk]) folded the same way. Rows left with no key
    come out of SDPA as 0, as `reference.attention` gives them."""
    b, h, lq, rank = q_lat.shape
    lk = c_kv.shape[2]
    dtype = _sdpa_dtype(q_lat, mask)
    q = torch.cat((q_lat, q_rot), -1).to(dtype).reshape(b, 1, h * lq, -1)
    k = torch.cat((c_kv, k_rot), -1).to(dtype)
    if mask is not None:
        mask = mask.expand(b, h, lq, lk).reshape(b, 1, h * lq, lk)
        mask = mask if mask.dtype == torch.bool else mask.to(dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, c_kv.to(dtype), attn_mask=mask,
                                                           scale=scale)
    return out.view(b, h, lq, rank).to(q_lat.dtype).contiguous()


@latent_attention.register_fake
def _(q_lat, q_rot, c_kv, k_rot, mask, is_causal, scale, impl="auto"):
    reference.check_latent_attention(q_lat, q_rot, c_kv, k_rot)
    return q_lat.new_empty(q_lat.shape)


@torch.library.custom_op("attnopt::paged_latent_attention", mutates_args=())
def paged_latent_attention(
    q_lat: Tensor,
    q_rot: Tensor,
    ckv_pool: Tensor,
    krot_pool: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    is_causal: bool = True,
    impl: str = "auto",
    ckv_scale: Tensor | None = None,
    krot_scale: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """`latent_attention` over a paged latent cache read in place: ckv_pool [num_blocks,
    block_size, 1, R] and krot_pool [num_blocks, block_size, 1, P] (a `PagedKVCache` layer of an
    MLA model) through block_table [B, max_blocks] and seq_lens [B], with `paged_attention`'s
    causal, mask and int8 conventions; `reference.paged_latent_attention`. The Triton path is
    split-KV flash decoding over the latent (`triton.latent_attention`), each latent tile read
    once as key and as value for every query head. Inference only: no autograd formula."""
    if _use_triton(impl, q_lat):
        from attnopt.backends.triton import latent_attention as kernel

        return kernel.paged_latent_attention(q_lat, q_rot, ckv_pool, krot_pool, block_table,
                                             seq_lens, scale, is_causal, ckv_scale, krot_scale,
                                             mask)
    if impl == "reference":
        return reference.paged_latent_attention(q_lat, q_rot, ckv_pool, krot_pool, block_table,
                                                seq_lens, scale, is_causal, ckv_scale,
                                                krot_scale, mask)
    return _paged_latent_attention_cpu(q_lat, q_rot, ckv_pool, krot_pool, block_table, seq_lens,
                                       scale, is_causal, ckv_scale, krot_scale, mask)


def _paged_latent_attention_cpu(q_lat, q_rot, ckv_pool, krot_pool, block_table, seq_lens, scale,
                                is_causal, ckv_scale, krot_scale, mask) -> Tensor:
    """The latent and rotary key gathered out of the blocks up to the longest sequence, then
    `_latent_sdpa` with the ragged lengths and the bottom-right causal part folded into the
    model's mask, as `_paged_attention_cpu` does for K/V."""
    reference.check_paged_latent_attention(q_lat, q_rot, ckv_pool, krot_pool, block_table,
                                           seq_lens, ckv_scale, krot_scale, mask)
    b, _, lq, _ = q_lat.shape
    block_size = ckv_pool.shape[1]
    lens = seq_lens.to(device=q_lat.device, dtype=torch.int64)
    lk_max = int(lens.max()) if b else 0
    if lk_max == 0 or q_lat.numel() == 0:
        return q_lat.new_zeros(q_lat.shape)
    nb = -(-lk_max // block_size)
    # Entries past a sequence's length may hold anything: point them at block 0 (masked out).
    used = torch.arange(nb, device=q_lat.device) * block_size < lens[:, None]
    ids = torch.where(used, block_table[:, :nb].long(), 0)

    def gather(pool, pool_scale):  # [B, 1, nb · block_size, width] in q's dtype
        x = _blocks(pool, ids)
        if pool_scale is not None:
            x = reference.dequantize_kv(x, _blocks(pool_scale, ids), q_lat.dtype)
        return x.to(q_lat.dtype).transpose(1, 2)

    c_kv, k_rot = gather(ckv_pool, ckv_scale), gather(krot_pool, krot_scale)
    if not _all_finite(q_lat, q_rot, c_kv, k_rot):  # stale blocks are never read: see `ids`
        return reference.paged_latent_attention(q_lat, q_rot, ckv_pool, krot_pool, block_table,
                                                seq_lens, scale, is_causal, ckv_scale,
                                                krot_scale, mask)
    keys = torch.arange(nb * block_size, device=q_lat.device)
    keep = keys < lens[:, None, None]  # [B, 1, Lk]
    if is_causal:
        last = lens[:, None, None] - lq + torch.arange(lq, device=q_lat.device)[:, None]
        keep = keep & (keys <= last)  # [B, Lq, Lk]
    attn_mask = keep[:, None]
    if mask is not None:
        mask = mask[..., :nb * block_size]
        attn_mask = (attn_mask & mask if mask.dtype == torch.bool
                     else torch.where(attn_mask, mask.to(_sdpa_dtype(q_lat, mask)), -math.inf))
    return _latent_sdpa(q_lat, q_rot, c_kv, k_rot, attn_mask, scale)


@paged_latent_attention.register_fake
def _(q_lat, q_rot, ckv_pool, krot_pool, block_table, seq_lens, scale, is_causal=True,
      impl="auto", ckv_scale=None, krot_scale=None, mask=None):
    reference.check_paged_latent_attention(q_lat, q_rot, ckv_pool, krot_pool, block_table,
                                           seq_lens, ckv_scale, krot_scale, mask)
    return q_lat.new_empty(q_lat.shape)
