"""kv_cache: attention that reads a KV cache reads it in place, with `attnopt::paged_attention`;
for export, attention over a DynamicCache takes the past as ONNX's Attention does.

Runs after the attention pass, so every spelling of attention is one `attnopt::attention` here
(repeat_kv folded: K/V are the cache's own, unrepeated heads). What the cache update looks like
in the graph, and what becomes of it:

    paged   attnopt.cache.PagedKVCache: the new rows go into the block pools with index_copy_
            (in place: the pools are graph inputs the graph mutates), then
            attention(q, paged_gather(k_pool, table, lens), paged_gather(v_pool, ...), mask)
            reads a capacity-sized copy of the cache. Becomes
            paged_attention(q, k_pool, v_pool, table, lens, mask): the copy is gone, and the
            kernel reads each sequence's cached tokens only, split over the KV length.
    static  a static cache (transformers' StaticCache, or one written by hand):
            index_copy(cache [B, Hkv, max_len, D], 2, positions, new) in place, and attention
            reads all of max_len through the model's mask. A static buffer is a paged pool
            whose blocks are whole sequences — pool [B, max_len, Hkv, D] (a transposed view, no
            copy), table [[0], [1], ...] — so it becomes the same paged_attention, reading each
            sequence's keys up to the last one its mask lets any query see (`_mask_extent`),
            computed from the mask on the device: past + n for transformers' causal masks.
    dynamic transformers' DynamicCache: cat([past, new], 2) copies the whole cache every step,
            and the result must stay a graph output (the cache object keeps it), so there is
            nothing to read in place. Compiled, it is refused with the advice to pass a
            PagedKVCache. Exported (`ctx.exporting`, the offline path), the two cats and the
            attention become one attention_with_past(q, k, v, past_k, past_v, mask), whose
            present K/V replace the cats as the cache's new value: ONNX's Attention with its
            past_key/past_value inputs and present outputs (`backends/onnx.py`), the form ONNX
            decoders take. Only then: in PyTorch it saves nothing (the copy is the same).

The paged and static rewrites read fewer keys than the attention they replace. Static: the
keys past the extent are those the mask hides from every query of the sequence (a bool False or
-inf, which drop a key, or a fill at or below half the dtype's minimum, which exp() turns into
exactly 0 beside any visible key; a row that sees no key at all but has finite fills averages V
over every slot in eager, so its sequence is read whole): exact for any mask, a hand-written
one included. Paged: `PagedKVCache` holds exactly its tokens (the eager, uncompiled model reads
just those), and the gathered copy of the compiled fallback pads them with zeros to the
capacity for the model's mask to hide, which transformers' masks do. Attention without a mask,
or with `is_causal` meaning "bottom-right over the capacity", is refused. One exception, also
transformers': a prefill into an empty cache without padding drops the mask and cuts K/V to the
Lq new tokens with `is_causal`; that becomes paged_attention's causal mode, whose diagonal ends
at each sequence's length (the same keys when the new tokens are the whole cache, which
transformers only does then).
"""

from __future__ import annotations

import operator
import sys

import torch
import torch.fx as fx

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.compiler import layout
from attnopt.compiler.graph import fake_value, insert_call
from attnopt.compiler.pattern import (
    ANY,
    Call,
    Capture,
    Chain,
    Literal,
    Match,
    Matcher,
    Pattern,
    Rule,
    bound_arguments,
)
from attnopt.compiler.rewrite import PatternPass
from attnopt.passes.attention_call import VARIANT_DEFAULTS, given_variants

aten, attnopt = torch.ops.aten, torch.ops.attnopt
_ALIASES = frozenset({aten.alias.default})


def _cached(kv: str, read: Pattern) -> Pattern:
    """What attention reads of the cache: all of it, or (prefill into an empty cache, where
    transformers drops the mask) its first Lq positions."""
    whole = Chain(read, _ALIASES, name=kv)
    return Call(aten.slice.Tensor, whole, 2, 0, Capture(f"{kv}_end")) | whole


# The variants of attnopt::attention (reference.ScoreMods), carried over to paged_attention.
VARIANTS = tuple(VARIANT_DEFAULTS)


def _attention(k: Chain, v: Chain) -> Call:
    return Call(attnopt.attention.default, Capture("q"), k, v, Capture("mask"),
                Literal("is_causal"), Literal("scale"), impl=Literal("impl"),
                layout=Capture("layout"), **{name: Capture(name) for name in VARIANTS})


def _variants(m: Match) -> dict:
    return given_variants({name: m[name] for name in VARIANTS})


# --- paged: PagedKVCache's gather fallback --------------------------------------------------------

def _gather(pool: str, scale: str) -> Call:
    return Call(attnopt.paged_gather.default, Capture(pool), Capture("block_table"),
                Capture("seq_lens"), Capture(scale), Literal("dtype"))


paged = _attention(_cached("k", _gather("k_pool", "k_scale")),
                   _cached("v", _gather("v_pool", "v_scale")))


