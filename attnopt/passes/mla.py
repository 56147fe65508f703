"""mla: DeepSeek's multi-head latent attention decoded from its latent, in the absorbed form.

MLA (DeepSeek-V2/V3) caches per token a latent c = norm(kv_a(x))[:R] (R = kv_lora_rank) and a
rotary key k_rot (P = qk_rope_head_dim) shared by every head. transformers' DeepseekV3Attention
(V2 likewise) then expands every cached token at every step, after the cache update:

    kv  = kv_b_proj(c).view(B, L, H, n + v).transpose(1, 2)        # [B, H, L, n + v]
    k_nope, value = kv.split([n, v], -1)                             # n = qk_nope_head_dim
    key = new_empty(B, H, L, n + P); key[..., :n] = k_nope; key[..., n:] = k_rot  (broadcast)
    attention(cat(q_nope, q_rot), key, value, mask, scale)

which the attention pass has made one `attnopt::attention(q, key, value, ...)` (the two copy_
into new_empty arrive functionalised, as slice_scatter). Writing W = kv_b_proj.weight as
W3 = W.view(H, n + v, R), W_UK = W3[:, :n] and W_UV = W3[:, n:], per head h:

    q · keyᵀ = (q_nope · W_UK[h]) · cᵀ + q_rot · k_rotᵀ,    p · value = (p · c) · W_UV[h]ᵀ,

so the same attention is

    q_lat   = q_nope @ W_UK                                          # [B, H, Lq, R]
    out_lat = latent_attention(q_lat, q_rot, c, k_rot, mask, is_causal, scale)
    out     = out_lat @ W_UVᵀ                                        # [B, H, Lq, v]

(the "absorbed" form of vLLM, SGLang and FlashInfer): attention reads R + P numbers per cached
token, once for all heads, and kv_b_proj never touches a past token. Exact up to rounding (a
reassociation of the same sums; tests prove it against float64). W_UK and W_UV are views of
the weight in the graph, not derived constants: an in-place update of kv_b_proj is seen.

What is checked, each refusal named in the report: V is the last v columns of a split of kv
over its last dim and K's first n columns the first n of the same split (n + v covering kv);
K's last P columns are one tensor [B, 1, L, P] broadcast over the heads, and K's columns are
written exactly once each, nope first; kv is kv_b_proj's matmul of the latent [B, 1, L, R]
viewed as [B·L, R], its output features split head-major as (H, n + v) — proved on the view
chain by `compiler/layout.py`; no bias; q is [B, H, Lq, n + P] (q's split is taken at n, the
rope last, as K's); the scale is the attention's, times any constant K was multiplied by
(SDPA's math decomposition scales q and K by √scale each), so DeepSeek's yarn mscale needs no
special case. Where the latent comes from:

    paged       `PagedKVCache`'s gather fallback (`attnopt::paged_gather` of its "K" pool, the
                latent, and its "V" pool, the rotary key, through one block table): becomes
                `attnopt::paged_latent_attention`, which reads the pools in place up to each
                sequence's length. The same contract as the kv_cache pass's paged rule: a mask
                spanning the capacity, or transformers' prefill into an empty cache (no mask,
                is_causal, K/V cut to the Lq new tokens).
    contiguous  any other latent (a DynamicCache's cat, a static buffer, a forward without a
                cache): `attnopt::latent_attention` over it as it is, with the attention's own
                mask and causal flag; a cut to Lq cuts the latent too.

Which form is cheaper is decided per graph, from its sizes, in multiply-adds per head:
expanding costs Le · R · (n + v) (Le: tokens kv_b_proj runs over) plus Lq · Lk · (n + P + v)
of attention; absorbing costs Lq · R · (n + v) for the two per-head products plus
Lq · Lk · (2R + P). Decoding (Lq = 1) always absorbs; a prefill absorbs only while Lq stays
below about R(n + v) / (2R - n - v) queries (170 for DeepSeek-V3's 512/128/128, fewer if
nothing is cached yet), and stays in the naive form otherwise, with that reason in the report.
A prefill graph whose query length is symbolic (Dynamo's dynamic prefill) stays naive when
compiled; for export, where one graph serves every step and is meant for decoding, it absorbs.

Runs after the attention pass (it rewrites `attnopt::attention`) and before kv_cache (whose
gather rule must not see the latent's gathers first) and quantize (which would turn kv_b_proj
into int4 codes this pass cannot read). Not matched: kv_b_proj already in int4
(`w4a16_linear`), a kv_b_proj with a bias, attention variants (softcap, windows, sinks).
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass

import torch
import torch.fx as fx

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.compiler import layout
from attnopt.compiler.graph import insert_call
from attnopt.compiler.pattern import (
    Call,
    Capture,
    Literal,
    Match,
    Rule,
    bound_arguments,
    is_number,
)
from attnopt.compiler.rewrite import PatternPass

aten, attnopt = torch.ops.aten, torch.ops.attnopt


def _val(node: fx.Node) -> torch.Tensor:
    return node.meta["val"]


def _last_dim(node: fx.Node, dim: object) -> bool:
    return isinstance(dim, int) and dim % _val(node).dim() == _val(node).dim() - 1


def _static(size: object) -> int | None:
    return size if isinstance(size, int) else None


# --- what the pieces are ------------------------------------------------------------------------


@dataclass(frozen=True)
class Columns:
    """`node` is columns [start, stop) of `source`'s last dim."""

    source: fx.Node
    start: int
    stop: int


