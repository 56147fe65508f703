"""attention: attention becomes one `attnopt::attention` (flash attention in Triton on GPU).

What it matches so far, the calls that are already fused — what transformers emits with
attn_implementation="sdpa" and what Dynamo makes of F.scaled_dot_product_attention:

    scaled_dot_product_attention(q, k, v, mask, dropout_p=0, is_causal, scale, enable_gqa)
    getitem(_scaled_dot_product_{flash_attention_for_cpu, flash_attention,
                                 efficient_attention, cudnn_attention, attention_math}(...), 0)

K/V with fewer heads than Q (GQA, MQA) are passed as they are, and transformers' repeat_kv
(expand + clone + reshape) in front of K and V is folded away: the kernel indexes the KV head,
so no repeated copy of the cache is made.
A boolean mask that SDPA's decomposition turned into where(mask, 0, -inf) is read as the
boolean it was, and a mask that is a compile-time constant equal to the causal pattern (what
transformers builds from arange when there is no padding) becomes the is_causal flag: the
kernel skips the blocks above the diagonal and reads no mask at all.

And attention written out, as transformers' eager implementations and hand-written modules do:

    matmul(softmax_chain(matmul([q * s], [k * s]ᵀ)), v)

with every spelling of the softmax chain the softmax pass knows (scale, additive mask,
masked_fill/where with -inf, fp32 upcast and cast back, _safe_softmax, decomposed) and the same
repeat_kv folding; with what models do to the scores before it (`attention_scores.py`: Gemma 2's
softcap, T5's position bias, Falcon's ALiBi added before the scale) and GPT-OSS's sinks in place
of the softmax (`attention_sinks.py`). A constant mask equal to the causal pattern, or to
causal cut to a sliding window, becomes the flag and the window (`attention_call.py`). And
attention in 3-D batched form, as einsum lowers it and as older models
write it (OPT, BLOOM with its ALiBi bias):

    bmm(views(softmax_chain(views(bmm(q3, kt3) | baddbmm(bias, q3, kt3, alpha)))), v3)

where every `views(...)` is any chain of unsqueeze/permute/view/expand. `compiler/layout.py`
works out which dims of q, k and v each chain holds, so [B, H, L, D], [B, L, H, D] and
[B*H, L, D] sources are all read for what they are (a permute, never a copy, when the heads are
not in front), and anything that is not attention — softmax over another dim, heads and batch
swapped in v — is refused with its reason.

Two more spellings have files of their own: flex_attention calls whose score_mod and mask_mod
are causal, window, softcap, ALiBi or padding (`flex_attention.py`), and PyTorch's encoder fast
path, whose fused kernels are replaced by their math around one attnopt::attention
(`encoder_fast_path.py`).

One difference from eager is deliberate and documented: a query row whose keys are *all* masked
with -inf is NaN in eager's plain softmax and 0 here, as SDPA gives it.
"""

from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.compiler import layout
from attnopt.compiler.graph import insert_call
from attnopt.compiler.pattern import (
    ANY,
    Call,
    Capture,
    Chain,
    Literal,
    Match,
    Pattern,
    Rule,
    is_number,
    is_tensor_node,
)
from attnopt.compiler.rewrite import PatternPass
from attnopt.passes.attention_call import (
    AttentionPlan,
    emit_attention,
    float_mask_fill_problem,
    qkv_problem,
    scores_shape,
    val,
)
from attnopt.passes.attention_scores import plan_scores, same_shape_view, score_chain
from attnopt.passes.attention_sinks import sink_softmax, sinks_of
from attnopt.passes.encoder_fast_path import encoder_rules
from attnopt.passes.flex_attention import flex_rule
from attnopt.passes.misses import explain_attention
from attnopt.passes.softmax import (
    chain_problem,
    dtype_of,
    masked_scores,
    softmax_dim,
    softmax_of,
    softmax_scale,
    widening_cast,
)

aten, prims = torch.ops.aten, torch.ops.prims

