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
    static  transformers' StaticCache: index_copy(cache [B, Hkv, max_len, D], 2, past + arange(n),
            new) in place, and attention reads all of max_len. A static buffer is a paged pool
            whose blocks are whole sequences — pool [B, max_len, Hkv, D] (a transposed view, no
            copy), table [[0], [1], ...], lens = past + n — so it becomes the same
            paged_attention, reading past + n keys instead of max_len.
    dynamic transformers' DynamicCache: cat([past, new], 2) copies the whole cache every step,
            and the result must stay a graph output (the cache object keeps it), so there is
            nothing to read in place. Compiled, it is refused with the advice to pass a
            PagedKVCache. Exported (`ctx.exporting`, the offline path), the two cats and the
            attention become one attention_with_past(q, k, v, past_k, past_v, mask), whose
            present K/V replace the cats as the cache's new value: ONNX's Attention with its
            past_key/past_value inputs and present outputs (`backends/onnx.py`), the form ONNX
            decoders take. Only then: in PyTorch it saves nothing (the copy is the same).

The paged and static rewrites read fewer keys than the attention they replace: the positions
past each sequence's length. The fallback gives those positions zeros (paged) or stale zeros
(static), and the model's mask hides them — transformers builds it for the capacity the cache
reports, with every key after the query's own position masked, as any causal decoder must. That
is the contract the rewrite relies on, so attention without a mask, or with `is_causal` meaning
"bottom-right over the capacity", is refused. One exception, also transformers': a prefill into
an empty cache without padding drops the mask and cuts K/V to the Lq new tokens with
`is_causal`; that becomes paged_attention's causal mode, whose diagonal ends at each sequence's
length (the same keys when the new tokens are the whole cache, which transformers only does
then).
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

aten, attnopt = torch.ops.aten, torch.ops.attnopt
_ALIASES = frozenset({aten.alias.default})


def _cached(kv: str, read: Pattern) -> Pattern:
    """What attention reads of the cache: all of it, or (prefill into an empty cache, where
    transformers drops the mask) its first Lq positions."""
    whole = Chain(read, _ALIASES, name=kv)
    return Call(aten.slice.Tensor, whole, 2, 0, Capture(f"{kv}_end")) | whole


def _attention(k: Chain, v: Chain) -> Call:
    return Call(attnopt.attention.default, Capture("q"), k, v, Capture("mask"),
                Literal("is_causal"), Literal("scale"), impl=Literal("impl"))


# --- paged: PagedKVCache's gather fallback --------------------------------------------------------

def _gather(pool: str, scale: str) -> Call:
    return Call(attnopt.paged_gather.default, Capture(pool), Capture("block_table"),
                Capture("seq_lens"), Capture(scale), Literal("dtype"))


paged = _attention(_cached("k", _gather("k_pool", "k_scale")),
                   _cached("v", _gather("v_pool", "v_scale")))


def rewrite_paged(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    return _paged_attention(graph, m, m["k_pool"], m["v_pool"], m["block_table"], m["seq_lens"],
                            m["k_scale"], m["v_scale"])


# --- static: StaticCache's buffers, written with index_copy ---------------------------------------

_FACTORY = dict(dtype=ANY, layout=ANY, device=ANY, pin_memory=ANY)
_arange = (Call(aten.arange.default, Capture("n"), **_FACTORY)
           | Call(aten.arange.start_step, 0, Capture("n"), 1, **_FACTORY))


# index_copy(cache, 2, past + arange(n), new): the write stays in the graph (it is the cache
# update), so it is matched on its own, not consumed with the attention.
_write = Call(aten.index_copy.default, Capture("cache"), 2,
              Call(aten.add.Tensor, _arange, Capture("past"), commutative=True), Capture("new"))


def _static_write(node: object) -> Match | None:
    if not isinstance(node, fx.Node) or node.target is not aten.index_copy.default:
        return None
    return next(Matcher().match(_write, node), None)


static = _attention(_cached("k", Capture("k_written", where=_static_write)),
                    _cached("v", Capture("v_written", where=_static_write)))


def check_static(m: Match, ctx) -> str | None:
    k, v = _static_write(m["k_written"]), _static_write(m["v_written"])
    if k["past"] is not v["past"] or k["n"] != v["n"]:
        return "K and V are written at different positions"
    past = k["past"].meta.get("val")
    if not isinstance(past, torch.Tensor) or past.numel() != 1:
        return "the cache position is not one offset shared by the batch"
    if not layout.same(k["new"].meta["val"].shape[2], k["n"]):
        return "the positions written are not past + arange(new tokens)"
    return check(m, ctx)


def rewrite_static(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    """The buffers [B, Hkv, max_len, D] as pools of B blocks of max_len tokens: a transposed
    view each, one block per sequence, every sequence past + n long."""
    write = _static_write(m["k_written"])
    batch = m["k"].meta["val"].shape[0]
    pools = [insert_call(graph, aten.transpose.int, (m[name], 1, 2)) for name in ("k", "v")]
    device = write["past"].meta["val"].device
    table = insert_call(graph, aten.arange.default, (batch,),
                        {"dtype": torch.int32, "device": device})
    table = insert_call(graph, aten.unsqueeze.default, (table, 1))
    length = insert_call(graph, aten.add.Tensor, (write["past"], write["n"]))
    length = insert_call(graph, aten.view.default, (length, [1]))
    lens = insert_call(graph, aten.expand.default, (length, [batch]))
    lens = insert_call(graph, aten._to_copy.default, (lens,), {"dtype": torch.int32})
    return _paged_attention(graph, m, *pools, table, lens, None, None)


# --- shared -------------------------------------------------------------------------------------

def check(m: Match, ctx) -> str | None:
    if "k_end" in m.captures or "v_end" in m.captures:
        return _check_prefill(m)
    if m["mask"] is None:
        return ("attention over the cache has no mask, so nothing hides the positions past "
                "each sequence's length; left as it is")
    if m["is_causal"]:
        return "is_causal over the cache's capacity is not a causal mask over the cached tokens"
    k, mask = m["k"].meta["val"], m["mask"].meta["val"]
    if not layout.same(mask.shape[-1], k.shape[2]):
        return f"the mask's key dim ({mask.shape[-1]}) does not span the cache ({k.shape[2]})"
    return None


def _check_prefill(m: Match) -> str | None:
    """transformers' prefill into an empty cache without padding: no mask, is_causal, and K/V
    cut to the Lq new tokens, which are then the whole cache — what paged_attention's causal
    mode reads (query i sees keys up to seq_len - Lq + i = i)."""
    lq = m["q"].meta["val"].shape[2]
    ends = [layout.value(m.get(f"{kv}_end")) for kv in "kv"]
    if not all(end is not None and layout.same(end, lq) for end in ends):
        return "K/V are cut to another length than the queries'"
    if m["mask"] is not None or not m["is_causal"]:
        return "K/V cut to the queries' length without the causal flag alone"
    return None


def _paged_attention(graph: fx.Graph, m: Match, k_pool, v_pool, table, lens, k_scale,
                     v_scale) -> fx.Node:
    scale = m["scale"] if m["scale"] is not None else m["q"].meta["val"].shape[-1] ** -0.5
    return insert_call(graph, attnopt.paged_attention.default,
                       (m["q"], k_pool, v_pool, table, lens, scale, m["is_causal"], m["impl"],
                        k_scale, v_scale, m["mask"]))


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
                       {"impl": m["impl"]})
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