def rewrite_paged(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    return _paged_attention(graph, m, m["k_pool"], m["v_pool"], m["block_table"], m["seq_lens"],
                            m["k_scale"], m["v_scale"])


# --- static: a static cache's buffers, written with index_copy ----------------------------------

# index_copy(cache, 2, positions, new): the write stays in the graph (it is the cache update), so
# it is matched on its own, not consumed with the attention.
_write = Call(aten.index_copy.default, Capture("cache"), 2, Capture("positions"), Capture("new"))


def _static_write(node: object) -> Match | None:
    if not isinstance(node, fx.Node) or node.target is not aten.index_copy.default:
        return None
    return next(Matcher().match(_write, node), None)


static = _attention(_cached("k", Capture("k_written", where=_static_write)),
                    _cached("v", Capture("v_written", where=_static_write)))


def check_static(m: Match, ctx) -> str | None:
    if "k_end" in m.captures or "v_end" in m.captures:
        return "K/V are cut before attention reads them: not the whole static buffer"
    return check(m, ctx)


def rewrite_static(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    """The buffers [B, Hkv, max_len, D] as pools of B blocks of max_len tokens: a transposed
    view each, one block per sequence, read up to the mask's extent."""
    batch = m["k"].meta["val"].shape[0]
    pools = [insert_call(graph, aten.transpose.int, (m[name], 1, 2)) for name in ("k", "v")]
    table = insert_call(graph, aten.arange.default, (batch,),
                        {"dtype": torch.int32, "device": m["k"].meta["val"].device})
    table = insert_call(graph, aten.unsqueeze.default, (table, 1))
    lens = _mask_extent(graph, m["mask"], batch)
    return _paged_attention(graph, m, *pools, table, lens, None, None)


def _mask_extent(graph: fx.Graph, mask: fx.Node, batch: object) -> fx.Node:
    """[B] int32: per sequence, 1 + the last key column that some query row of it sees, or all
    of them when some row sees none but holds finite fills (eager averages V over every slot
    there); 0 when nothing is seen. A key is hidden by False, by -inf, or by a fill at or below
    half the dtype's minimum (its exp() is exactly 0 beside a visible key)."""
    val = mask.meta["val"]
    call = lambda op, *args, **kwargs: insert_call(graph, op, args, kwargs)
    if val.dtype == torch.bool:
        visible = mask
    else:
        visible = call(aten.gt.Scalar, mask, torch.finfo(val.dtype).min / 2)
    lead = call(aten.flatten.using_ints, visible, 1, 2)  # [B', H'·Lq', max_len]
    seen = call(aten.any.dim, lead, 1)  # [B', max_len]: some row sees the key
    positions = call(aten.arange.start, 1, val.shape[-1] + 1 if isinstance(val.shape[-1], int)
                     else call(aten.add.Tensor, call(aten.sym_size.int, mask, -1), 1),
                     dtype=torch.int32, device=val.device)
    extent = call(aten.amax.default, call(aten.mul.Tensor, seen, positions), [-1])  # [B']
    if val.dtype != torch.bool:
        blind = call(aten.logical_not.default, call(aten.any.dim, visible, -1))  # row sees none
        finite = call(aten.any.dim, call(aten.isfinite.default, mask), -1)
        whole = call(aten.any.dim, call(aten.flatten.using_ints, call(
            aten.logical_and.default, blind, finite), 1, 2), 1)  # [B']
        everything = call(aten.full_like.default, extent, val.shape[-1]
                          if isinstance(val.shape[-1], int)
                          else call(aten.sym_size.int, mask, -1))
        extent = call(aten.where.self, whole, everything, extent)
    # Expanded first, then copied: the kernels read seq_lens as a contiguous [B].
    return call(aten._to_copy.default, call(aten.expand.default, extent, [batch]),
                dtype=torch.int32, memory_format=torch.contiguous_format)


# --- shared -------------------------------------------------------------------------------------

def check(m: Match, ctx) -> str | None:
    if "k_end" in m.captures or "v_end" in m.captures:
        return _check_prefill(m)
    if m["mask"] is None:
        return ("attention over the cache has no mask, so nothing hides the positions past "
                "each sequence's length; left as it is")
    if m["is_causal"]:
        return "is_causal over the cache's capacity is not a causal mask over the cached tokens"
    if m["alibi_slopes"] is not None or m["window_left"] >= 0 or m["window_right"] >= 0:
        return ("ALiBi or a window over the cache's capacity counts positions from its end, "
                "not from each sequence's last token")
    k = m["k"].meta["val"]
    for what, t in (("mask", m["mask"]), *(("a bias", b) for b in m["biases"] or ())):
        if not layout.same(t.meta["val"].shape[-1], k.shape[2]):
            return (f"{what}'s key dim ({t.meta['val'].shape[-1]}) does not span the cache "
                    f"({k.shape[2]})")
    return None


def _check_prefill(m: Match) -> str | None:
    """transformers' prefill into an empty cache without padding: no mask, is_causal, and K/V
    cut to the Lq new tokens, which are then the whole cache — what paged_attention's causal
    mode reads (query i sees keys up to seq_len - Lq + i = i)."""
    lq = m["q"].meta["val"].shape[2]
    ends = [layout.value(m.get(f"{kv}_end")) for kv in "kv"]
    if not all(end is not None and layout.same(end, lq) for end in ends):
        return "K/V are cut to another length than the queries'"
    if m["mask"] is not None or not m["is_causal"] or m["biases"]:
        return "K/V cut to the queries' length without the causal flag alone"
    return None


def _paged_attention(graph: fx.Graph, m: Match, k_pool, v_pool, table, lens, k_scale,
                     v_scale) -> fx.Node:
    scale = m["scale"] if m["scale"] is not None else m["q"].meta["val"].shape[-1] ** -0.5
    return insert_call(graph, attnopt.paged_attention.default,
                       (m["q"], k_pool, v_pool, table, lens, scale, m["is_causal"], m["impl"],
                        k_scale, v_scale, m["mask"]), _variants(m))


# --- dynamic: DynamicCache's cat ----------------------------------------------------------------

def _cache_step(node: object) -> bool:
    """cat([past, new], 2) of two [B, H, L, D] tensors: a DynamicCache layer's update. Its
    result is also the cache's new value (read after the attention), so it is captured, not
    consumed."""
    if not isinstance(node, fx.Node) or node.target is not aten.cat.default:
        return False
    arguments = bound_arguments(node)
    tensors = [fake_value(t) for t in arguments["tensors"]]
    return (len(tensors) == 2 and arguments["dim"] in (2, -2)
            and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors))


def _whole(x: Pattern) -> Pattern:
    """x, or x sliced over all of one dim: a dynamic-shape trace keeps the `:` of
    `x[:, :, None]` (repeat_kv's, which the attention pass folded) as such a slice."""
    return Call(aten.slice.Tensor, x, ANY, Literal(where=lambda start: start in (None, 0)),
                Literal(where=lambda end: end in (None, sys.maxsize))) | x


dynamic = _attention(_whole(Capture("k_present", where=_cache_step)),
                     _whole(Capture("v_present", where=_cache_step)))


def rewrite_dynamic(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    """attention_with_past; its present K/V take the cats' place for every reader after the
    attention (the cache's new value). A reader before it keeps its cat, which stays for it."""
    (past_k, k), (past_v, v) = (bound_arguments(m[f"{kv}_present"])["tensors"] for kv in "kv")
    call = insert_call(graph, attnopt.attention_with_past.default,
                       (m["q"], k, v, past_k, past_v, m["mask"], m["is_causal"], m["scale"]),
                       {"impl": m["impl"], **_variants(m)})
    out, present_k, present_v = (insert_call(graph, operator.getitem, (call, i))
                                 for i in range(3))
    for cat, present in ((m["k_present"], present_k), (m["v_present"], present_v)):
        cat.replace_all_uses_with(present, delete_user_cb=lambda user: user > m.anchor)
    return out


def _explain_dynamic_caches(graph: fx.Graph, ctx) -> None:
    """Attention whose K is cat([a graph input, new], dim=2): the DynamicCache step, left as it
    is in a compiled graph."""
    for node in graph.find_nodes(op="call_function", target=attnopt.attention.default):
        k = node.args[1]
        if (isinstance(k, fx.Node) and k.target is aten.cat.default
                and k.args[0][0].op == "placeholder"
                and (k.args[1] if len(k.args) > 1 else 0) in (2, -2)):
            ctx.reject(node, "K/V are cat([cache, new]) (a DynamicCache): each step copies the "
                             "whole cache and keeps the copy, so nothing can be read in place; "
                             "pass an attnopt.cache.PagedKVCache to generate")


class KVCachePass:
    """paged and static everywhere; dynamic only in graphs for export (`ctx.exporting`), while
    a compiled graph gets the reason DynamicCache is left alone instead."""

    name, counts_as, needs_frozen_weights = "kv_cache", "kv_cache", False

    def __init__(self) -> None:
        rules = [Rule("paged", paged, rewrite_paged, check),
                 Rule("static", static, rewrite_static, check_static)]
        self.rules = PatternPass(self.name, counts_as=self.counts_as, rules=rules)
        self.export_rules = PatternPass(self.name, counts_as=self.counts_as, rules=[
            *rules, Rule("dynamic", dynamic, rewrite_dynamic)])

    def not_applicable(self, options) -> str | None:
        return None

    def apply(self, gm: fx.GraphModule, ctx) -> int:
        if ctx.exporting:
            return self.export_rules.apply(gm, ctx)
        rewrites = self.rules.apply(gm, ctx)
        _explain_dynamic_caches(gm.graph, ctx)
        return rewrites


kv_cache_pass = KVCachePass()
