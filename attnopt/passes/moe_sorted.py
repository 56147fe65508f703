"""Sorted-and-split experts (JetMoE): the routed pairs sorted by expert, the gathered rows split
into one run per expert by data-dependent sizes, one GEMM per run, the runs concatenated:

    sizes = zeros(T, E).scatter(1, ids, 1).long().sum(0).tolist()    # tokens per expert
    perm = ids.flatten().sort(0).indices;  token = perm // k
    xs = x[token].split(sizes);  gu = cat([xs[e] @ W_gate_up[e]ᵀ for e])
    h = gated(gu).split(sizes);  y = cat([h[e] @ W_down[e]ᵀ for e])
    out = zeros(T, H).index_add(0, token, y · w.flatten()[perm, None])

Dynamo keeps it in one graph when scalar outputs are captured (`.tolist()`:
`compiler/whole_block.py`). It is `attnopt::moe` when the runs are the experts: the sizes are
exactly each expert's pair count (a scatter of 1s at the top-k ids counts a pair once; top-k
ids are distinct in a row, so that is the number of pairs routed to it), the split follows the
ascending sort, and run e is multiplied by expert e's weights, e = 0 .. E-1.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attnopt.compiler import layout
from attnopt.compiler.graph import fake_value
from attnopt.compiler.pattern import ANY, Call, Capture, Match, Matcher
from attnopt.passes.moe_emit import as_constant, emit_moe
from attnopt.passes.moe_gating import form_of, gated, gating_problem
from attnopt.passes.moe_loop import experts_name_of, frozen, ids_bound, stacked

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)

topk_ids, topk_weights = Capture("topk_ids"), Capture("topk_weights")
perm = Call(operator.getitem, Call(aten.sort.default, Call(_VIEWS, topk_ids, ANY), 0)
            | Call(aten.sort.default, Call(_VIEWS, topk_ids, ANY)), 1)
token = (Call(aten.div.Tensor_mode, perm, Capture("k"), rounding_mode="trunc", name="token")
         | Call(aten.floor_divide.default, perm, Capture("k"), name="token"))
def _whole(node: fx.Node) -> bool:
    """A slice that keeps everything (`w[:, None]` under dynamic shapes slices [0, end))."""
    a, b = fake_value(node), fake_value(node.args[0])
    return len(a.shape) == len(b.shape) and all(map(layout.same, a.shape, b.shape))


_gates = Call(aten.index.Tensor, Call(_VIEWS, topk_weights, ANY), [perm])
_routing = Call(aten.unsqueeze.default, Call(aten.slice.Tensor, _gates, ANY, ANY, ANY,
                                             where=_whole) | _gates, 1)
sorted_experts = Call(aten.index_add.default, Capture("acc"), 0, token, Call(
    aten.mul.Tensor, Call(aten.cat.default, Capture("down_runs")), _routing, commutative=True))
_h = gated(Call(aten.cat.default, Capture("gate_up_runs")))


def _runs(products: object, rows: fx.Node | None = None) -> tuple[fx.Node, list, list] | str:
    """(the tensor split into runs, the split sizes, each run's weight node) for
    cat([run_e @ W_e for e]) over split_with_sizes(rows, sizes)."""
    if not isinstance(products, list | tuple) or not products:
        return "the experts' products are not concatenated as a list"
    split, weights = None, []
    for e, p in enumerate(products):
        if not (isinstance(p, fx.Node) and p.target is aten.mm.default and frozen(p.args[1])):
            return f"run {e} is not one GEMM with frozen weights"
        run = p.args[0]
        if not (run.target is operator.getitem and run.args[1] == e
                and run.args[0].target is aten.split_with_sizes.default):
            return f"GEMM {e} does not read run {e} of one split"
        if split is not None and run.args[0] is not split:
            return "the GEMMs read runs of different splits"
        split = run.args[0]
        weights.append(p.args[1])
    if len(split.args) > 2 and split.args[2] not in (0, -len(fake_value(split.args[0]).shape)):
        return "the rows are split along another dim than the rows"
    return split.args[0], list(split.args[1]), weights


def _is_count(size: object, e: int, ids: fx.Node, experts: int) -> bool:
    """size = .item() of zeros(T, E).scatter(1, ids, 1).long().sum(0)[e]."""
    if not (isinstance(size, fx.Node) and size.target is aten._local_scalar_dense.default):
        return False
    picked = size.args[0]
    if picked.target is not aten.select.int or picked.args[1:] != (0, e):
        return False
    total = picked.args[0]
    if total.target is not aten.sum.dim_IntList or list(total.args[1]) != [0]:
        return False
    onehot = total.args[0]
    if onehot.target is aten._to_copy.default:
        onehot = onehot.args[0]
    if onehot.target is not aten.scatter.value or onehot.args[1] != 1 or onehot.args[3] != 1 \
            or onehot.args[2] is not ids:
        return False
    base = onehot.args[0]
    return base.target in (aten.zeros.default, aten.zeros_like.default) and \
        fake_value(base).shape[-1] == experts


def plan(m: Match) -> tuple[Match, list, list] | str:
    """(the gating match, gate/up weight nodes, down weight nodes) or why not."""
    down = _runs(m["down_runs"])
    if isinstance(down, str):
        return down
    h, sizes, down_w = down
    gm = next(Matcher().match(_h, h), None)
    if gm is None:
        return ("the runs of the second GEMM are not a gated MLP's intermediate (not a gated "
                "expert: mixture-of-attention experts, say)")
    up = _runs(gm["gate_up_runs"])
    if isinstance(up, str):
        return up
    xs, up_sizes, gate_up_w = up
    experts = len(down_w)
    ids, k = m["topk_ids"], fake_value(m["topk_ids"]).shape[-1]
    shapes = [fake_value(n).shape for n in (xs.args[0], ids, m["topk_weights"])]
    if [len(s) for s in shapes] != [2, 2, 2] or not all(
            layout.same(a, b) for a, b in ((shapes[0][0], shapes[1][0]),
                                            *zip(shapes[1], shapes[2], strict=True))):
        return f"x {list(shapes[0])}, ids and weights {list(shapes[1])}, " \
               f"{list(shapes[2])}: not [T, H], [T, k], [T, k]"
    if len(gate_up_w) != experts or up_sizes != sizes:
        return "the gate/up and down GEMMs split their rows differently"
    if not (xs.target is aten.index.Tensor and xs.args[1] == [m["token"]]):
        return "the rows are not x gathered by the sorted pairs' tokens"
    if not all(_is_count(s, e, ids, experts) for e, s in enumerate(sizes)):
        return ("the split sizes are not each expert's pair count (a scatter of 1s at the "
                "top-k ids, summed over tokens)")
    bound = ids_bound(ids)
    if bound is None or bound != experts:
        return f"the ids are not a top-k over {experts} experts (they could repeat or exceed)"
    if not layout.same(m["k"], k):
        return f"tokens are gathered as perm // {m['k']} but top-k is {k}"
    width = fake_value(gm["gate_up_runs"][0]).shape[-1]
    if problem := gating_problem(gm, width):
        return problem
    return gm, gate_up_w, down_w


def match(node: fx.Node) -> tuple[Match, tuple] | str | None:
    """The sorted-and-split experts ending at index_add `node`: (match, plan), a reason, or None
    if it is not that form at all."""
    m = next(Matcher().match(sorted_experts, node), None)
    if m is None:
        return None
    p = plan(m)
    if isinstance(p, str):
        return f"sorted-and-split experts not rewritten: {p}"
    acc = fake_value(m["acc"])
    if m["acc"].target not in (aten.zeros.default, aten.zeros_like.default) or \
            acc.dtype != fake_value(node).dtype:
        return f"the experts' outputs are added to {m['acc'].name}, not to zeros"
    return m, p


def rewrite(gm: fx.GraphModule, node: fx.Node, m: Match, p: tuple, ctx) -> None:
    gating, gate_up_w, down_w = p
    xs = _runs(gating["gate_up_runs"])[0]
    x = xs.args[0]
    name = experts_name_of([*gate_up_w, *down_w])
    with gm.graph.inserting_before(node):
        w_gu = as_constant(gm, stacked(gate_up_w), f"{node.name}_moe_gate_up",
                           name and f"{name}.gate_up")
        w_d = as_constant(gm, stacked(down_w), f"{node.name}_moe_down", name and f"{name}.down")
        out = emit_moe(gm, ctx, x, m["topk_ids"], m["topk_weights"], w_gu, w_d,
                       form_of(gating))
        out.meta["attnopt_rule"] = "moe.sorted_experts"
    node.replace_all_uses_with(out)
