"""ONNX translations of the attnopt ops, for `torch.onnx.export(..., dynamo=True,
custom_translation_table=TRANSLATIONS, opset_version=OPSET)`, then `optimize(model)`.

Each translation is an ONNX Script function traced at export time: its tensor arguments are the
exporter's symbolic values (with the dtypes and shapes torch.export recorded), its other
arguments plain Python values. What each op becomes, and why (each checked in ONNX Runtime's
CPU provider against `backends/reference.py` by tests/backends/test_onnx.py):

- `attnopt::attention` -> the standard `Attention` op of opset 23. ORT's CPU kernel reads
  grouped K/V as they are (GQA, MQA), takes boolean and additive masks, gives 0 for a query row
  whose keys are all masked (as our op does) and is exact to fp32 rounding, so no contrib op
  or hand-written MatMul/Softmax chain is needed. Two adapters: its `is_causal` aligns the
  diagonal to the past cache (top-left without one), ours bottom-right, so the flag is set only
  when Lq == Lk is known at export time and otherwise the bottom-right mask is built from the
  runtime sizes and combined with the mask; and ORT wants the mask's query and key dims spelled
  out, so a mask that broadcasts over queries (or keys) is expanded to [..., Lq, Lk].
  The variants: the softcap is Attention's own `softcap` attribute (ORT applies it where the
  op does, after the scale and before the mask: checked); a window is a band of keys built
  from the runtime sizes, ANDed into the mask; ALiBi is its bias slopes[h] · (j - p_i), and
  the additive terms (biases, ALiBi, a float mask) become the one mask ORT adds, summed in
  fp32 first (the op adds them one at a time: equal to fp32 rounding). Sinks are one more
  key around the op: K and V get a row of zeros and the mask a last column holding each
  head's sink, so the softmax has e^sink in its denominator and a value of 0 for it.
- `attnopt::attention_with_past` -> the same `Attention` with its `past_key`/`past_value`
  inputs and its `present_key`/`present_value` outputs, which ORT concatenates itself (an empty
  past too), so the graph holds no Concat of the cache. With a past, ORT's causal diagonal is
  offset by the past's length (query i sees keys up to P + i, checked against the reference):
  ours, bottom-right over the P + Lk present keys, when the new keys are as many as the queries,
  so the flag is set when that is known at export and the mask is built otherwise, as for
  `attention`. The mask must span the present keys ([..., Lq, P + Lk]; the same expansion).
- `attnopt::latent_attention` (MLA decoded from its latent) -> standard ops: two MatMuls for
  the scores against the one latent head (broadcast over the query heads), the mask and causal
  band as Where/Add, Softmax with rows that see no key set to 0, and a MatMul by the latent
  (see the function for why not `Attention`).
- `attnopt::softmax` -> `Softmax` over the one axis, with its pre-ops as Mul / Add / Where and
  the fp32 upcast and cast back as Casts, in the order `reference.softmax` applies them.
- `attnopt::w4a16_linear` -> ORT's `com.microsoft::MatMulNBits` (bits=4). Our packed weight
  `[N, Kp/2]` is its `B` reshaped to `[N, Kp/g, g/2]`; scales flatten. ORT takes the zero
  points either packed as uint8 or in the scales' dtype; both are exact, but only uint8 reaches
  MLAS's int4 kernels (0.8 ms against 13 ms for a 2048² layer at M=1), so our integer-valued
  float zeros are packed two per byte, low nibble first. `K` is the unpadded in_features: the
  padding columns of B are never read. `accuracy_level` stays unset (fp32 arithmetic):
  level 4 quantizes activations to int8, faster, ~0.5% off. The reshapes and the packing read
  only initializers; `optimize` folds them into initializers of their own, which ORT prepacks.
- `attnopt::moe` -> standard ops, one branch per expert (E is fixed at export): NonZero finds
  the (token, slot) pairs routed to expert e, their tokens are gathered, the gated MLP runs as
  two `Gemm`s on those rows only, and the weighted rows are scattered by pair into a [T·k, H]
  buffer whose k rows per token are summed (`_routed_experts` says why by pair). ORT's
  `com.microsoft::MoE` does not fit: it takes router logits and does its own softmax and
  top-k, where our op is handed the chosen ids and weights (which need not sum to 1, and may
  name one expert twice), and its CPU kernel gates only with SwiGLU (GEGLU is CUDA-only). Every
  `ExpertForm` is translated: per-expert biases (Gather + Add), interleaved gate/up (Slices of
  step 2), GPT-OSS's clamped SwiGLU (Clip, Sigmoid), the routing weight on the input. A
  dense form (every expert on every token, weighted by a [T, E] combine matrix) would be
  fewer nodes but E/k times the FLOPs. Arithmetic as `reference.moe`: fp32 (fp64 for fp64),
  16-bit weights cast to fp32 in the graph and the intermediate rounded to x's dtype. ORT
  folds the per-expert slices (and casts) of initializer weights into initializers of their
  own at session start, so no weight is copied at run time (about 15 nodes per expert).
- `attnopt::moe_w4a16` -> the same graph with each expert matrix one `MatMulNBits` (2E of
  them), laid out as for `w4a16_linear` and folded by `optimize`, so ORT's int4 kernels read
  the packed weights; dequantizing in the graph instead (DequantizeLinear on blocked uint4, or
  nibble arithmetic) would feed fp32 weights to MatMul, dequantized at every run or folded
  into fp32 copies 8 times the size. `com.microsoft::QMoE` does not
  fit for MoE's reasons, and needs H and I divisible by the block size where ours pads. The
  activations and scales go in as fp32, as the reference dequantizes in fp32 (MatMulNBits
  then computes exactly that); fp64 activations are refused (MatMulNBits has no fp64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnxscript
import onnxscript.optimizer
import torch
from onnx.defs import OpSchema
from onnxscript import ir
from onnxscript import opset23 as op
from onnxscript.onnx_types import TensorType as Tensor

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.backends.ops import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT
from attnopt.backends.reference import PLAIN, ExpertForm, ScoreMods

OPSET = 23


def _matmul_nbits() -> onnxscript.values.Op:
    """ORT's contrib op, which onnx's schema registry does not know: its schema, as ORT's
    ContribOperators.md documents it, so that ONNX Script can record calls to it."""
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                param("zero_points", "T3", param_option=optional),
                param("g_idx", "T4", param_option=optional),
                param("bias", "T1", param_option=optional)],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
            ("T2", ["tensor(uint8)"], "packed weight"),
            ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
             "zero points"),
            ("T4", ["tensor(int32)"], "group index")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT)
                    for name in ("K", "N", "bits", "block_size")]
        + [OpSchema.Attribute("accuracy_level", OpSchema.AttrType.INT, required=False)])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits",
                                schema)


MATMUL_NBITS = _matmul_nbits()


def _compute_type(dtype: ir.DataType) -> ir.DataType:
    """`reference.compute_dtype` for ONNX types: fp32, or fp64 for fp64."""
    return ir.DataType.DOUBLE if dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def _scalar(value: float, dtype: ir.DataType) -> Tensor:
    return op.Constant(value=ir.tensor(value, dtype=dtype))


def _ints(*values: int) -> Tensor:
    return op.Constant(value_ints=list(values))


def _cast(x: Tensor, dtype: ir.DataType) -> Tensor:
    """x in `dtype`; x must be an input of the translation (values made in it have no dtype
    until ONNX shape inference runs)."""
    return x if x.dtype == dtype else op.Cast(x, to=dtype)


def _static(dim: int | ir.SymbolicDim) -> int | None:
    """A dim's size if it is fixed. torch.export can leave a size it specialised as a symbol
    named by its value (SymbolicDim('64')), which counts as fixed too."""
    if isinstance(dim, int):
        return dim
    return int(dim.value) if isinstance(dim.value, str) and dim.value.isdigit() else None


def _known_equal(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    """Two dims equal whatever the inputs: the same size, or the same named symbolic size."""
    if _static(a) is not None or _static(b) is not None:
        return _static(a) == _static(b)
    return a == b and a.value is not None


# --- softmax ---------------------------------------------------------------------------------


def softmax(x: Tensor, dim: int, scale: float, bias: Tensor | None, mask: Tensor | None,
            fill: float, keep_mask: bool = False, safe: bool = False,
            dtype: int | None = None, impl: str = "auto") -> Tensor:
    """softmax(where(mask, fill, x * scale + bias), dim) computed in fp32 (`reference.softmax`).
    `dtype` arrives as an ONNX type number; None or -1 means x's type."""
    compute = _compute_type(x.dtype)
    s = _cast(x, compute)
    if scale != 1.0:
        s = op.Mul(s, _scalar(scale, compute))
    if bias is not None:
        s = op.Add(s, _cast(bias, compute))
    if mask is not None:
        s = op.Where(op.Not(mask) if keep_mask else mask, _scalar(fill, compute), s)
    y = op.Softmax(s, axis=dim)
    if safe:  # rows whose scores are all -inf give 0 (aten._safe_softmax), not NaN
        row_max = op.ReduceMax(s, _ints(dim), keepdims=1)
        y = op.Where(op.Equal(row_max, _scalar(-math.inf, compute)), _scalar(0.0, compute), y)
    out = x.dtype if dtype is None or dtype == -1 else ir.DataType(dtype)
    return y if out == compute else op.Cast(y, to=out)


