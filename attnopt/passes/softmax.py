"""softmax: every softmax left in the graph becomes one `attnopt::softmax`.

What it matches, read inside out:

    x ─[* scale | / d]─[+ bias]─[masked_fill(m, v) | where(m, v, ·) | where(m, ·, v)]─softmax─[cast]

softmax is `aten._softmax`, `aten.softmax.int`, `aten._safe_softmax` or the decomposed
`exp(s - amax(s)) / sum(exp(s - amax(s)))`. Every bracketed piece is optional; widening casts
(fp16 -> fp32) anywhere in the chain are looked through because the op computes in fp32 anyway.
A piece that cannot be folded (a bias that would enlarge the scores, a tensor scale) is left in
the graph and the softmax is still rewritten. Runs after the attention pass, which consumes the
softmax inside attention.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.compiler import layout
from attnopt.compiler.graph import insert_call
from attnopt.compiler.pattern import (
    ANY,
    Call,
    Capture,
    Literal,
    Match,
    Pattern,
    Rule,
    is_number,
    is_tensor_node,
    optional,
)
from attnopt.compiler.rewrite import PatternPass
from attnopt.passes.misses import explain_softmax

aten, prims = torch.ops.aten, torch.ops.prims

# --- the pieces ---------------------------------------------------------------------------------


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def masked_scores(x: Pattern) -> Pattern:
    """x ─[* scale | / d]─[+ bias]─[mask]: the pre-ops of a softmax (the attention pass reads
    attention sinks' scores with it). Captures: scale | divisor | scale_tensor, bias, mask +
    fill (+ masked | masked_keep)."""
    scaled = optional(
        Call(aten.mul.Tensor, x, Literal("scale", where=is_number), commutative=True)
        | Call(aten.div.Tensor, x, Literal("divisor", where=is_number))
        # A scale Dynamo did not specialise (torch.compile(dynamic=True) passes Python floats
        # as 0-dim tensor inputs): the attention pass folds it into q; the softmax op takes a
        # number, so its pass declines it and keeps the multiply outside.
        | Call(aten.mul.Tensor, x, Capture("scale_tensor", where=is_scalar_tensor),
               commutative=True),
        through=x,
    )
    biased = optional(
        Call(aten.add.Tensor, scaled,
             Capture("bias", where=is_tensor_node(_is_float)), commutative=True),
        through=scaled,
    )
    bool_mask = Capture("mask", where=is_tensor_node(lambda d: d == torch.bool))
    fill_value = (
        Call(aten.scalar_tensor.default, Literal("fill", where=is_number),
             dtype=ANY, layout=ANY, device=ANY, pin_memory=ANY)
        | Call(aten.full.default, [], Literal("fill", where=is_number),
               dtype=ANY, layout=ANY, device=ANY, pin_memory=ANY)
    )
    masked = optional(
        Call(aten.masked_fill.Scalar, biased, bool_mask, Literal("fill", where=is_number),
             name="masked")
        | Call(aten.where.self, bool_mask, fill_value, biased, name="masked")
        | Call(aten.where.self, bool_mask, biased, fill_value, name="masked_keep"),
        through=biased,
    )
    return masked


def softmax_of(x: Pattern) -> Pattern:
    """The whole chain around a softmax of `x`; the attention pass reuses it with `x` = q @ kᵀ.

    Captures: those of `masked_scores`, dim | max_dims + sum_dims, safe, out_dtype."""
    masked = masked_scores(x)
    dim = Literal("dim", where=lambda d: isinstance(d, int))
    # The row maximum: amax(s, dims, keepdim=True), or s.max(dim, keepdim=True).values.
    row_max = (Call(aten.amax.default, masked, Literal("max_dims"), True)
               | Call(operator.getitem, Call(aten.max.dim, masked, Literal("max_dims"), True), 0))
    exp = Call(aten.exp.default, Call(aten.sub.Tensor, masked, row_max), name="exp")
    core = (
        Call(aten._softmax.default, masked, dim, Literal("half_to_float"))
        | Call(aten.softmax.int, masked, dim, Literal("dtype_arg"))
        | Call(aten._safe_softmax.default, masked, dim, Literal("dtype_arg"), name="safe")
        | Call(aten.div.Tensor, exp, Call(aten.sum.dim_IntList, Capture("exp"),
                                          Literal("sum_dims"), True))
    )
    cast_dtype = Literal("out_dtype", where=lambda d: isinstance(d, torch.dtype))
    return optional(
        Call(aten._to_copy.default, core, dtype=cast_dtype, layout=ANY, device=ANY)
        | Call(prims.convert_element_type.default, core, cast_dtype),
        through=core,
    )


def softmax_dim(m: Match) -> int:
    return _dims(m["max_dims"])[0] if "max_dims" in m.captures else m["dim"]


def _dims(dims: int | list[int]) -> list[int]:
    return [dims] if isinstance(dims, int) else list(dims)


def is_scalar_tensor(v: object) -> bool:
    val = v.meta.get("val") if isinstance(v, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point()


def softmax_scale(m: Match) -> float:
    return 1.0 / m["divisor"] if "divisor" in m.captures else float(m.get("scale", 1.0))


x = Capture("x", where=is_tensor_node(_is_float))
softmax = softmax_of(x)


# --- looking through casts ------------------------------------------------------------------------

# Casts that lose nothing and that the op's fp32 computation makes redundant. Widening to fp64
# is not among them: the op would compute in fp32 where eager computed in fp64.
_LOSSLESS = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32)}


def dtype_of(node: object) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def widening_cast(node: fx.Node) -> bool:
    """fp16/bf16 -> fp32 casts, clones and aliases: no-ops to an op that computes in fp32."""
    if node.target in (aten.clone.default, aten.alias.default):
        return True
    if node.target is aten._to_copy.default:
        if set(node.kwargs) - {"dtype", "layout", "device"} or node.kwargs.get(
                "device", _device(node.args[0])) != _device(node.args[0]):
            return False
    elif node.target is not prims.convert_element_type.default:
        return False
    return (dtype_of(node.args[0]), dtype_of(node)) in _LOSSLESS


def _device(node: object) -> torch.device | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.device if isinstance(val, torch.Tensor) else None


# --- check and rewrite ----------------------------------------------------------------------------


def _shape(node: fx.Node) -> torch.Size:
    return node.meta["val"].shape


def chain_problem(m: Match, scores: torch.Size) -> str | None:
    """Why the chain `softmax_of` matched is not softmax(where(mask, fill, x · scale + bias),
    dim) over scores of shape `scores`, or None. Every constant its meaning hangs on is
    checked, in every pass that reuses the chain: a decomposed softmax reduces its max and its
    sum over one and the same dim; the bias and the mask broadcast into the scores (never
    enlarging them); the softmax computes in no wider dtype than the op (fp32)."""
    rank = len(scores)
    if rank == 0:
        return "softmax of a 0-dim tensor"
    if "max_dims" in m.captures:
        amax, total = _dims(m["max_dims"]), _dims(m["sum_dims"])
        if len(amax) != 1 or len(total) != 1 or amax[0] % rank != total[0] % rank:
            return f"amax over {amax} but sum over {total}: not a softmax over one dim"
    for part in ("bias", "mask"):
        if part in m.captures and not layout.broadcasts_into(_shape(m[part]), scores):
            return (f"{part} of shape {list(_shape(m[part]))} does not broadcast into scores "
                    f"of shape {list(scores)}")
    wide = m.get("dtype_arg")
    if wide == torch.float64 and dtype_of(m["x"]) != torch.float64:
        return "softmax computed in float64 of narrower scores; the op computes in float32"
    return None


def check(m: Match, ctx=None) -> str | None:
    if dtype_of(m.anchor) is None or dtype_of(m["x"]) is None:
        return "no dtype information on the graph (meta['val'] missing)"
    if "scale_tensor" in m.captures:  # the shorter match, with the multiply outside, follows
        return "the scale is a tensor; the op takes a number"
    return chain_problem(m, _shape(m["x"]))


def rewrite(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    dim, scale = softmax_dim(m), softmax_scale(m)
    fill = float("-inf")
    masked_node = m.get("masked") or m.get("masked_keep")
    if masked_node is not None:
        # The fill is stored in the dtype of the scores it fills: finfo(fp32).min in an fp16
        # graph is -inf there, and fully masked rows must come out as eager gives them.
        fill = float(torch.tensor(m["fill"], dtype=dtype_of(masked_node)))
    kernels = ctx.options.kernels
    return insert_call(graph, torch.ops.attnopt.softmax.default, (
        m["x"], dim, scale, m.get("bias"), m.get("mask"), fill,
    ), {
        "keep_mask": "masked_keep" in m.captures, "safe": "safe" in m.captures,
        "dtype": dtype_of(m.anchor), "impl": kernels,
    })


softmax_pass = PatternPass("softmax", counts_as="softmax", rules=[
    Rule("fused_softmax", softmax, rewrite, check, through=widening_cast),
], explain=explain_softmax)