def repeat_kv(name: str) -> Call:
    """transformers' repeat_kv: x[:, :, None].expand(B, Hkv, n_rep, L, D).reshape(B, Hkv*n_rep,
    L, D), a copy of K or V per query head. Matched so the kernel reads x itself. Sizes may be
    symbolic (nodes), and a dynamic-shape trace keeps the `:` of `x[:, :, None, :, :]` as a
    slice over everything."""
    x = Capture(name, where=is_tensor_node())
    unsqueezed = Call(aten.unsqueeze.default, x, 2)
    unsqueezed = Call(aten.slice.Tensor, unsqueezed, 3, 0, Literal(where=_to_the_end)) | unsqueezed
    expanded = Call(aten.expand.default, unsqueezed, Capture(f"{name}_expand"))
    # With one KV head the reshape is a view of the expand (stride 0), so there is no clone.
    copied = Call(aten.clone.default, expanded, memory_format=ANY) | expanded
    return Call((aten._unsafe_view.default, aten.view.default, aten.reshape.default), copied,
                Capture(f"{name}_repeated_shape"))


def _to_the_end(end: object) -> bool:
    return end is None or end == sys.maxsize


q = Capture("q", where=is_tensor_node())
k, v = (repeat_kv(n) | Capture(n, where=is_tensor_node()) for n in "kv")
mask = Capture("mask", where=is_tensor_node())
dropout = Literal("dropout_p")
causal = Literal("is_causal", where=lambda c: isinstance(c, bool))
scale = Literal("scale")

sdpa = Call(aten.scaled_dot_product_attention.default, q, k, v, attn_mask=mask | None,
            dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=ANY)


def _first_output(op: object, **kwargs: object) -> Call:
    return Call(operator.getitem, Call(op, q, k, v, **kwargs), 0)


sdpa_backends = (
    _first_output(aten._scaled_dot_product_flash_attention_for_cpu.default, dropout_p=dropout,
                  is_causal=causal, attn_mask=mask | None, scale=scale)
    | _first_output(aten._scaled_dot_product_flash_attention.default, dropout_p=dropout,
                    is_causal=causal, return_debug_mask=False, scale=scale)
    | _first_output(aten._scaled_dot_product_efficient_attention.default, attn_bias=mask | None,
                    compute_log_sumexp=ANY, dropout_p=dropout, is_causal=causal, scale=scale)
    | _first_output(aten._scaled_dot_product_cudnn_attention.default, attn_bias=mask | None,
                    compute_log_sumexp=ANY, dropout_p=dropout, is_causal=causal,
                    return_debug_mask=False, scale=scale)
    | _first_output(aten._scaled_dot_product_attention_math.default, attn_mask=mask | None,
                    dropout_p=dropout, is_causal=causal, dropout_mask=None, scale=scale,
                    enable_gqa=ANY)
)


def _repeat_problem(m: Match, name: str) -> str | None:
    if f"{name}_expand" not in m.captures:
        return None
    b, hkv, length, d = val(m[name]).shape
    sizes, out = (layout.value(m[f"{name}_{s}"]) for s in ("expand", "repeated_shape"))
    if not isinstance(sizes, list) or not isinstance(out, list) or len(sizes) != 5 \
            or len(out) != 4:
        return f"{name} is expanded to {sizes}: not repeat_kv"
    rep = sizes[2]
    want_sizes, want_out = [b, hkv, length, d], [b, hkv * rep, length, d]
    same = all(map(layout.same, [sizes[0], sizes[1], sizes[3], sizes[4]], want_sizes)) and all(
        map(layout.same, out, want_out))
    return None if same else f"{name} expand {sizes} / reshape {out} is not repeat_kv"


def check(m: Match, ctx=None) -> str | None:
    for name in "kv":
        if reason := _repeat_problem(m, name):
            return reason
    if m["dropout_p"] != 0.0:
        return f"dropout_p={m['dropout_p']}: attention with dropout (training) is left to ATen"
    qv, kv, vv = val(m["q"]), val(m["k"]), val(m["v"])
    if reason := qkv_problem(qv, kv, vv):
        return reason
    if m["is_causal"] and not statically_known_true(qv.shape[2] == kv.shape[2]):
        return ("is_causal with q_len != kv_len: SDPA aligns the mask top-left, "
                "attnopt::attention bottom-right")
    if m.get("mask") is not None:
        mv, target = val(m["mask"]), scores_shape(qv, kv)
        if not layout.broadcasts_into(mv.shape, target):
            return f"mask of shape {list(mv.shape)} does not broadcast to {target}"
    return None