# --- attention -------------------------------------------------------------------------------


def _length(x: Tensor) -> Tensor:
    """x.shape[2:3] (the sequence length of [B, H, L, D]) as a 1-D tensor, read at run time."""
    return op.Shape(x, start=2, end=3)


def _relative_positions(lq: Tensor, lk: Tensor) -> Tensor:
    """[Lq, Lk] int64: j - p_i with p_i = i + (Lk - Lq), bottom-right as
    `reference.relative_positions`."""
    lq, lk = op.Squeeze(lq), op.Squeeze(lk)
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    rows = op.Add(op.Range(zero, lq, one), op.Sub(lk, lq))
    cols = op.Range(zero, lk, one)
    return op.Sub(op.Unsqueeze(cols, _ints(0)), op.Unsqueeze(rows, _ints(1)))


def _band(rel: Tensor, left: int, right: int) -> Tensor:
    """[Lq, Lk] boolean: p_i - left <= j <= p_i + right (-1: unbounded; not both)."""
    keep = None
    if right >= 0:
        keep = op.LessOrEqual(rel, op.Constant(value_int=right))
    if left >= 0:
        after = op.GreaterOrEqual(rel, op.Constant(value_int=-left))
        keep = after if keep is None else op.And(keep, after)
    return keep


def _spelled_out(mask: Tensor, q: Tensor, lq: Tensor, lk: Tensor) -> Tensor:
    """A mask (or bias) of the caller's with its query and key dims spelled out, [..., Lq, Lk],
    as ORT wants them: one that broadcasts over queries or keys is expanded (its leading dims
    still broadcast)."""
    rank = len(mask.shape)
    if (rank >= 2 and _known_equal(mask.shape[-2], q.shape[2])
            and _static(mask.shape[-1]) != 1):
        return mask
    ones = [_ints(*[1] * (rank - 2))] if rank > 2 else []
    return op.Expand(mask, op.Concat(*ones, lq, lk, axis=0))


