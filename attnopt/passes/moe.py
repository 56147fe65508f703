"""moe: the routed experts of a mixture-of-experts block become one `attnopt::moe`.

The op's inputs are what every form shares: the hidden states x [T, H], the router's top-k
expert ids and weights [T, k], and the stacked expert weights gate_up [E, 2I, H] and
down [E, H, I] (frozen constants). Its output is Σ_j w[t, j] · down_e(act(gate_e x) ⊙ up_e x).
The router itself (softmax then top-k, or top-k then softmax, renormalised or not) stays in the
graph: it is cheap, and every model spells it differently.

The expert computation, as transformers v5 writes it (`integrations/moe.py`):

    grouped_mm  sort the flat ids; gather x[perm // k] and w[perm]; offsets = cumsum(histc(ids));
                gate_up = grouped_mm(xs, gate_upᵀ, offsets); h = act(gate) ⊙ up;
                y = grouped_mm(h, downᵀ, offsets) · w; y = y[inverse(perm)];
                out = y.view(T, k, H).sum(1)
    batched_mm  xs = x repeated k times; gate_up = bmm(gate_up[ids], xs); h = act(gate) ⊙ up;
                y = bmm(down[ids], h) · w; out = y.view(T, k, H).sum(1)

grouped_mm is `transformers.grouped_mm_fallback` (its CPU custom op) or `aten._grouped_mm`.

And the classic form, an `nn.ModuleList` of expert MLPs (w1, w3, w2) and a loop over all of them:

    mask = one_hot(ids, E).permute(2, 1, 0)
    for e in range(E):
        slot, tok = where(mask[e]);  y = w2_e(act(w1_e(x[tok])) * w3_e(x[tok])) * w[tok, slot]
        out.index_add_(0, tok, y)

which Dynamo puts in one graph when `capture_dynamic_output_shape_ops` is on (`where` has a
data-dependent size); the E per-expert weights are stacked once, at compile time. The `eager`
implementation of transformers loops over the experts that were *hit*, a loop whose length is
data: Dynamo cannot put it in one graph, so it reaches us in pieces and is left alone.

Under dynamic shapes (torch.export's dynamic dims, torch.compile's dynamic=True) the sizes that
follow the token count (T in the top-k sum's view, T·k in the inverse permutation's arange) are
SymInts, held by nodes of the graph: the patterns capture them rather than match them as
literals, and `check` compares them with `layout.same`, which never adds a guard.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.compiler import layout
from attnopt.compiler.graph import fake_value, insert_call
from attnopt.compiler.options import Options
from attnopt.compiler.pattern import (
    ANY,
    Call,
    Capture,
    Literal,
    Match,
    Matcher,
    Pattern,
    Rule,
    optional,
)
from attnopt.compiler.rewrite import PatternPass
from attnopt.passes.linear import constant, constant_node, is_constant

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


x, topk_ids, topk_weights = Capture("x"), Capture("topk_ids"), Capture("topk_weights")
w_gate_up = Capture("w_gate_up", where=is_constant)
w_down = Capture("w_down", where=is_constant)
flat_ids = Call(_VIEWS, topk_ids, [-1])
flat_weights = Call(_VIEWS, topk_weights, [-1])


def gated(projection: Call) -> Call:
    """act(gate) ⊙ up for the [S, 2I] projection, split in halves (gate first)."""
    halves = Call(aten.split.Tensor, projection, Capture("intermediate"), -1)
    gate, up = Call(operator.getitem, halves, 0), Call(operator.getitem, halves, 1)
    act = (Call(aten.silu.default, gate, name="silu")
           | Call(aten.gelu.default, gate, approximate=Literal("approximate")))
    return Call(aten.mul.Tensor, act, up)


def summed_over_topk(weighted: Call) -> Call:
    """out = y.view(T, k, H).sum(1), cast back to the activations' dtype if it was promoted."""
    total = Call(aten.sum.dim_IntList, Call(_VIEWS, weighted, Capture("tkh")), [1])
    return optional(Call(aten._to_copy.default, total, dtype=ANY), through=total)


def routed(projection: Call, weights: Call) -> Call:
    return Call(aten.mul.Tensor, projection, Call(aten.unsqueeze.default, weights, -1))


# --- grouped_mm -----------------------------------------------------------------------------------

# transformers registers its CPU fallback when it is imported: named, not imported, here.
_GROUPED = (aten._grouped_mm.default, "transformers::grouped_mm_fallback")
_sorted = Call(aten.sort.default, flat_ids)
perm = Call(operator.getitem, _sorted, 1)
offsets = Call(aten.cumsum.default, Call(aten.histc.default, Call(
    aten._to_copy.default, Call(operator.getitem, _sorted, 0), dtype=ANY), Literal("experts"),
    ANY, ANY), 0, dtype=ANY)