def _columns(node: object) -> Columns | None:
    """A part of a tensor's last dim: getitem(split_with_sizes(x, sizes, -1), i) or
    slice(x, -1, start, end) (step 1)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and node.args[0].target is aten.split_with_sizes.default:
        split, index = bound_arguments(node.args[0]), node.args[1]
        sizes = split["split_sizes"]
        if not _last_dim(split["self"], split["dim"]) or not all(isinstance(s, int)
                                                                 for s in sizes):
            return None
        return Columns(split["self"], sum(sizes[:index]), sum(sizes[:index + 1]))
    if node.target is aten.slice.Tensor:
        a = bound_arguments(node)
        width = _static(_val(a["self"]).shape[-1])
        start, end = a["start"], a["end"]
        if width is None or not _last_dim(a["self"], a["dim"]) or a["step"] != 1 or not all(
                x is None or isinstance(x, int) for x in (start, end)):
            return None
        start, end = 0 if start is None else start, width if end is None else end
        start, end = (x + width if x < 0 else x for x in (start, end))
        return Columns(a["self"], start, min(end, width))
    return None


def _is_value_part(node: object) -> bool:
    """The pattern's gate: V (maybe cut to the first Lq keys) is the last columns of a 4-D
    tensor's last dim — MLA's value. With `_is_assembled_key` this tells MLA-shaped attention
    from the rest, which is not reported."""
    base, _ = _uncut(node) if isinstance(node, fx.Node) else (node, None)
    part = _columns(base)
    return (part is not None and part.start > 0 and _val(part.source).dim() == 4
            and part.stop == _static(_val(part.source).shape[-1]))


def _is_assembled_key(node: object) -> bool:
    """The pattern's other gate: K (through scaling, transposes and a cut) is a cat or is
    written column by column (MLA's [k_nope | k_rope])."""
    if not isinstance(node, fx.Node):
        return False
    unscaled = _unscaled(node)
    if isinstance(unscaled, str):
        return False
    k = _uncut(unscaled[0])[0]
    return k.target in (aten.cat.default, aten.slice_scatter.default)


def _uncut(node: fx.Node) -> tuple[fx.Node, object]:
    """(x, end) for x[:, :, :end] (transformers' cut of K/V to the queries' length), else
    (node, None)."""
    if node.target is aten.slice.Tensor:
        a = bound_arguments(node)
        if a["dim"] == 2 and a["start"] in (0, None) and a["step"] == 1:
            return a["self"], a["end"]
    return node, None


_PERMUTES = {aten.transpose.int, aten.permute.default}


def _unscaled(node: fx.Node) -> tuple[fx.Node, float] | str:
    """K as the attention reads it, back to the tensor it was built as: through transposes
    and permutes that compose to no change and multiplications by constants (their product
    is returned), e.g. SDPA's decomposition, which scales K by √scale."""
    rank, order, factor = _val(node).dim(), list(range(_val(node).dim())), 1.0
    while node.op == "call_function":
        if node.target in (aten.mul.Tensor, aten.mul.Scalar) and is_number(node.args[1]):
            factor *= node.args[1]
        elif node.target is aten.transpose.int:
            a, b = node.args[1] % rank, node.args[2] % rank
            order[a], order[b] = order[b], order[a]
        elif node.target is aten.permute.default:
            order = [order[d % rank] for d in node.args[1]]
        elif node.target is not aten.alias.default:
            break
        node = node.args[0]
    if order != list(range(rank)):
        return f"K reaches the attention through the permutation {order} of its dims"
    return node, factor


def _written_columns(node: fx.Node) -> list[tuple[fx.Node, int, int]] | str:
    """The parts K is assembled from along its last dim, as (value, start, stop) in order:
    cat([a, b, ...], -1), or transformers' `key = new_empty(...); key[..., :n].copy_(a);
    key[..., n:].copy_(b)`, which arrives functionalised as slice_scatter(slice_scatter(
    new_empty, copy(slice(new_empty), a)), copy(slice(·), b)). Every column must be written
    exactly once (new_empty's memory is garbage)."""
    width = _static(_val(node).shape[-1])
    if node.target is aten.cat.default:
        a, parts, start = bound_arguments(node), [], 0
        if not _last_dim(node, a["dim"]):
            return "K is a cat over another dim than its last"
        for part in a["tensors"]:
            stop = start + _val(part).shape[-1]
            parts.append((part, start, stop))
            start = stop
        return parts
    writes = []
    while node.target is aten.slice_scatter.default:
        a = bound_arguments(node)
        start, end = a["start"] or 0, a["end"]
        if not _last_dim(node, a["dim"]) or a["step"] != 1 or start not in range(width or 0) \
                or not (end is None or isinstance(end, int)):
            return "K is written by a slice_scatter that is no range of its last dim"
        end = width if end is None or end >= sys.maxsize else end
        src = a["src"]
        if src.target is aten.copy.default:  # copy_(view, value): the value, broadcast
            view, src = src.args[:2]
            if not _same_slice(view, a):
                return "K's copy_ writes another slice than the one scattered"
            if _val(src).dtype != _val(node).dtype:
                return "a part of K is cast as it is copied in"
        writes.append((src, start, end))
        node = a["self"]
    if node.target not in (aten.new_empty.default, aten.empty.memory_format) or not writes:
        return "K is neither a cat nor written column by column into an empty tensor"
    writes.sort(key=lambda w: w[1])
    covered = 0
    for _, start, stop in writes:
        if start != covered:
            return (f"K's columns [{covered}, {start}) are written "
                    f"{'twice' if start < covered else 'never'}")
        covered = stop
    return writes if covered == width else f"K's columns [{covered}, {width}) are never written"


def _same_slice(view: fx.Node, scatter: dict) -> bool:
    """Whether `view` is the slice of the tensor a slice_scatter (its bound arguments) writes
    into that it writes."""
    if view.target is not aten.slice.Tensor:
        return False
    v = bound_arguments(view)
    return v["self"] is scatter["self"] and all(v[k] == scatter[k]
                                                 for k in ("dim", "start", "end", "step"))


def _shared_rope(node: fx.Node) -> fx.Node | str:
    """The one rotary key [B, 1, L, P] behind K's rope columns: itself, or expanded over the
    heads (copy_ broadcasts as expand does)."""
    while node.target in (aten.expand.default, aten.alias.default):
        node = node.args[0]
    shape = _val(node).shape
    if len(shape) != 4 or not layout.same(shape[1], 1):
        return (f"K's rope columns come from a {list(shape)} tensor, not one key shared by "
                "the heads")
    return node


def _strip_aliases(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target is aten.alias.default:
        node = node.args[0]
    return node


def _chain_source(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in layout.CHAIN_OPS:
        node = node.args[0]
    return node


@dataclass(frozen=True)
class Expansion:
    """kv = kv_b_proj(latent) viewed as [B, H, L, n + v]: the latent [B, 1, L, R] and the
    weight W [H · (n + v), R]."""

    latent: fx.Node
    weight: fx.Node
    heads: int


def _transposed_matrix(node: fx.Node) -> bool:
    """Whether `node` is Wᵀ of a 2-D W: t(W), transpose(W, 0, 1) or permute(W, [1, 0])."""
    if node.op != "call_function" or _val(node.args[0]).dim() != 2:
        return False
    if node.target is aten.t.default:
        return True
    if node.target is aten.transpose.int:
        return node.args[1] % 2 != node.args[2] % 2
    return node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]


def _expansion(kv: fx.Node, head_width: int) -> Expansion | str:
    """Prove that kv [B, H, L, n + v] is the latent's rows times Wᵀ with the output features
    split head-major: mm(latent.view(B·L, R), t(W)), viewed back and transposed."""
    mm = _chain_source(kv)
    if mm.target is aten.addmm.default:
        return "kv_b_proj has a bias"
    if mm.target is attnopt.w4a16_linear.default:
        return "kv_b_proj is int4 (w4a16_linear): its float weight is not in the graph"
    if mm.target is not aten.mm.default:
        return f"K/V are not a linear projection of the latent ({mm.name} is {mm.target})"
    rows, weight_t = mm.args
    if not _transposed_matrix(weight_t):
        return "kv_b_proj's weight is not a transposed 2-D tensor"
    weight = weight_t.args[0]
    out_features, rank = _val(weight).shape
    heads = _static(out_features) and out_features // head_width
    if not heads or heads * head_width != out_features or not layout.same(
            _val(weight_t).shape[0], rank):
        return (f"kv_b_proj's {out_features} outputs are not heads of {head_width} "
                "(qk_nope_head_dim + v_head_dim)")
    latent = _chain_source(rows)
    shape = _val(latent).shape
    if len(shape) != 4 or not layout.same(shape[1], 1) or not layout.same(shape[3], rank):
        return f"kv_b_proj reads a {list(shape)} tensor, not a latent [B, 1, L, {rank}]"
    c = layout.source_layout("c", shape)
    lay = layout.trace(rows, {latent: c})
    if lay is None or layout.drop_units(lay.axes, lay) != layout.drop_units(
            ((("c", 0), ("c", 1), ("c", 2)), (("c", 3),)), c):
        return "kv_b_proj's input is not the latent's tokens as rows"
    w = (("w", 0), ("w", 1))
    projected = layout.Layout((lay.axes[0], w), {**lay.sizes, w[0]: heads, w[1]: head_width})
    out = layout.trace(kv, {mm: projected})
    want = ((("c", 0),), (w[0],), (("c", 2),), (w[1],))
    if out is None or layout.drop_units(out.axes, out) != layout.drop_units(want, out):
        return "kv_b_proj's output is not viewed as [B, H, L, n + v], heads first"
    if _val(weight).dtype != _val(latent).dtype:
        return f"kv_b_proj's weight is {_val(weight).dtype} and the latent {_val(latent).dtype}"
    return Expansion(latent, weight, heads)


@dataclass(frozen=True)
class Paged:
    """The latent and rope gathered from a PagedKVCache's pools (its K and V)."""

    ckv_pool: fx.Node
    krot_pool: fx.Node
    block_table: fx.Node
    seq_lens: fx.Node
    ckv_scale: fx.Node | None
    krot_scale: fx.Node | None


def _paged(latent: fx.Node, rope: fx.Node) -> Paged | None:
    gathers = [_strip_aliases(x) for x in (latent, rope)]
    if not all(g.target is attnopt.paged_gather.default for g in gathers):
        return None
    (c_pool, table, lens, c_scale, dtype), (r_pool, table2, lens2, r_scale, dtype2) = (
        (*g.args, *[None] * (5 - len(g.args))) for g in gathers)
    if table is not table2 or lens is not lens2 or dtype != dtype2:
        return None
    return Paged(c_pool, r_pool, table, lens, c_scale, r_scale)


@dataclass(frozen=True)
class Plan:
    q: fx.Node
    nope: int
    rope: int
    value: int
    expansion: Expansion
    rope_key: fx.Node
    paged: Paged | None
    cut: object  # K's cut to the queries' length (an int or a SymInt node), else None
    scale: float


def plan(m: Match, ctx) -> Plan | str:
    """The absorbed rewrite of this attention, or why it is not made."""
    v, v_cut = _uncut(m["v"])
    value = _columns(v)
    kv = value.source
    nope, width = value.start, value.stop
    unscaled = _unscaled(m["k"])
    if isinstance(unscaled, str):
        return unscaled
    k, factor = unscaled
    k, k_cut = _uncut(k)
    written = _written_columns(k)
    if isinstance(written, str):
        return written
    if len(written) != 2:
        return f"K is assembled from {len(written)} parts, not [k_nope, k_rope]"
    (k_nope, _, n), (rope_part, _, k_width) = written
    k_nope_columns = _columns(k_nope)
    if n != nope or k_nope_columns != Columns(kv, 0, nope):
        return (f"K's first {n} columns are not the first {nope} columns of the projection "
                "V is split from (k_nope)")
    rope = k_width - nope
    expansion = _expansion(kv, width)
    if isinstance(expansion, str):
        return expansion
    rope_key = _shared_rope(rope_part)
    if isinstance(rope_key, str):
        return rope_key
    q, latent = _val(m["q"]), _val(expansion.latent)
    rope_shape = _val(rope_key).shape
    if not (layout.same(rope_shape[0], latent.shape[0]) and layout.same(rope_shape[2],
                                                                        latent.shape[2])):
        return (f"the rope key {list(rope_shape)} and the latent {list(latent.shape)} hold "
                "other tokens")
    if q.dim() != 4 or not layout.same(q.shape[1], expansion.heads) or not layout.same(
            q.shape[3], k_width) or not layout.same(q.shape[0], latent.shape[0]):
        return (f"q {list(q.shape)} is not [B, {expansion.heads} heads, Lq, {k_width}]: the "
                "nope and rope parts of K's")
    if (k_cut is None) != (v_cut is None) or (k_cut is not None and not (
            layout.same(layout.value(k_cut), q.shape[2])
            and layout.same(layout.value(v_cut), q.shape[2]))):
        return "K and V are cut to other lengths than the queries'"
    paged = _paged(expansion.latent, rope_key)
    if paged is not None and (reason := _paged_problem(m, k_cut is not None, _val(m["k"]))):
        return reason
    if paged is not None and _val(paged.ckv_pool).dtype not in (q.dtype, torch.int8):
        return (f"the cache's pools are {_val(paged.ckv_pool).dtype} and the queries "
                f"{q.dtype}")
    result = Plan(m["q"], nope, rope, width - nope, expansion, rope_key, paged, k_cut,
                  m["scale"] * factor)
    return _cost_problem(result, _val(m["k"]).shape[2], ctx) or result


def _paged_problem(m: Match, cut: bool, k: torch.Tensor) -> str | None:
    """The kv_cache pass's contract for reading a PagedKVCache's tokens only: the model's mask
    hides the capacity past each length, or it is transformers' prefill into an empty cache."""
    if cut:
        if m["mask"] is not None or not m["is_causal"]:
            return "K/V cut to the queries' length without the causal flag alone"
        return None
    if m["mask"] is None:
        return ("attention over the cache has no mask, so nothing hides the positions past "
                "each sequence's length; left as it is")
    if m["is_causal"]:
        return "is_causal over the cache's capacity is not a causal mask over the cached tokens"
    if not layout.same(_val(m["mask"]).shape[-1], k.shape[2]):
        return f"the mask's key dim ({_val(m['mask']).shape[-1]}) does not span the cache"
    return None


def _cost_problem(p: Plan, keys: object, ctx) -> str | None:
    """Why the naive form is cheaper here, or None: per head, expanding costs
    Le · R · (n + v) + Lq · Lk · (n + P + v) multiply-adds, absorbing Lq · R · (n + v) +
    Lq · Lk · (2R + P) (Le: tokens kv_b_proj expands, Lk: keys attention reads; symbolic
    lengths count per token, as long contexts do)."""
    rank = _val(p.expansion.latent).shape[3]
    lq, expanded = _static(_val(p.q).shape[2]), _static(_val(p.expansion.latent).shape[2])
    keys = _static(keys)
    if lq is None:
        if ctx.exporting:
            return None
        return ("the query length is symbolic (a prefill graph for every prompt length): "
                "left in the naive form, which costs less for long prompts")
    heads_w, attend_w = p.nope + p.value, p.nope + p.rope + p.value
    if expanded is None or keys is None:  # per cached token
        naive, absorbed = rank * heads_w + lq * attend_w, lq * (2 * rank + p.rope)
    else:
        naive = expanded * rank * heads_w + lq * keys * attend_w
        absorbed = lq * rank * heads_w + lq * keys * (2 * rank + p.rope)
    if absorbed < naive:
        return None
    return (f"{lq} queries: expanding the latent costs less than absorbing kv_b_proj "
            f"({naive:,} against {absorbed:,} multiply-adds per head); left in the naive form")


# --- the rewrite -------------------------------------------------------------------------------


def check(m: Match, ctx) -> str | None:
    if ctx.training:  # the attention pass leaves training graphs' attention alone today
        return ("a graph that computes gradients: the latent attention ops have no backward; "
                "left in the expanded form")
    result = plan(m, ctx)
    return result if isinstance(result, str) else None


def rewrite(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    p = plan(m, ctx)
    n, width, heads = p.nope, p.nope + p.value, p.expansion.heads
    call = lambda op, *args: insert_call(graph, op, args)
    weight = call(aten.view.default, p.expansion.weight,
                  [heads, width, _val(p.expansion.weight).shape[1]])
    w_uk = call(aten.slice.Tensor, weight, 1, 0, n)  # [H, n, R]
    w_uv_t = call(aten.transpose.int, call(aten.slice.Tensor, weight, 1, n, width), 1, 2)
    q_lat = call(aten.matmul.default, call(aten.slice.Tensor, p.q, 3, 0, n), w_uk)
    q_rot = call(aten.slice.Tensor, p.q, 3, n, n + p.rope)
    if p.paged is not None:
        g = p.paged
        out_lat = insert_call(graph, attnopt.paged_latent_attention.default, (
            q_lat, q_rot, g.ckv_pool, g.krot_pool, g.block_table, g.seq_lens, p.scale,
            m["is_causal"], m["impl"], g.ckv_scale, g.krot_scale, m["mask"]))
    else:
        latent, rope_key = p.expansion.latent, p.rope_key
        if p.cut is not None:  # the keys transformers' prefill reads: the first Lq
            latent, rope_key = (call(aten.slice.Tensor, x, 2, 0, p.cut)
                                for x in (latent, rope_key))
        out_lat = insert_call(graph, attnopt.latent_attention.default, (
            q_lat, q_rot, latent, rope_key, m["mask"], m["is_causal"], p.scale),
            {"impl": m["impl"]})
    return call(aten.matmul.default, out_lat, w_uv_t)


mla = Call(attnopt.attention.default, Capture("q"), Capture("k", where=_is_assembled_key),
           Capture("v", where=_is_value_part), Capture("mask"),
           Literal("is_causal"), Literal("scale"), impl=Literal("impl"),
           layout=Capture("layout"))  # any: the replacement keeps the old node's layout

mla_pass = PatternPass("mla", counts_as="kv_cache", rules=[Rule("absorbed", mla, rewrite, check)])