def _ort_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
                   scale: float, past_k: Tensor | None = None, past_v: Tensor | None = None,
                   mods: ScoreMods = PLAIN) -> tuple[Tensor, ...]:
    """ORT's `Attention` over the keys cat([past_k, k]) (k alone without a past), with our mask
    and causal conventions and the variants `mods`; (Y, present_key, present_value)."""
    # Values made here have no dtype or shape until ONNX shape inference: read the inputs'.
    lq = _length(q)
    lk = _length(k) if past_k is None else op.Add(_length(past_k), _length(k))
    # ORT's causal diagonal ends at the past's length plus the query's index: ours (the last
    # key's) where the new keys are as many as the queries. Elsewhere, and with a window or a
    # sink key added, the causal part is a mask.
    flag = (is_causal and _known_equal(q.shape[2], k.shape[2]) and not mods.windowed
            and mods.sinks is None)
    rel = _relative_positions(lq, lk)
    right = mods.window_right
    if is_causal and not flag:
        right = 0 if right < 0 else min(right, 0)
    keep = _band(rel, mods.window_left, right) if (right >= 0 or mods.window_left >= 0) \
        else None
    additive = [_spelled_out(b, q, lq, lk) for b in mods.biases]
    if mods.alibi_slopes is not None:
        slopes = op.Reshape(_cast(mods.alibi_slopes, ir.DataType.FLOAT), _ints(-1, 1, 1))
        additive.append(op.Mul(slopes, op.Cast(rel, to=ir.DataType.FLOAT)))
    if mask is not None:
        boolean = mask.dtype == ir.DataType.BOOL  # read before: values made here have none
        mask = _spelled_out(mask, q, lq, lk)
        if boolean:
            keep = mask if keep is None else op.And(keep, mask)
        else:
            additive.append(mask)
    attn_mask = keep
    if additive:
        # ORT adds one mask, in the inputs' type: the terms are summed first (in fp32), which
        # rounds them in another order than the op's one add at a time — equal to fp32
        # rounding; a finfo.min fill stays the fill.
        compute = _compute_type(q.dtype)
        total = op.Cast(additive[0], to=compute)
        for term in additive[1:]:
            total = op.Add(total, op.Cast(term, to=compute))
        total = op.Cast(total, to=q.dtype)
        attn_mask = total if keep is None else op.Where(keep, total,
                                                        _scalar(-math.inf, q.dtype))
    softcap = {"softcap": mods.softcap} if mods.softcap else {}
    if mods.sinks is None:
        return op.Attention(q, k, v, attn_mask, past_k, past_v, is_causal=int(flag),
                            scale=scale, **softcap)[:3]
    # Sinks: one more key whose value row is 0 and whose logit is the sink (its q·k is 0, and
    # so is its softcap), put there by the mask's last column. The present K/V are
    # concatenated here, so the sink key stays out of them.
    present_k = k if past_k is None else op.Concat(past_k, k, axis=2)
    present_v = v if past_v is None else op.Concat(past_v, v, axis=2)
    rows = op.Shape(q, start=0, end=3)  # [B, Hq, Lq]
    if attn_mask is None:
        attn_mask = _scalar(0.0, q.dtype)
    elif keep is not None and not additive:
        attn_mask = op.Where(keep, _scalar(0.0, q.dtype), _scalar(-math.inf, q.dtype))
    attn_mask = op.Expand(attn_mask, op.Concat(rows, lk, axis=0))
    column = op.Expand(op.Reshape(_cast(mods.sinks, q.dtype), _ints(1, -1, 1, 1)),
                       op.Concat(rows, _ints(1), axis=0))
    y = op.Attention(q, _with_zero_row(present_k), _with_zero_row(present_v),
                     op.Concat(attn_mask, column, axis=-1), scale=scale, **softcap)[0]
    return y, present_k, present_v