x_sorted = Call(aten.index.Tensor, x, [Call(aten.floor_divide.default, perm, Capture("k"))])
inverse = Call(aten.index_put.default, Call(aten.empty_like.default, perm, pin_memory=ANY),
               [perm], Call(aten.arange.default, Capture("pairs"), device=ANY, pin_memory=ANY))


def grouped_mm(a: Call, weight: Capture) -> Call:
    return Call(_GROUPED, a, Call(aten.transpose.int, weight, -2, -1), offsets)


grouped = summed_over_topk(Call(aten.index.Tensor, routed(
    grouped_mm(gated(grouped_mm(x_sorted, w_gate_up)), w_down),
    Call(aten.index.Tensor, flat_weights, [perm])), [inverse]))

# --- batched_mm -----------------------------------------------------------------------------------

_expanded = Call(aten.expand.default, Call(aten.unsqueeze.default, x, 1), ANY)
x_repeated = Call(_VIEWS, Call(aten.clone.default, _expanded, memory_format=ANY) | _expanded, ANY)


def batched_mm(weight: Capture, a: Call) -> Call:
    picked = Call(aten.index.Tensor, weight, [flat_ids])
    return Call(aten.squeeze.dim, Call(aten.bmm.default, picked,
                                       Call(aten.unsqueeze.default, a, -1)), -1)


batched = summed_over_topk(routed(
    batched_mm(w_down, gated(batched_mm(w_gate_up, x_repeated))), flat_weights))


# --- check and rewrite ----------------------------------------------------------------------------


def activation(m: Match) -> str:
    if "silu" in m.captures:
        return "silu"
    return "gelu_tanh" if m["approximate"] == "tanh" else "gelu"


def _same_size(size: object, want: object) -> bool:
    """Whether a captured size (an int, or a node holding a SymInt) is `want` for every value its
    symbols may take; never adds a guard."""
    v = layout.value(size)
    return isinstance(v, int | torch.SymInt) and layout.same(v, want)


