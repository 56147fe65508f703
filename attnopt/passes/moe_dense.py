"""Dense-routed experts: every expert computed on every token, then combined by router scores
that are zero outside each token's top-k.

    Llama-4 (weight on the input)      out[t] = Σ_e expert_e(S[t, e] · x[t])
        routed_in = x.repeat(E, 1) * S.T.reshape(-1, 1);  a = routed_in.view(E, T, H)
        gate_up = bmm(a, W_gate_up [E, H, 2I]);  h = gated(gate_up);  y = bmm(h, W_down)
        out = y.view(E, T, H).sum(0),   S = sigmoid(full(-inf).scatter(ids, top values))
    all-experts einsum (weight on the output)   out[t] = Σ_e G[t, e] · expert_e(x[t])
        gate = einsum("th,eih->tei", x, W_gate), up likewise; h = act(gate) * up
        y = einsum("tei,ehi->teh", h, W_down);  out = einsum("teh,te->th", y, G),
        G = zeros.scatter(ids, softmax(top values))

Rewriting these as sparse routing, out[t] = Σ_j moe(x[t], ids[t, j], G[t, ids[t, j]]), is exact
only because the other experts add exactly nothing: their score is exactly 0 (and, with the
weight on the input, an expert of a zero input is exactly 0: no biases, act(0)·0 = 0). The
zeros are proven from the graph (`zero_outside_top_k`): a scatter of the top-k ids into
zeros, or into -inf followed by sigmoid, exp or softmax (which map -inf to exactly 0), through
casts. Anything else is refused with the node that breaks the proof. One difference remains,
as for a sparse kernel: eager computes every expert on every token, so a non-finite hidden
state reaches the unselected experts too (0 · inf is NaN) where the sparse form never reads
them.

Einsum and bmm lowerings reshuffle operands through view/permute chains. Which dims each
operand and result holds is worked out with `compiler/layout.py`: every dim is a source dim of
x, of the scores, or of a weight, and each bmm states which of them it batches, contracts and
keeps. Dims a bmm pairs are unified, and the rewrite is made only if the classes come out as
the MoE roles — tokens (x's leading dims, the scores' rows), H, E, I — each pairing only dims
of its own role, and the output is x's token dims then the down projection's H.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from attnopt.backends.reference import ExpertForm
from attnopt.compiler import layout
from attnopt.compiler.graph import fake_value, insert_call
from attnopt.compiler.pattern import Call, Capture, Chain, Literal, Match, Pattern, Rule
from attnopt.passes.linear import is_constant
from attnopt.passes.moe_emit import as_constant, cast_like, emit_moe
from attnopt.passes.moe_gating import form_of, gated, gated_pair, gating_problem

aten = torch.ops.aten
_CHAIN = frozenset(layout.CHAIN_OPS)
Dim = layout.Dim


def _bmm(a: Pattern, w: str, name: str) -> Call:
    """bmm(a through views, a frozen weight through views)."""
    return Call(aten.bmm.default, Chain(a, _CHAIN, f"{name}_a"),
                Chain(Capture(w, where=is_constant), _CHAIN, f"{w}_view"), name=name)


def _expert_body(a: Pattern) -> Call:
    """y = bmm(gated(bmm(a, W_gate_up)), W_down), gate/up fused or two bmms."""
    fused = gated(Chain(_bmm(a, "w_gate_up", "gate_up_bmm"), _CHAIN, "gate_up"))
    pair = gated_pair(Chain(_bmm(a, "w_gate", "gate_bmm"), _CHAIN, "gate"),
                      Chain(_bmm(a, "w_up", "up_bmm"), _CHAIN, "up"))
    h = Chain(fused | pair, _CHAIN, "h_view")
    return Call(aten.bmm.default, h, Chain(Capture("w_down", where=is_constant), _CHAIN,
                                           "w_down_view"), name="down_bmm")


_routed_in = Call(aten.mul.Tensor, Call(aten.repeat.default, Capture("x"), Literal("repeats")),
                  Chain(Capture("scores"), _CHAIN, "scores_view"), commutative=True,
                  name="routed_in")
weight_on_input = Call(aten.sum.dim_IntList, Chain(_expert_body(_routed_in), _CHAIN, "y"),
                       Literal("sum_dims"))
weight_on_output = Chain(Call(aten.bmm.default, Chain(_expert_body(Capture("x")), _CHAIN, "y"),
                              Chain(Capture("scores"), _CHAIN, "scores_view"),
                              name="combine"), _CHAIN, "out")


# --- the layout analysis ----------------------------------------------------------------------


@dataclass
class Dims:
    """Union-find over source dims, with the size of each."""

    sizes: dict[Dim, object] = field(default_factory=dict)
    parent: dict[Dim, Dim] = field(default_factory=dict)

    def add(self, lay: layout.Layout) -> None:
        self.sizes.update(lay.sizes)

    def find(self, d: Dim) -> Dim:
        while self.parent.get(d, d) != d:
            d = self.parent[d]
        return d

    def unify(self, a: tuple[Dim, ...], b: tuple[Dim, ...]) -> bool:
        """Pair two axes dim by dim (size-1 dims left out): False if they do not fit."""
        a = tuple(d for d in a if not layout.same(self.sizes[d], 1))
        b = tuple(d for d in b if not layout.same(self.sizes[d], 1))
        if len(a) != len(b) or not all(layout.same(self.sizes[x], self.sizes[y])
                                       for x, y in zip(a, b, strict=True)):
            return False
        for x, y in zip(a, b, strict=True):
            self.parent[self.find(x)] = self.find(y)
        return True

    def axes(self, lay: layout.Layout) -> tuple[tuple[Dim, ...], ...]:
        """The layout's axes as class representatives, size-1 dims and axes dropped."""
        kept = (tuple(self.find(d) for d in a if not layout.same(self.sizes[d], 1))
                for a in lay.axes)
        return tuple(a for a in kept if a)