def _with_zero_row(x: Tensor) -> Tensor:
    """x [B, H, L, D] with one more row of zeros along L."""
    shape = op.Concat(op.Shape(x, start=0, end=2), _ints(1), op.Shape(x, start=3, end=4),
                      axis=0)
    return op.Concat(x, op.ConstantOfShape(shape, value=ir.tensor([0.0], dtype=x.dtype)),
                     axis=2)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
              scale: float, impl: str = "auto", softcap: float = 0.0,
              biases: list[Tensor] | None = None, alibi_slopes: Tensor | None = None,
              window_left: int = -1, window_right: int = -1,
              sinks: Tensor | None = None, layout: str = "bhld") -> Tensor:
    """softmax(q @ kᵀ * scale + mask) @ v with GQA, bottom-right causal and the variants
    (`reference.attention`). `layout` is a memory layout, which ONNX tensors do not have."""
    # Attention also has optional outputs (present K/V, the scores); `optimize` drops them.
    mods = ScoreMods.of(softcap, biases, alibi_slopes, window_left, window_right, sinks)
    return _ort_attention(q, k, v, mask, is_causal, scale, mods=mods)[0]


def attention_with_past(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor,
                        mask: Tensor | None, is_causal: bool, scale: float, impl: str = "auto",
                        softcap: float = 0.0, biases: list[Tensor] | None = None,
                        alibi_slopes: Tensor | None = None, window_left: int = -1,
                        window_right: int = -1, sinks: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(out, present_k, present_v): `attention` over cat([past, new]) for K and V
    (`reference.attention_with_past`), ORT concatenating the present itself (but with sinks)."""
    mods = ScoreMods.of(softcap, biases, alibi_slopes, window_left, window_right, sinks)
    return _ort_attention(q, k, v, mask, is_causal, scale, past_k, past_v, mods)



def latent_attention(q_lat: Tensor, q_rot: Tensor, c_kv: Tensor, k_rot: Tensor,
                     mask: Tensor | None, is_causal: bool, scale: float, impl: str = "auto"
                     ) -> Tensor:
    """MLA in the absorbed form (`reference.latent_attention`) as standard ops, in the
    reference's precision (fp32, fp64 for fp64): scores q_lat · c_kvᵀ + q_rot · k_rotᵀ, two
    MatMuls that broadcast the one latent head over the query heads (nothing is concatenated
    or repeated per head), then the mask, the bottom-right causal band, Softmax with rows that
    see no key set to 0, and the probabilities times c_kv. Not ORT's `Attention`: its query and
    key would be Concats of the rotary parts onto q_lat and onto the whole latent, a copy of
    the cache per step."""
    compute = _compute_type(q_lat.dtype)
    scores = op.Add(op.MatMul(_cast(q_lat, compute), op.Transpose(_cast(c_kv, compute),
                                                                  perm=[0, 1, 3, 2])),
                    op.MatMul(_cast(q_rot, compute), op.Transpose(_cast(k_rot, compute),
                                                                  perm=[0, 1, 3, 2])))
    scores = op.Mul(scores, _scalar(scale, compute))
    minus_inf = _scalar(-math.inf, compute)
    if mask is not None:
        scores = (op.Where(mask, scores, minus_inf) if mask.dtype == ir.DataType.BOOL
                  else op.Add(scores, _cast(mask, compute)))
    if is_causal:
        causal = _band(_relative_positions(_length(q_lat), _length(c_kv)), -1, 0)
        scores = op.Where(causal, scores, minus_inf)
    probs = op.Softmax(scores, axis=-1)
    blind = op.Equal(op.ReduceMax(scores, _ints(-1), keepdims=1), minus_inf)  # sees no key
    out = op.MatMul(op.Where(blind, _scalar(0.0, compute), probs), _cast(c_kv, compute))
    return out if q_lat.dtype == compute else op.Cast(out, to=q_lat.dtype)


# --- w4a16 linear ----------------------------------------------------------------------------


def _packed_zero_points(zeros: Tensor, blocks: int) -> Tensor:
    """[N, blocks] integer-valued floats -> [N * ceil(blocks / 2)] uint8, the even block in the
    low nibble, each row padded to whole bytes (MatMulNBits' zero_points layout)."""
    z = op.Cast(zeros, to=ir.DataType.UINT8)
    if blocks % 2:
        z = op.Pad(z, _ints(0, 0, 0, 1))
    low = op.Slice(z, _ints(0), _ints(blocks + 1), _ints(1), _ints(2))
    high = op.Slice(z, _ints(1), _ints(blocks + 1), _ints(1), _ints(2))
    four = op.Constant(value=ir.tensor(4, dtype=ir.DataType.UINT8))
    return op.Reshape(op.BitwiseOr(low, op.BitShift(high, four, direction="LEFT")), _ints(-1))


def _in_features(x: Tensor, what: str) -> int:
    """x's last dim, which MatMulNBits takes as an attribute (K), so it must be fixed."""
    k = _static(x.shape[-1])
    if k is None:
        raise ValueError(f"attnopt ONNX export: {what} has {x.shape[-1]} features, a size known "
                         "only at run time; MatMulNBits needs it fixed. Export with example "
                         "inputs that fix the model's hidden size")
    return k


def _int4_matmul(a: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, n: int, k: int,
                 half_kp: int, group_size: int, bias: Tensor | None = None) -> Tensor:
    """a @ Wᵀ (+ bias) through MatMulNBits, W given by the 2-D tensors of `backends/int4.py`:
    qweight [n, half_kp], zeros [n, blocks], scales [n, blocks] already in a's dtype. Their
    shapes are passed in, as values made in a translation have none until shape inference."""
    blocks = half_kp * 2 // group_size
    b = op.Reshape(qweight, _ints(n, blocks, group_size // 2))
    inputs = [a, b, op.Reshape(scales, _ints(-1)), _packed_zero_points(zeros, blocks)]
    if bias is not None:
        inputs += [None, bias]  # no g_idx
    return MATMUL_NBITS(*inputs, K=k, N=n, bits=4, block_size=group_size)


def w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None,
                 group_size: int, impl: str = "auto") -> Tensor:
    """x @ Wᵀ + bias with W the packed int4 weight of `backends/int4.py`."""
    n, half_kp = (int(d) for d in qweight.shape)
    k = _in_features(x, "a w4a16 linear's input")
    return _int4_matmul(x, qweight, _cast(scales, x.dtype), zeros, n, k, half_kp, group_size,
                        None if bias is None else _cast(bias, x.dtype))


# --- mixture of experts ----------------------------------------------------------------------


def _gated(gate_up: Tensor, inter: int, form: ExpertForm) -> Tensor:
    """`ExpertForm.gated` on [n, 2I] rows: the gate/up split (halves, or even/odd columns when
    interleaved) and the activation. Opset 23 has no SiLU op: gate · sigmoid(gate); the
    clamped SwiGLU's clamps are Clips (NaN stays NaN, as in torch.clamp)."""
    if form.interleaved:
        gate = op.Slice(gate_up, _ints(0), _ints(2 * inter), _ints(1), _ints(2))
        up = op.Slice(gate_up, _ints(1), _ints(2 * inter), _ints(1), _ints(2))
    else:
        gate = op.Slice(gate_up, _ints(0), _ints(inter), _ints(1))
        up = op.Slice(gate_up, _ints(inter), _ints(2 * inter), _ints(1))
    if form.activation == "silu":
        return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
    if form.activation in ("gelu", "gelu_tanh"):
        approximate = "tanh" if form.activation == "gelu_tanh" else "none"
        return op.Mul(op.Gelu(gate, approximate=approximate), up)
    if form.activation == "swiglu_oai":
        dtype = gate_up.dtype
        limit = _scalar(form.limit, dtype)
        g = op.Clip(gate, None, limit)
        u = op.Clip(up, _scalar(-form.limit, dtype), limit)
        glu = op.Mul(g, op.Sigmoid(op.Mul(g, _scalar(form.alpha, dtype))))
        return op.Mul(op.Add(u, _scalar(1.0, dtype)), glu)
    raise ValueError(f"attnopt ONNX export: moe activation {form.activation!r} has no "
                     "translation")


def _expert_dims(weight: Tensor) -> tuple[int, ...]:
    """The sizes of a stacked expert weight [E, ...], which must be fixed: the translation emits
    each expert's computation."""
    dims = tuple(_static(d) for d in weight.shape)
    if None in dims:
        raise ValueError(f"attnopt ONNX export: a moe's expert weight is {weight.shape}, "
                         "sizes known only at run time; the translation needs them fixed. "
                         "Export with the weights as constants of the model")
    return dims


def _expert(stacked: Tensor, e: int) -> Tensor:
    """stacked[e], one expert's matrix of an [E, ...] weight."""
    return op.Gather(stacked, op.Constant(value_int=e), axis=0)


Projection = Callable[[int, Tensor], Tensor]  # (e, rows) -> rows @ expert e's matrixᵀ


def _routed_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, num_experts: int,
                    inter: int, form: ExpertForm, gate_up: Projection, down: Projection,
                    b_gate_up: Tensor | None, b_down: Tensor | None) -> Tensor:
    """`reference._moe_experts` with its precision: `gate_up(e, a)` and `down(e, h)` apply
    expert e's two matrices to rows in the compute dtype; the biases (optional, [E, N]) are
    added in it. Expert e runs on the (token, slot) pairs routed to it only; its rows go to
    those pairs' rows of a [T·k, H] buffer, whose k rows per token are then summed. Scattering
    by pair rather than by token keeps the indices distinct (a pair has one expert): ORT's CPU
    ScatterND applies its updates in parallel and loses sums when indices repeat,
    reduction="add" or not. A pair whose id is outside [0, E) matches no expert and keeps the
    buffer's NaN fill, so its token's row is NaN (the reference raises, which a graph cannot;
    the Triton path gives NaN too) rather than a plausible wrong row."""
    compute = _compute_type(x.dtype)
    rounded = x.dtype != compute  # 16-bit x: what eager holds in x's dtype is rounded to it

    def round_to_x(t: Tensor) -> Tensor:
        return op.Cast(op.Cast(t, to=x.dtype), to=compute) if rounded else t

    xc = _cast(x, compute)
    weights = op.Reshape(_cast(topk_weights, compute), _ints(-1))
    biases = [None if b is None else _cast(b, compute) for b in (b_gate_up, b_down)]
    ids = op.Reshape(topk_ids, _ints(-1))  # pair p is token p // k, slot p % k
    k = op.Shape(topk_ids, start=1, end=2)
    pairs, rows = [], []
    for e in range(num_experts):
        routed = op.Equal(ids, op.Constant(value=ir.tensor(e, dtype=topk_ids.dtype)))
        p = op.Reshape(op.NonZero(routed), _ints(-1))  # [n]; n may be 0
        routing = op.Unsqueeze(op.Gather(weights, p), _ints(1))
        a = op.Gather(xc, op.Div(p, k), axis=0)
        if form.weight_on_input:
            a = round_to_x(op.Mul(a, routing))
        gu = gate_up(e, a)
        if biases[0] is not None:
            gu = op.Add(gu, _expert(biases[0], e))
        y = down(e, round_to_x(_gated(gu, inter, form)))  # the second GEMM's operand, as eager
        if biases[1] is not None:
            y = op.Add(y, _expert(biases[1], e))
        rows.append(y if form.weight_on_input else op.Mul(y, routing))
        pairs.append(p)
    per_pair_shape = op.Concat(op.Shape(ids), op.Shape(x, start=1), axis=0)
    per_pair = op.ScatterND(
        op.ConstantOfShape(per_pair_shape, value=ir.tensor([float("nan")], dtype=compute)),
        op.Unsqueeze(op.Concat(*pairs, axis=0), _ints(1)), op.Concat(*rows, axis=0))
    out = op.ReduceSum(op.Reshape(per_pair, op.Concat(op.Shape(topk_ids), op.Shape(x, start=1),
                                                      axis=0)), _ints(1), keepdims=0)
    return out if x.dtype == compute else op.Cast(out, to=x.dtype)


def moe(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate_up: Tensor, w_down: Tensor,
        activation: str = "silu", impl: str = "auto", b_gate_up: Tensor | None = None,
        b_down: Tensor | None = None, interleaved: bool = False,
        alpha: float = SWIGLU_OAI_ALPHA, limit: float = SWIGLU_OAI_LIMIT,
        weight_on_input: bool = False) -> Tensor:
    """The routed experts of `reference.moe`, expert by expert over the tokens routed to each."""
    num_experts, two_inter, _ = _expert_dims(w_gate_up)
    compute = _compute_type(x.dtype)
    stacked_gate_up, stacked_down = _cast(w_gate_up, compute), _cast(w_down, compute)

    def gate_up(e: int, a: Tensor) -> Tensor:
        return op.Gemm(a, _expert(stacked_gate_up, e), transB=1)

    def down(e: int, h: Tensor) -> Tensor:
        return op.Gemm(h, _expert(stacked_down, e), transB=1)

    form = ExpertForm(activation, interleaved, alpha, limit, weight_on_input)
    return _routed_experts(x, topk_ids, topk_weights, num_experts, two_inter // 2, form,
                           gate_up, down, b_gate_up, b_down)


def moe_w4a16(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up_qweight: Tensor,
              gate_up_scales: Tensor, gate_up_zeros: Tensor, down_qweight: Tensor,
              down_scales: Tensor, down_zeros: Tensor, group_size: int,
              activation: str = "silu", impl: str = "auto", b_gate_up: Tensor | None = None,
              b_down: Tensor | None = None, interleaved: bool = False,
              alpha: float = SWIGLU_OAI_ALPHA, limit: float = SWIGLU_OAI_LIMIT,
              weight_on_input: bool = False) -> Tensor:
    """`reference.moe_w4a16`: `moe` with one fp32 MatMulNBits per expert matrix."""
    if x.dtype == ir.DataType.DOUBLE:
        raise ValueError("attnopt ONNX export: moe_w4a16 on fp64 activations has no "
                         "translation (MatMulNBits computes in fp32 at most)")
    compute = ir.DataType.FLOAT
    hidden = _in_features(x, "a w4a16 moe's input")
    num_experts, two_inter, half_hp = _expert_dims(gate_up_qweight)
    half_ip = _expert_dims(down_qweight)[2]
    gate_up_scales, down_scales = _cast(gate_up_scales, compute), _cast(down_scales, compute)

    def gate_up(e: int, a: Tensor) -> Tensor:
        return _int4_matmul(a, _expert(gate_up_qweight, e), _expert(gate_up_scales, e),
                            _expert(gate_up_zeros, e), two_inter, hidden, half_hp, group_size)

    def down(e: int, h: Tensor) -> Tensor:
        return _int4_matmul(h, _expert(down_qweight, e), _expert(down_scales, e),
                            _expert(down_zeros, e), hidden, two_inter // 2, half_ip, group_size)

    form = ExpertForm(activation, interleaved, alpha, limit, weight_on_input)
    return _routed_experts(x, topk_ids, topk_weights, num_experts, two_inter // 2, form,
                           gate_up, down, b_gate_up, b_down)


TRANSLATIONS = {
    torch.ops.attnopt.softmax.default: softmax,
    torch.ops.attnopt.attention.default: attention,
    torch.ops.attnopt.attention_with_past.default: attention_with_past,
    torch.ops.attnopt.latent_attention.default: latent_attention,
    torch.ops.attnopt.w4a16_linear.default: w4a16_linear,
    torch.ops.attnopt.moe.default: moe,
    torch.ops.attnopt.moe_w4a16.default: moe_w4a16,
}


def optimize(model: ir.Model) -> None:
    """onnxscript's optimizer (constant folding, dead code, unused optional outputs), with the
    constant subgraphs that lay out MatMulNBits' weights always folded: under its default size
    limit real layers would stay Reshape/Cast/BitShift chains, which ORT cannot prepack."""
    layout: set[ir.Node] = set()
    stack = [v.producer() for node in model.graph if node.op_type == "MatMulNBits"
             for v in node.inputs[1:] if v is not None]
    while stack:
        node = stack.pop()
        if node is not None and node not in layout:
            layout.add(node)
            stack += [v.producer() for v in node.inputs if v is not None]
    onnxscript.optimizer.optimize_ir(
        model, should_fold=lambda node: True if node in layout else None)