def check(m: Match, ctx=None) -> str | None:
    xv, ids, w = fake_value(m["x"]), fake_value(m["topk_ids"]), fake_value(m["topk_weights"])
    gu, down = fake_value(m["w_gate_up"]), fake_value(m["w_down"])
    if xv.dim() != 2 or ids.dim() != 2 or w.dim() != 2 or not all(
            map(layout.same, (xv.shape[0], *w.shape), (ids.shape[0], *ids.shape))):
        return (f"x {list(xv.shape)}, ids {list(ids.shape)}, weights {list(w.shape)}: not "
                "[T, H], [T, k], [T, k]")
    t, k = ids.shape
    e, two_i, h = gu.shape  # frozen weights: static sizes
    if down.shape != (e, h, two_i // 2) or not _same_size(m["intermediate"], two_i // 2) \
            or not layout.same(xv.shape[1], h):
        return (f"expert weights gate_up {list(gu.shape)} / down {list(down.shape)} do not fit "
                f"hidden {xv.shape[1]} and intermediate {layout.value(m['intermediate'])}")
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
    out = insert_call(graph, torch.ops.attnopt.moe.default, (
        m["x"], m["topk_ids"], m["topk_weights"], m["w_gate_up"], m["w_down"], activation(m)),
        {"impl": ctx.options.kernels})
    want = fake_value(m.anchor).dtype
    if want != fake_value(out).dtype:  # the summed fp32 result eager returned before its cast
        out = insert_call(graph, aten._to_copy.default, (out,), {"dtype": want})
    return out


# --- the classic loop over a ModuleList of experts --------------------------------------------

expert = Literal("expert")
_one_hot = Call(aten.permute.default, Call(aten._to_copy.default, Call(
    aten.eq.Tensor, Call(aten.unsqueeze.default, topk_ids, -1),
    Call(aten.arange.default, Literal("experts"), dtype=ANY, device=ANY, pin_memory=ANY)),
    dtype=torch.int64), [2, 1, 0])
_hits = Call(aten.unbind.int, Call(aten.nonzero.default, Call(
    aten.select.int, _one_hot, 0, expert)), 1)
slot, token = Call(operator.getitem, _hits, 0), Call(operator.getitem, _hits, 1)
x_token = Call(_VIEWS, Call(aten.index.Tensor, Call(aten.unsqueeze.default, x, 0),
                            [None, token]), ANY)


def _linear(a: Pattern, name: str) -> Call:
    return Call(aten.mm.default, a, Call(aten.t.default, Capture(name, where=is_constant)))


_act = (Call(aten.silu.default, _linear(x_token, "w1"), name="silu")
        | Call(aten.gelu.default, _linear(x_token, "w1"), approximate=Literal("approximate")))
_expert_out = _linear(Call(aten.mul.Tensor, _act, _linear(x_token, "w3")), "w2")
_weighted = Call(aten.mul.Tensor, _expert_out, Call(aten.index.Tensor, Call(
    aten.unsqueeze.default, topk_weights, 2), [token, slot]))
loop_step = Call(aten.index_add.default, Capture("acc"), 0, token,
                 Call(aten._to_copy.default, _weighted, dtype=ANY) | _weighted)


class ExpertLoop:
    """The classic form is E copies of one step chained through `acc`: a fixed-size pattern
    cannot say that, so the steps are matched one by one from the last index_add back to the
    zeros they start from, and each must be expert e = 0, 1, ... over the same x, ids, weights."""

    def apply(self, gm: fx.GraphModule, ctx) -> int:
        rewrites = 0
        for node in reversed(list(gm.graph.nodes)):
            if node.target is aten.index_add.default and not getattr(node, "_erased", False) \
                    and not any(u.target is aten.index_add.default for u in node.users):
                steps = self._steps(node)
                if isinstance(steps, str):
                    ctx.reject(node, steps)
                elif steps:
                    self._rewrite(gm, node, steps, ctx)
                    rewrites += 1
        if rewrites:
            gm.graph.eliminate_dead_code()
        return rewrites

    def _steps(self, last: fx.Node) -> list[Match] | str | None:
        steps, node = [], last
        while node.target is aten.index_add.default:
            m = next(Matcher().match(loop_step, node), None)
            if m is None:
                return None if not steps else "an index_add in the expert loop is not one step"
            steps.append(m)
            node = m["acc"]
        steps.reverse()
        if node.target is not aten.zeros_like.default or not steps:
            return None
        first = steps[0]
        same = ("x", "topk_ids", "topk_weights", "experts")
        if any(any(s[k] is not first[k] and s[k] != first[k] for k in same) for s in steps) \
                or [s["expert"] for s in steps] != list(range(first["experts"])) \
                or node.args[0] is not first["x"]:
            return (f"the index_add chain is not one loop over experts 0..{first['experts'] - 1}"
                    " of the same tokens, ids and weights")
        if len({activation(s) for s in steps}) != 1:
            return "the experts use different activations"
        return steps

    def _rewrite(self, gm: fx.GraphModule, last: fx.Node, steps: list[Match], ctx) -> None:
        first = steps[0]
        with unset_fake_temporarily():
            def stacked(*names: str) -> torch.Tensor:
                return torch.stack([torch.cat([constant(gm, s[n]) for n in names])
                                    for s in steps])

            gate_up, down = stacked("w1", "w3"), stacked("w2")
        with gm.graph.inserting_before(last):
            w_gu = constant_node(gm, f"{last.name}_moe_gate_up", gate_up)
            w_d = constant_node(gm, f"{last.name}_moe_down", down)
            if experts := _experts_name(steps):  # what `skip` globs and the report name
                w_gu.meta["attnopt_parameter"] = f"{experts}.gate_up"
                w_d.meta["attnopt_parameter"] = f"{experts}.down"
            out = insert_call(gm.graph, torch.ops.attnopt.moe.default, (
                first["x"], first["topk_ids"], first["topk_weights"], w_gu, w_d,
                activation(first)), {"impl": ctx.options.kernels})
            out.meta["attnopt_rule"] = "moe.module_list"
        last.replace_all_uses_with(out)


def _experts_name(steps: list[Match]) -> str | None:
    """The module holding the experts (`model.layers.0.mlp.experts`): the dotted prefix common to
    the parameter names of every expert weight (`...experts.0.w1.weight`, ...)."""
    names = [s[w].meta.get("attnopt_parameter") for s in steps for w in ("w1", "w3", "w2")]
    if not all(names):
        return None
    parts = [n.split(".") for n in names]
    common = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common) or None


class MoePass:
    """The transformers experts forms (a rule table) and the classic expert loop."""

    name = counts_as = "moe"
    needs_frozen_weights = True

    def __init__(self) -> None:
        self.forms = PatternPass("moe", counts_as="moe", rules=[
            Rule("grouped_mm", grouped, rewrite, check),
            Rule("batched_mm", batched, rewrite, check),
        ], needs_frozen_weights=True)
        self.loop = ExpertLoop()

    def not_applicable(self, options: Options) -> str | None:
        return None

    def apply(self, gm: fx.GraphModule, ctx) -> int:
        return self.forms.apply(gm, ctx) + self.loop.apply(gm, ctx)


moe_pass = MoePass()
