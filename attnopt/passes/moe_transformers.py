"""transformers v5's experts implementations (`integrations/moe.py`), as rules of the moe pass:

    grouped_mm  sort the flat ids; gather x[perm // k] and w[perm]; offsets = cumsum(histc(ids));
                gate_up = grouped_mm(xs, W_gate_up, offsets) [+ b_gate_up[sorted ids]];
                h = gated(gate_up); y = grouped_mm(h, W_down, offsets) [+ b_down[sorted ids]];
                y = (y · w)[inverse(perm)]; out = y.view(T, k, H).sum(1)
    batched_mm  xs = x repeated k times; gate_up = bmm(W_gate_up[ids], xs) [+ b_gate_up[ids]];
                h = gated(gate_up); y = bmm(W_down[ids], h) [+ b_down[ids]];
                out = (y · w).view(T, k, H).sum(1)

`grouped_mm` is `transformers.grouped_mm_fallback` (its CPU custom op) or `aten._grouped_mm`.
Each weight is stored [E, N, K] (Mixtral, Qwen: transposed for the GEMM) or [E, K, N]
(`is_transposed`, GPT-OSS: read as is, or bmm'd from the left); the biases and the gating
(`moe_gating`: halves or interleaved, SiLU/GELU or GPT-OSS's clamped SwiGLU) come with them.

Under dynamic shapes (torch.export's dynamic dims, torch.compile's dynamic=True) the sizes that
follow the token count (T in the top-k sum's view, T·k in the inverse permutation's arange) are
SymInts, held by nodes of the graph: the patterns capture them rather than match them as
literals, and `check` compares them with `layout.same`, which never adds a guard.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attnopt.compiler import layout
from attnopt.compiler.graph import fake_value
from attnopt.compiler.pattern import ANY, Call, Capture, Literal, Match, Pattern, Rule, optional
from attnopt.passes.linear import is_constant
from attnopt.passes.moe_emit import cast_like, emit_moe, transposed_view
from attnopt.passes.moe_gating import form_of, gated, gating_problem, noop_reshape

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)

x, topk_ids, topk_weights = Capture("x"), Capture("topk_ids"), Capture("topk_weights")
flat_ids = Call(_VIEWS, topk_ids, [-1])
flat_weights = Call(_VIEWS, topk_weights, [-1])


def biased(projection: Pattern, bias: str, ids: Pattern) -> Pattern:
    """projection + bias[ids]: each row's expert's bias, gathered by the ids in row order."""
    added = Call(aten.add.Tensor, projection, Call(aten.index.Tensor, Capture(
        bias, where=is_constant), [ids]))
    return optional(added, through=projection)


def summed_over_topk(weighted: Call) -> Call:
    """out = y.view(T, k, H).sum(1), cast back to the activations' dtype if it was promoted."""
    total = Call(aten.sum.dim_IntList, Call(_VIEWS, weighted, Capture("tkh")), [1])
    return optional(Call(aten._to_copy.default, total, dtype=ANY), through=total)


def routed(projection: Pattern, weights: Call) -> Call:
    return Call(aten.mul.Tensor, projection, Call(aten.unsqueeze.default, weights, -1))


# --- grouped_mm -----------------------------------------------------------------------------------

# transformers registers its CPU fallback when it is imported: named, not imported, here.
_GROUPED = (aten._grouped_mm.default, "transformers::grouped_mm_fallback")
_sorted = Call(aten.sort.default, flat_ids)
perm, sorted_ids = Call(operator.getitem, _sorted, 1), Call(operator.getitem, _sorted, 0)
offsets = Call(aten.cumsum.default, Call(aten.histc.default, Call(
    aten._to_copy.default, sorted_ids, dtype=ANY), Literal("experts"), ANY, ANY), 0, dtype=ANY)
x_sorted = Call(aten.index.Tensor, x, [Call(aten.floor_divide.default, perm, Capture("k"))])
inverse = Call(aten.index_put.default, Call(aten.empty_like.default, perm, pin_memory=ANY),
               [perm], Call(aten.arange.default, Capture("pairs"), device=ANY, pin_memory=ANY))


def grouped_mm(a: Pattern, name: str) -> Call:
    """a @ W[e]ᵀ per expert run; W stored [E, N, K] (transposed for the GEMM, "<name>_nk") or
    [E, K, N] (read as it is)."""
    w = Capture(name, where=is_constant)
    return Call(_GROUPED, a, Call(aten.transpose.int, w, -2, -1, name=f"{name}_nk") | w,
                offsets)


grouped = summed_over_topk(Call(aten.index.Tensor, routed(
    biased(grouped_mm(gated(biased(grouped_mm(x_sorted, "w_gate_up"), "b_gate_up",
                                   sorted_ids)), "w_down"), "b_down", sorted_ids),
    Call(aten.index.Tensor, flat_weights, [perm])), [inverse]))

# --- batched_mm -----------------------------------------------------------------------------------