def _boolean_source(mask: fx.Node) -> fx.Node | None:
    """The boolean behind where(b, 0, -inf) — how SDPA's decomposition spells a bool mask."""
    if mask.target is not aten.where.self or not is_tensor_node(
            lambda d: d == torch.bool)(mask.args[0]):
        return None
    fills = [a.args[0] if isinstance(a, fx.Node) and a.target is aten.scalar_tensor.default
             else None for a in mask.args[1:]]
    return mask.args[0] if fills == [0.0, -math.inf] else None


def rewrite(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    head_dim = val(m["q"]).shape[-1]
    scale_value = m["scale"] if m["scale"] is not None else 1.0 / math.sqrt(head_dim)
    plan = AttentionPlan(scale=float(scale_value), is_causal=m["is_causal"])
    attn_mask = m.get("mask")
    if attn_mask is not None and (source := _boolean_source(attn_mask)) is not None:
        plan.bool_mask = source
    elif attn_mask is not None and val(attn_mask).dtype == torch.bool:
        plan.bool_mask = attn_mask
    elif attn_mask is not None:
        plan.additive.append((attn_mask, 1.0))
    return emit_attention(graph, ctx, m["q"], m["k"], m["v"], plan)


# --- written-out attention: softmax(q @ kᵀ * scale + mask) @ v -------------------------------


def flat_matmul(a: Pattern, b: Pattern, name: str) -> Pattern:
    """A 4-D matmul as aten.matmul lowers it: expand both sides, fold batch and heads into one
    dim (a view, or a clone and a view when the strides do not allow one), bmm, unfold. The
    nodes are captured as `{name}` (the unfolded result), `{name}_a`/`{name}_b` (the expands):
    `matmul_problem` checks that every size in between is the one the lowering writes."""

    def flat(side: Pattern, tag: str) -> Pattern:
        expanded = Call(aten.expand.default, side, ANY, name=f"{name}_{tag}")
        maybe_copied = Call(aten.clone.default, expanded, memory_format=ANY) | expanded
        return Call(_VIEWS, maybe_copied, ANY)

    return Call(_VIEWS, Call(aten.bmm.default, flat(a, "a"), flat(b, "b")), ANY, name=name)


def matmul_problem(m: Match, name: str) -> str | None:
    """Why the views around the bmm captured as `name` are not a [B, H] batched matmul of the
    expanded sides ([B, H, r, c] @ [B, H, c, n] -> [B·H, r, c] @ [B·H, c, n] -> [B, H, r, n]),
    or None: a view that regroups rows, or a broadcast the op cannot read, changes the math."""
    a, b = val(m[f"{name}_a"]), val(m[f"{name}_b"])
    out = val(m[name])
    if not (a.dim() == b.dim() == out.dim() == 4):
        return f"{name}: a matmul of rank {a.dim()} and {b.dim()}; the op takes [B, H, L, D]"
    batch = list(a.shape[:2])
    bmm = m[name].args[0]
    x, y = (val(n) for n in bmm.args)
    flat = batch[0] * batch[1]
    want = {"a": [flat, a.shape[2], a.shape[3]], "b": [flat, b.shape[2], b.shape[3]],
            "out": [*batch, a.shape[2], b.shape[3]]}
    got = {"a": list(x.shape), "b": list(y.shape), "out": list(out.shape)}
    if not all(map(layout.same, b.shape[:2], batch)) or not all(
            len(got[t]) == len(want[t]) and all(map(layout.same, got[t], want[t]))
            for t in want):
        return (f"{name}: the views around the bmm are not the batched matmul of "
                f"{list(a.shape)} and {list(b.shape)}")
    return None


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)

q_scaled = Call(aten.mul.Tensor, q, Literal("q_scale", where=is_number), commutative=True) | q
k_scaled = Call(aten.mul.Tensor, k, Literal("k_scale", where=is_number), commutative=True) | k
k_transposed = (Call(aten.transpose.int, k_scaled, Literal("kt_dim0"), Literal("kt_dim1"))
                | Call(aten.permute.default, k_scaled, Literal("kt_perm")))