def _source(tag: str, node: fx.Node) -> layout.Layout:
    return layout.source_layout(tag, fake_value(node).shape)


def _trace(chain_end: fx.Node, source: fx.Node, lay: layout.Layout) -> layout.Layout | None:
    return layout.trace(chain_end, {source: lay})


def _contract(dims: Dims, a: layout.Layout | None, b: layout.Layout | None
              ) -> layout.Layout | None:
    """bmm(a [batch, m, k], b [batch, k, n]): the result [batch, m, n] with a's batch and k
    dims unified with b's; None if they do not fit."""
    if a is None or b is None or len(a.axes) != 3 or len(b.axes) != 3:
        return None
    dims.add(a)
    dims.add(b)
    if not (dims.unify(a.axes[0], b.axes[0]) and dims.unify(a.axes[2], b.axes[1])):
        return None
    return layout.Layout((a.axes[0], a.axes[1], b.axes[2]), {**a.sizes, **b.sizes})


@dataclass
class Plan:
    """What the analysis found: the weights as [E, N, K] (views of the model's tensors, or
    gate and up concatenated), the expert form and the top-k ids the scores were scattered
    from."""

    weights: dict[str, torch.Tensor]
    form: ExpertForm
    ids: fx.Node


@dataclass
class Analysis:
    """The layouts of a dense candidate's values over source dims: x ("x"), the scores ("s"),
    each weight (by its capture name), the intermediate ("h", 0)."""

    dims: Dims
    x: layout.Layout
    scores: layout.Layout
    weights: dict[str, layout.Layout]
    gate: layout.Layout  # the gate (or fused gate/up) projection, as the gating reads it
    y: layout.Layout  # the experts' outputs, as they reach the combination
    expert_dim: Dim  # the dim the outputs are summed or contracted over
    out: tuple  # the output's axes
    inter: Dim = ("h", 0)

    def dims_of(self, lay: layout.Layout) -> set[Dim]:
        return {d for a in self.dims.axes(lay) for d in a}