_expanded = Call(aten.expand.default, Call(aten.unsqueeze.default, x, 1), ANY)
x_repeated = Call(_VIEWS, Call(aten.clone.default, _expanded, memory_format=ANY) | _expanded, ANY)


def batched_mm(a: Pattern, name: str) -> Pattern:
    """Each row times its own expert's W: bmm(W[ids], a[:, :, None]) for W stored [E, N, K]
    ("<name>_nk"), bmm(a[:, None], W[ids]) for W stored [E, K, N]."""
    picked = Call(aten.index.Tensor, Capture(name, where=is_constant), [flat_ids])
    stored_nk = Call(aten.squeeze.dim, Call(aten.bmm.default, picked, Call(
        aten.unsqueeze.default, a, -1)), -1, name=f"{name}_nk")
    stored_kn = Call(aten.squeeze.dim, Call(aten.bmm.default, Call(
        aten.unsqueeze.default, a, 1), picked), 1)
    return stored_nk | stored_kn


batched = summed_over_topk(routed(biased(batched_mm(gated(biased(
    batched_mm(x_repeated, "w_gate_up"), "b_gate_up", flat_ids)), "w_down"), "b_down",
    flat_ids), flat_weights))


# --- check and rewrite ----------------------------------------------------------------------------


def _same_size(size: object, want: object) -> bool:
    """Whether a captured size (an int, or a node holding a SymInt) is `want` for every value its
    symbols may take; never adds a guard."""
    v = layout.value(size)
    return isinstance(v, int | torch.SymInt) and layout.same(v, want)


def _op_shape(m: Match, name: str) -> tuple[int, ...]:
    """A stacked weight's shape in the op's layout [E, N, K], however it is stored."""
    shape = tuple(fake_value(m[name]).shape)
    return shape if f"{name}_nk" in m.captures else (*shape[:-2], shape[-1], shape[-2])


def check(m: Match, ctx=None) -> str | None:
    xv, ids, w = fake_value(m["x"]), fake_value(m["topk_ids"]), fake_value(m["topk_weights"])
    if xv.dim() != 2 or ids.dim() != 2 or w.dim() != 2 or not all(
            map(layout.same, (xv.shape[0], *w.shape), (ids.shape[0], *ids.shape))):
        return (f"x {list(xv.shape)}, ids {list(ids.shape)}, weights {list(w.shape)}: not "
                "[T, H], [T, k], [T, k]")
    t, k = ids.shape
    gu, down = _op_shape(m, "w_gate_up"), _op_shape(m, "w_down")
    if len(gu) != 3 or len(down) != 3:
        return f"expert weights {list(gu)} / {list(down)} are not stacked [E, N, K]"
    e, two_i, h = gu  # frozen weights: static sizes
    if down != (e, h, two_i // 2) or two_i % 2 or not layout.same(xv.shape[1], h):
        return (f"expert weights gate_up {list(gu)} / down {list(down)} (as [E, N, K]) do not "
                f"fit hidden {xv.shape[1]}")
    if problem := gating_problem(m, two_i):
        return problem
    for bias, n in (("b_gate_up", two_i), ("b_down", h)):
        if bias in m.captures and tuple(fake_value(m[bias]).shape) != (e, n):
            return f"{bias} is {list(fake_value(m[bias]).shape)}, not one [{n}] row per expert"
    tkh = layout.value(m["tkh"])
    if len(tkh) != 3 or not (_same_size(tkh[0], t) or _same_size(tkh[0], -1)) \
            or not all(map(_same_size, tkh[1:], (k, h))):
        return f"the top-k sum views the outputs as {tkh}, not [T, k, H] = [{t}, {k}, {h}]"
    if "k" in m.captures and not _same_size(m["k"], k):
        return f"tokens are gathered as perm // {layout.value(m['k'])} but top-k is {k}"
    if "pairs" in m.captures and not _same_size(m["pairs"], t * k):
        return (f"the inverse permutation scatters arange({layout.value(m['pairs'])}), not one "
                f"index per routed pair (T·k = {t * k})")
    if "experts" in m.captures and m["experts"] != e:
        return f"the histogram has {m['experts']} bins for {e} experts"
    if m.anchor.target is aten._to_copy.default and fake_value(m.anchor).dtype != xv.dtype:
        return f"the result is cast to {fake_value(m.anchor).dtype}, not to x's {xv.dtype}"
    return None


def rewrite(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    gm = graph.owning_module

    def weight(name: str) -> fx.Node:
        if f"{name}_nk" in m.captures:
            return m[name]
        return transposed_view(gm, m[name], f"{m.anchor.name}_{name}")

    out = emit_moe(gm, ctx, m["x"], m["topk_ids"], m["topk_weights"], weight("w_gate_up"),
                   weight("w_down"), form_of(m), m.get("b_gate_up"), m.get("b_down"))
    return cast_like(graph, out, m.anchor)


RULES = [Rule("grouped_mm", grouped, rewrite, check, through=noop_reshape),
         Rule("batched_mm", batched, rewrite, check, through=noop_reshape)]