_scores = score_chain(flat_matmul(q_scaled, k_transposed, "scores"))
_probs = softmax_of(_scores) | sink_softmax(masked_scores(_scores))
# Falcon views the probabilities to the shape they have before the second matmul.
_probs = Call(_VIEWS, _probs, ANY, name="probs_view") | _probs
written_out = flat_matmul(_probs, v, "out")


def _is_last_two(m: Match) -> bool:
    if "kt_perm" in m.captures:
        return [d % 4 for d in m["kt_perm"]] == [0, 1, 3, 2]
    return {m["kt_dim0"] % 4, m["kt_dim1"] % 4} == {2, 3}


def _written_out_plan(m: Match) -> AttentionPlan | str:
    """The plan of a written-out match, or why it is refused."""
    qv, kv, vv = val(m["q"]), val(m["k"]), val(m["v"])
    if qv.dim() != 4 or kv.dim() != 4:
        return f"q/k of rank {qv.dim()}/{kv.dim()}; the op takes [B, H, L, D]"
    if not _is_last_two(m):
        return "k is not transposed over its last two dims: not q @ kᵀ"
    for name in ("scores", "out"):
        if reason := matmul_problem(m, name):
            return reason
    if "probs_view" in m.captures and not same_shape_view(m["probs_view"]):
        return "the probabilities are reshaped before the second matmul"
    scores = val(m["scores"]).shape
    if reason := chain_problem(m, scores):
        return reason
    sinks = None
    if "sink_cat" in m.captures:
        sinks = sinks_of(m)
        if isinstance(sinks, str):
            return sinks
    elif softmax_dim(m) % 4 != 3:
        return f"softmax over dim {softmax_dim(m)}, not over the keys"
    if dtype_of(m.anchor) != qv.dtype:
        return f"output is {dtype_of(m.anchor)} but q is {qv.dtype}"
    for name in "kv":
        if reason := _repeat_problem(m, name):
            return reason
    if reason := qkv_problem(qv, kv, vv):
        return reason
    plan = plan_scores(m, scores)
    if isinstance(plan, AttentionPlan):
        plan.scale *= float(m.get("q_scale", 1.0)) * float(m.get("k_scale", 1.0))
        plan.sinks = sinks
    return plan


def check_written_out(m: Match, ctx=None) -> str | None:
    plan = _written_out_plan(m)
    return plan if isinstance(plan, str) else None