def dense_plan(m: Match) -> Plan | str:
    dims = Dims()
    x, scores = m["x"], m["scores"]
    x_lay, s_lay = _source("x", x), _source("s", scores)
    dims.add(x_lay)
    dims.add(s_lay)
    on_input = "routed_in" in m.captures
    if on_input:
        a_lay = _routed_in_layout(m, dims, x_lay, s_lay)
        if isinstance(a_lay, str):
            return a_lay
        a_source = m["routed_in"]
    else:
        a_lay, a_source = x_lay, x
    fused = "w_gate_up" in m.captures
    names = ("w_gate_up",) if fused else ("w_gate", "w_up")
    w_lay = {n: _source(n, m[n]) for n in (*names, "w_down")}
    projected = {}
    for n in names:
        bmm = m["gate_up_bmm" if fused else f"{n[2:]}_bmm"]
        r = _contract(dims, _trace(bmm.args[0], a_source, a_lay),
                      _trace(m[f"{n}_view"], m[n], w_lay[n]))
        projected[n] = r and _trace(m["gate_up" if fused else n[2:]], bmm, r)
        if projected[n] is None:
            return f"{bmm.name}: the expert projection's operands are not [batch, rows, cols]"
        split = [d for d in projected[n].axes[-1] if not layout.same(dims.sizes[d], 1)]
        if len(split) != 1 or split[0][0] != n:
            return (f"{bmm.name}: the gating reads a last dim that is not the projection's own "
                    "output dim")
    if not fused:
        for a, b in zip(projected["w_gate"].axes, projected["w_up"].axes, strict=True):
            if not dims.unify(a, b):
                return "gate and up do not have the same layout"
    gate_lay = projected[names[0]]
    width = gate_lay.size(gate_lay.axes[-1])
    if problem := gating_problem(m, width if fused else None):
        return problem
    inter = ("h", 0)
    h_lay = layout.Layout((*gate_lay.axes[:-1], (inter,)),
                          {**gate_lay.sizes, inter: width // 2 if fused else width})
    y_lay = _contract(dims, _trace(m["h_view"], _chain_source(m["h_view"]), h_lay),
                      _trace(m["w_down_view"], m["w_down"], w_lay["w_down"]))
    y_lay = y_lay and _trace(m["y"], m["down_bmm"], y_lay)
    if y_lay is None:
        return "down_bmm: the down projection's operands are not [batch, rows, cols]"
    out = _combine(m, dims, y_lay, s_lay, on_input)
    if isinstance(out, str):
        return out
    analysis = Analysis(dims, x_lay, s_lay, w_lay, gate_lay, y_lay, *out)
    return _roles(m, analysis, names, on_input)


def _chain_source(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _CHAIN:
        node = node.args[0]
    return node


def _routed_in_layout(m: Match, dims: Dims, x_lay: layout.Layout, s_lay: layout.Layout
                      ) -> layout.Layout | str:
    """x.repeat(E, 1) * S.T.reshape(-1, 1): row e·T + t is x[t] · S[t, e]."""
    repeats, xv = m["repeats"], fake_value(m["x"])
    if xv.dim() != 2 or len(repeats) != 2 or repeats[1] != 1:
        return f"routed input repeats x {list(xv.shape)} by {repeats}: not x.repeat(E, 1)"
    rep = ("rep", 0)
    lay = layout.Layout(((rep, *x_lay.axes[0]), x_lay.axes[1]), {**x_lay.sizes,
                                                                 rep: repeats[0]})
    dims.add(lay)
    s = _trace(m["scores_view"], m["scores"], s_lay)
    if s is None or len(s.axes) != 2 or not dims.unify(lay.axes[0], s.axes[0]) \
            or not all(layout.same(s.sizes[d], 1) for d in s.axes[1]):
        return "the routed input is not x[t] · scores[t, e] for row e·T + t"
    return lay


def _combine(m: Match, dims: Dims, y_lay: layout.Layout, s_lay: layout.Layout,
             on_input: bool) -> tuple[Dim, tuple] | str:
    """(the dim summed over the experts, the output's axes)."""
    if on_input:
        summed = m["sum_dims"]
        axes = y_lay.axes
        if len(summed) != 1:
            return f"the experts' outputs are summed over dims {summed}, not one"
        d = summed[0] % len(axes)
        if len(axes[d]) != 1:
            return "the experts' outputs are summed over a merged dim"
        return axes[d][0], tuple(a for i, a in enumerate(axes) if i != d)
    g = _trace(m["scores_view"], m["scores"], s_lay)
    r = _contract(dims, y_lay if len(y_lay.axes) == 3 else None, g) if g is not None else None
    if r is None:
        return "the experts' outputs and the scores do not meet in one [batch, rows, cols] bmm"
    contracted = tuple(d for d in g.axes[1] if not layout.same(g.sizes[d], 1))
    if len(contracted) != 1:
        return "the experts' outputs are combined over more than the expert dim"
    out = _trace(m["out"], m["combine"], r)
    if out is None:
        return "the combined output goes through a reshape the matcher cannot follow"
    return contracted[0], out.axes


def _roles(m: Match, an: Analysis, names: tuple[str, ...], on_input: bool) -> Plan | str:
    """Whether the unified dims come out as the MoE roles: tokens (x's leading dims, the
    scores' rows), E (the scores' last dim), H (x's last), I (the intermediate); each weight is
    one E, one input (K) and one output (N) dim; the gate projection holds exactly tokens, E
    and its output; the experts' outputs exactly tokens, E and the down projection's output;
    the result is x's tokens then H."""
    dims, find = an.dims, an.dims.find
    e_class = find(("s", len(an.scores.axes) - 1))
    hidden = find(an.x.axes[-1][0])
    tokens = tuple(find(a[0]) for a in an.x.axes[:-1] if not layout.same(an.x.sizes[a[0]], 1))
    score_rows = tuple(find(a[0]) for a in an.scores.axes[:-1]
                       if not layout.same(an.scores.sizes[a[0]], 1))
    if tokens != score_rows:
        return "the scores' rows are not x's tokens"
    if find(an.expert_dim) != e_class:
        return "the experts are not summed over the scores' expert dim"
    orders = {}
    for n in (*names, "w_down"):
        k_class = find(an.inter) if n == "w_down" else hidden
        role = {i: "E" if find(d) == e_class else "K" if find(d) == k_class else "N"
                for i, d in enumerate(a[0] for a in an.weights[n].axes)}
        if sorted(role.values()) != ["E", "K", "N"]:
            return f"{m[n].name}: its dims are not one expert, one input and one output dim"
        orders[n] = [next(i for i, r in role.items() if r == want) for want in ("E", "N", "K")]
    h_out = find(("w_down", orders["w_down"][1]))
    gate_out = find((names[0], orders[names[0]][1]))
    if an.dims_of(an.gate) != {*tokens, e_class, gate_out}:
        return "the gate/up projection is not one [tokens, experts, out] product"
    if an.dims_of(an.y) != {*tokens, e_class, h_out}:
        return "the experts' outputs are not one [tokens, experts, hidden] product"
    got = tuple(d for a in dims.axes(layout.Layout(an.out, dims.sizes)) for d in a)
    if got != (*tokens, h_out):
        return "the output is not laid out as x's tokens then the hidden dim"
    if len({e_class, hidden, find(an.inter), h_out, gate_out, *tokens}) != 5 + len(tokens):
        return "the layout pairs dims of different roles (experts, tokens, hidden, inter)"
    ids = _top_k_ids(m["scores"])
    if isinstance(ids, str):
        return ids
    with unset_fake_temporarily():
        stacked = {n: getattr(m[n].graph.owning_module, m[n].target).permute(order)
                   for n, order in orders.items()}
        if "w_gate_up" not in stacked:
            stacked["w_gate_up"] = torch.cat([stacked.pop("w_gate"), stacked.pop("w_up")], 1)
    return Plan(stacked, form_of(m)._replace(weight_on_input=on_input), ids)


# --- the zeros outside the top-k ----------------------------------------------------------------


def _fill(node: fx.Node) -> float | None:
    """The one value every element of `node` holds, when the graph says so."""
    t = node.target
    if t in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
        return 0.0
    if t in (aten.full.default, aten.full_like.default, aten.new_full.default):
        return float(node.args[1])
    return None


def zero_outside_top_k(scores: fx.Node) -> tuple[fx.Node, str] | str:
    """(the scatter's ids node, "zero") if scores[t, e] is provably exactly 0 for every e not
    among the top-k ids of row t; else why not."""
    value = _outside(scores)
    if isinstance(value, str):
        return value
    node, kind = value
    if kind != 0.0:
        return f"{scores.name}: the scores are {kind} outside the top-k, not 0"
    return node, "zero"


def _outside(node: fx.Node) -> tuple[fx.Node, float] | str:
    t = node.target
    if t is aten._to_copy.default and fake_value(node).is_floating_point():
        return _outside(node.args[0])
    if t in (aten.sigmoid.default, aten.exp.default) or _plain_softmax(node):
        inner = _outside(node.args[0])
        if isinstance(inner, str):
            return inner
        if inner[1] != float("-inf"):
            return f"{node.name}: {t.__name__} of scores that are {inner[1]} outside the top-k"
        return inner[0], 0.0
    if t in (aten.scatter.src, aten.scatter.value):
        base, dim, ids = node.args[:3]
        rank = fake_value(node).dim()
        fill = _fill(base) if isinstance(base, fx.Node) else None
        if dim % rank != rank - 1:
            return f"{node.name}: the top-k values are scattered along dim {dim}, not the last"
        if fill not in (0.0, float("-inf")):
            return f"{node.name}: the scores are scattered into {base.name}, not zeros or -inf"
        return ids, fill
    return (f"{node.name} ({getattr(t, '__name__', t)}): not provably zero outside the top-k "
            "ids")


def _plain_softmax(node: fx.Node) -> bool:
    """A softmax over the last dim that maps -inf to exactly 0: ATen's, or attnopt's with a
    positive scale and no bias or mask (the softmax pass runs first)."""
    t, rank = node.target, fake_value(node).dim()
    if t in (aten._softmax.default, aten.softmax.int):
        return node.args[1] % rank == rank - 1
    if t is torch.ops.attnopt.softmax.default:
        dim, scale, bias, mask = node.args[1:5]
        return dim % rank == rank - 1 and scale > 0 and bias is None and mask is None
    return False


def _top_k_ids(scores: fx.Node) -> fx.Node | str:
    proof = zero_outside_top_k(scores)
    if isinstance(proof, str):
        return proof
    ids, _ = proof
    src = ids
    while src.op == "call_function" and src.target in (aten.view.default, aten.reshape.default):
        src = src.args[0]
    if not (src.target is operator.getitem and src.args[1] == 1
            and src.args[0].target is aten.topk.default):
        return (f"{ids.name}: the scattered ids are not a top-k's indices (they could repeat an "
                "expert in a row)")
    return ids


# --- check and rewrite --------------------------------------------------------------------------


def check(m: Match, ctx=None) -> str | None:
    plan = dense_plan(m)
    return plan if isinstance(plan, str) else None


def rewrite(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    plan = dense_plan(m)
    assert isinstance(plan, Plan)
    gm = graph.owning_module
    x, scores, ids = m["x"], m["scores"], plan.ids
    hidden = fake_value(x).shape[-1]
    k = fake_value(ids).shape[-1]
    x2 = insert_call(graph, aten.reshape.default, (x, [-1, hidden]))
    ids2 = insert_call(graph, aten.reshape.default, (ids, [-1, k]))
    picked = insert_call(graph, aten.gather.default, (scores, -1, ids))
    w2 = insert_call(graph, aten.reshape.default, (picked, [-1, k]))
    # Named after the model's parameters (what `skip` globs and the report name them by).
    source = {"w_gate_up": m.get("w_gate_up", m.get("w_gate")), "w_down": m["w_down"]}
    consts = {n: as_constant(gm, t, f"{m.anchor.name}_moe_{n[2:]}",
                             source[n].meta.get("attnopt_parameter"))
              for n, t in plan.weights.items()}
    out = emit_moe(gm, ctx, x2, ids2, w2, consts["w_gate_up"], consts["w_down"], plan.form)
    out = cast_like(graph, out, m.anchor)
    # The output is laid out as x (its tokens, then H; checked): x's sizes, symbolic or not.
    shape = [_size(graph, x, d) for d in range(fake_value(x).dim())]
    return insert_call(graph, aten.reshape.default, (out, shape))


def _size(graph: fx.Graph, node: fx.Node, d: int) -> object:
    size = fake_value(node).shape[d]
    if isinstance(size, int):
        return size
    return insert_call(graph, aten.sym_size.int, (node, d))


RULES = [Rule("dense_weight_on_input", weight_on_input, rewrite, check),
         Rule("dense_weight_on_output", weight_on_output, rewrite, check)]