def rewrite_written_out(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    return emit_attention(graph, ctx, _tensor_scaled(graph, m, m["q"]), m["k"], m["v"],
                          _written_out_plan(m))


def _tensor_scaled(graph: fx.Graph, m: Match, q: fx.Node) -> fx.Node:
    """q times a scale that is a 0-dim tensor (a runtime value, not a number the op can take):
    (q · s) @ kᵀ = (q @ kᵀ) · s, up to rounding."""
    if "scale_tensor" not in m.captures:
        return q
    scale = insert_call(graph, prims.convert_element_type.default,
                        (m["scale_tensor"], val(q).dtype))
    return insert_call(graph, aten.mul.Tensor, (q, scale))


# --- batched: 3-D bmm / baddbmm attention and einsum, through any chain of views ---------------

_CHAIN = frozenset(layout.CHAIN_OPS)
q3, kt3, v3 = (Capture(n, where=is_tensor_node()) for n in ("q3", "kt3", "v3"))
qk = (Call(aten.bmm.default, q3, kt3, name="qk")
      | Call(aten.baddbmm.default, Capture("bias3", where=is_tensor_node()), q3, kt3,
             beta=Literal("beta", where=is_number), alpha=Literal("alpha", where=is_number),
             name="qk"))
batched = Call(aten.bmm.default,
               Chain(softmax_of(Chain(qk, _CHAIN, "scores")), _CHAIN, "probs"), v3)


@dataclass(frozen=True)
class Operand:
    """q, k or v as its bmm reads it: a source tensor, and which of its dims are the batch (in
    order), the rows and the columns of the [batch, rows, cols] operand."""

    source: fx.Node
    sizes: dict
    batch: tuple
    rows: tuple
    cols: tuple


def _chain_source(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _CHAIN:
        node = node.args[0]
    return node


def _operand(node: fx.Node, tag: str) -> Operand | None:
    """Read through as much of the view chain in front of `node` as the algebra can follow
    (at least nothing: `node` itself is a [batch, rows, cols] operand)."""
    chain = [node]
    while chain[-1].op == "call_function" and chain[-1].target in _CHAIN:
        chain.append(chain[-1].args[0])
    for source in reversed(chain):
        lay = layout.trace(node, {source: layout.source_layout(tag, val(source).shape)})
        if lay is None or len(lay.axes) != 3:
            continue
        batch, rows, cols = _matrix_axes(lay.axes, lay)
        if len(rows) <= 1 and len(cols) <= 1:
            return Operand(source, lay.sizes, batch, rows, cols)
    return None


def _matrix_axes(axes: tuple, lay: layout.Layout) -> tuple[tuple, tuple, tuple]:
    """(batch dims, row dims, column dims) of a [batch..., rows, cols] layout without its
    size-1 source dims. Rows or columns left empty have size 1 (a decode step's single
    query): which size-1 dim, if any, they came from holds no data."""
    batch = tuple(d for a in axes[:-2] for d in a if not lay.is_unit(d))
    rows, cols = (tuple(d for d in a if not lay.is_unit(d)) for a in axes[-2:])
    return batch, rows, cols


def _sizes(op: Operand, dims: tuple) -> list[int]:
    return [op.sizes[d] for d in dims]


def _same_sizes(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(layout.same, a, b))


def batched_plan(m: Match) -> tuple[dict, int] | str:
    """(q, k, v operands; the scores' rank) if the chains compute attention, else why not."""
    operands = {t: _operand(m[n], t) for n, t in (("q3", "q"), ("kt3", "k"), ("v3", "v"))}
    for tag, op in operands.items():
        if op is None:
            return f"{tag} reaches the bmm through views that do not keep rows and columns whole"
    q, k, v = operands["q"], operands["k"], operands["v"]
    qb = _sizes(q, q.batch)
    if not (_same_sizes(qb, _sizes(k, k.batch)) and _same_sizes(qb, _sizes(v, v.batch))):
        return "q, k and v batch dims differ (grouped heads are matched in 4-D form only)"
    sizes = {**q.sizes, **k.sizes, **v.sizes}
    qk_layout = layout.Layout((q.batch, q.rows, k.cols), sizes)
    scores = layout.trace(m["scores"], {m["qk"]: qk_layout})
    if scores is None:
        return "the scores go through a reshape the matcher cannot follow"
    batch, rows, cols = _matrix_axes(scores.axes, scores)
    if batch != q.batch or (rows, cols) != (q.rows, k.cols):
        return f"the scores are not laid out [batch..., q, k] (axes {scores.axes})"
    if reason := chain_problem(m, val(m["scores"]).shape):
        return reason
    if softmax_dim(m) % len(scores.axes) != len(scores.axes) - 1:
        return f"softmax over dim {softmax_dim(m)}, not over the keys"
    probs = layout.trace(m["probs"], {_chain_source(m["probs"]): scores})
    if probs is None or len(probs.axes) != 3 or \
            _matrix_axes(probs.axes, probs) != (q.batch, q.rows, k.cols):
        return "the probabilities reach the second bmm in another layout than [batch, q, k]"
    if m.get("beta", 1.0) not in (0.0, 1.0):
        return f"baddbmm beta={m['beta']} scales the added scores"
    if "mask" in m.captures and (reason := float_mask_fill_problem(m["fill"])):
        return reason
    if len(scores.axes) not in (3, 4) and ({"mask", "bias"} & set(m.captures)):
        return f"a mask on rank-{len(scores.axes)} scores"
    if len(q.batch) > 2 and ({"mask", "bias", "bias3"} & set(m.captures)):
        return "a mask on scores with more than two batch dims"
    return operands, len(scores.axes)


def check_batched(m: Match, ctx=None) -> str | None:
    plan = batched_plan(m)
    if isinstance(plan, str):
        return plan
    if dtype_of(m.anchor) != val(m["q3"]).dtype:
        return f"output is {dtype_of(m.anchor)} but q is {val(m['q3']).dtype}"
    return None


def _as_bhld(graph: fx.Graph, op: Operand, rows: tuple, cols: tuple) -> fx.Node:
    """The source as the op's [B, H, rows, cols]: a permute when the dims are out of order, then
    flatten/unsqueeze (no sizes in the graph, so symbolic shapes stay symbolic). Extra batch
    dims fold into B."""
    rank = val(op.source).dim()
    used = [i for _, i in (*op.batch, *rows, *cols)]
    units = [i for i in range(rank) if i not in used]  # size 1: where they go is free
    node = op.source
    if units + used != list(range(rank)):
        node = insert_call(graph, aten.permute.default, (node, units + used))
    if not cols:  # size-1 rows or columns (Lq = 1, Lk = 1) come back as a new size-1 dim
        node = insert_call(graph, aten.unsqueeze.default, (node, -1))
    if not rows:
        node = insert_call(graph, aten.unsqueeze.default, (node, -2))
    lead = len(units) + len(op.batch)  # dims in front of rows and cols
    if lead > 2 or (lead == 2 and len(op.batch) < 2):
        keep = 1 if len(op.batch) >= 2 else 0  # the last batch dim stays H
        node = insert_call(graph, aten.flatten.using_ints, (node, 0, lead - 1 - keep))
        lead = 1 + keep
    while lead < 2:
        node = insert_call(graph, aten.unsqueeze.default, (node, 0))
        lead += 1
    return node


def _mask_4d(graph: fx.Graph, node: fx.Node | None, scores_rank: int, q: Operand):
    """A mask laid out like rank-3 scores [B*H, q, k] as the op's [B, H, q, k]."""
    if node is None or scores_rank == 4 or val(node).dim() < 3:
        return node
    if layout.same(val(node).shape[0], 1) or len(q.batch) < 2:
        return insert_call(graph, aten.unsqueeze.default, (node, 0))
    heads = q.sizes[q.batch[-1]]
    if not isinstance(heads, int):  # a symbolic head count: read it off q
        heads = insert_call(graph, aten.sym_size.int, (q.source, q.batch[-1][1]))
    return insert_call(graph, aten.unflatten.int, (node, 0, [-1, heads]))


def rewrite_batched(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    operands, rank = batched_plan(m)
    q, k, v = operands["q"], operands["k"], operands["v"]
    q4 = _as_bhld(graph, q, q.rows, q.cols)
    k4 = _as_bhld(graph, k, k.cols, k.rows)  # the bmm reads kᵀ: its columns are the keys
    v4 = _as_bhld(graph, v, v.rows, v.cols)
    bias = _mask_4d(graph, m.get("bias"), rank, q)
    if "bias3" in m.captures and m.get("beta", 1.0) == 1.0:
        bias3 = _mask_4d(graph, m["bias3"], 3, q)
        bias = bias3 if bias is None else insert_call(graph, aten.add.Tensor, (bias3, bias))
    mask = _mask_4d(graph, m.get("mask"), rank, q)
    plan = AttentionPlan(scale=softmax_scale(m) * float(m.get("alpha", 1.0)),
                         additive=[] if bias is None else [(bias, 1.0)], bool_mask=mask,
                         drop="masked_keep" not in m.captures)
    out = emit_attention(graph, ctx, _tensor_scaled(graph, m, q4), k4, v4, plan)
    return insert_call(graph, aten.flatten.using_ints, (out, 0, 1))  # [B*H, q, dv] as the bmm


attention_pass = PatternPass("attention", counts_as="attention", rules=[
    Rule("sdpa", sdpa | sdpa_backends, rewrite, check),
    Rule("written_out", written_out, rewrite_written_out, check_written_out,
         through=widening_cast),
    Rule("batched", batched, rewrite_batched, check_batched, through=widening_cast),
    flex_rule,
    *encoder_rules,
], explain=explain_attention)
