"""What the moe pass leaves behind, explained: after the rewrites, every router top-k and every
expert-like structure still in the graph gets one line in the pass's `rejected` (the node and
why), and a graph whose edge cuts through an MoE block gets a note saying so.

- A router is a top-k (or an argmax: top-1, Switch Transformers) over at most MAX_EXPERTS
  scores computed by a linear layer of frozen weights (through softmax, sigmoid, casts), whose
  results the graph works on (not only returns them: a classifier's top-5). It was rewritten if
  its ids reach an `attnopt::moe`.
- Expert-like structures: a grouped GEMM (`aten._grouped_mm`, transformers' fallback), a GEMM
  on expert weights gathered or picked by id (`W[ids]`, `W[e]` of a stacked frozen [E, N, K]),
  a batched GEMM on a stacked frozen weight (every expert densely), an `index_add` of rows
  gathered by a data-dependent `nonzero` (an expert loop's step).
- Expert-like nodes are grouped into blocks by the routing they depend on (the router's top-k,
  or the graph input the ids arrive as): one line per block, on its last node. A block or a
  router that a rule already refused with its own reason is not repeated.
- Graph edges: a router whose ids or weights leave the graph as outputs (the experts run after
  a graph break), and expert-like nodes whose routing arrives as a graph input (the router ran
  before one), are named in the notes: "graph ends inside an MoE block", "graph starts inside
  an MoE block".
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.compiler.graph import fake_value
from attnopt.passes.linear import is_constant
from attnopt.passes.moe_loop import frozen

aten = torch.ops.aten
MAX_EXPERTS = 1024  # more scores than this is a vocabulary (sampling), not a router
_THROUGH = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
            aten._to_copy.default, aten.clone.default, aten.unsqueeze.default,
            aten.squeeze.dim, aten.expand.default, aten.permute.default, aten.t.default}
_SCORE_OPS = {aten._softmax.default, aten.softmax.int, aten.sigmoid.default,
              aten._to_copy.default, aten.view.default, aten._unsafe_view.default,
              aten.reshape.default, aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor,
              torch.ops.attnopt.softmax.default}
_GROUPED = (aten._grouped_mm.default,)
_GEMMS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default}


def audit(gm: fx.GraphModule, ctx) -> None:
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    refused = {by_name[name] for line in ctx.rejected
               if (name := line.split(":", 1)[0]) in by_name}
    # A rule's own refusal explains its whole block: everything that hangs off the same routing.
    explained = {source for n in refused
                 if (source := _routing_source(n)) is not None or expert_kind(n)}
    moe_inputs = {a for n in graph.nodes if _is_moe(n) for a in n.all_input_nodes}
    for router in [n for n in graph.nodes if is_router(n) and _routes(n)]:
        ids = _ids_of(router)
        if ids is not None and _reaches(ids, moe_inputs):
            continue
        leaves = _output_users(router)
        if leaves:
            ctx.note(f"graph ends inside an MoE block: the router's top-k {router.name} "
                     f"leaves the graph ({', '.join(leaves)}); its experts run after a graph "
                     "break, in another graph or in Python")
        if router not in explained:
            ctx.reject(router, _router_reason(_downstream(router), bool(leaves)))
            explained.add(router)
    # Expert computations that a refusal explains without sharing its routing (dense experts
    # meet their scores only downstream): the refused candidate's own nodes, above it.
    explained_nodes = {a for n in refused for a in _upstream(n) if expert_kind(a)}
    blocks: dict[fx.Node | None, list[fx.Node]] = defaultdict(list)
    kinds: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if kind := expert_kind(node):
            blocks[_routing_source(node)].append(node)
            kinds[node] = kind
    for source, nodes in blocks.items():
        last, what = nodes[-1], ", ".join(sorted({kinds[n] for n in nodes}))
        if source is not None and source.op == "placeholder":
            ctx.note(f"graph starts inside an MoE block: {last.name} ({what}) reads routing "
                     f"that arrives as graph input {source.name}; the router ran before a "
                     "graph break")
        if source in explained or all(n in refused or n in explained_nodes for n in nodes):
            continue
        if source is not None and source.op == "placeholder":
            ctx.reject(last, f"expert computation ({what}) whose routing arrives as graph "
                       f"input {source.name} (the router is in another graph): not a whole MoE "
                       "block")
        else:
            ctx.reject(last, f"expert computation ({what}) not rewritten: no MoE form attnopt "
                       "knows matched it (see README, MoE)")


def _upstream(node: fx.Node, limit: int = 200) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _is_moe(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "attnopt" \
        and node.target._schema.name.split("::")[-1] in ("moe", "moe_w4a16")


def is_router(node: fx.Node) -> bool:
    """A top-k (or an argmax, top-1) over the last dim of at most MAX_EXPERTS scores computed
    by a frozen linear."""
    if node.target is aten.topk.default:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    elif node.target is aten.argmax.default:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim is None:
            return False
    else:
        return False
    scores = node.args[0]
    val = fake_value(scores)
    if not isinstance(val, torch.Tensor) or dim % val.dim() != val.dim() - 1:
        return False
    e = val.shape[-1]
    if not isinstance(e, int) or e > MAX_EXPERTS:
        return False
    for _ in range(8):
        if scores.op != "call_function":
            return False
        if scores.target in _GEMMS or scores.target is aten.linear.default:
            return any(is_constant(a) or frozen(a) for a in scores.all_input_nodes)
        if scores.target not in _SCORE_OPS:
            return False
        scores = scores.args[0]
    return False


def _routes(router: fx.Node) -> bool:
    """Whether the top-k's results are worked on in the graph (normalised, one-hot encoded,
    scattered, used as indices) rather than only returned: a classifier returning its top-5
    labels is not a router."""
    stack, seen = list(router.users), set()
    while stack:
        n = stack.pop()
        if n in seen or n.op == "output":
            continue
        seen.add(n)
        if n.target is operator.getitem or n.target in _THROUGH:
            stack.extend(n.users)
        else:
            return True
    return False


def _ids_of(router: fx.Node) -> fx.Node | None:
    if router.target is aten.argmax.default:
        return router
    return next((u for u in router.users if u.target is operator.getitem and u.args[1] == 1),
                None)


def _reaches(node: fx.Node, targets: set[fx.Node]) -> bool:
    """Whether node, or a view/cast of it, is one of `targets`."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        stack.extend(u for u in n.users if u.target in _THROUGH)
    return False


def _downstream(node: fx.Node, limit: int = 400) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def _output_users(router: fx.Node) -> list[str]:
    """The router's own values (its scores, ids, weights and what is computed from them alone:
    tensors provably no bigger than the scores) that are outputs of the graph."""
    limit = fake_value(router.args[0]).numel()
    seen, stack, returned = set(), list(router.users), []
    while stack:
        n = stack.pop()
        if n in seen or n.op == "output":
            continue
        seen.add(n)
        val = fake_value(n)
        if isinstance(val, torch.Tensor) and not statically_known_true(val.numel() <= limit):
            continue
        if any(u.op == "output" for u in n.users):
            returned.append(n.name)
        stack.extend(n.users)
    return sorted(returned)


def _router_reason(downstream: set[fx.Node], leaves: bool) -> str:
    kinds = sorted({k for n in downstream if (k := expert_kind(n))})
    if kinds:
        return (f"router top-k whose experts ({', '.join(kinds)}) were not rewritten: no MoE "
                "form attnopt knows matched them (see README, MoE)")
    if leaves:
        return ("router top-k whose experts are not in this graph (its ids leave the graph: "
                "a graph break inside the MoE block)")
    return "router top-k whose ids feed no expert computation attnopt recognises"


def expert_kind(node: fx.Node) -> str | None:
    """What makes `node` part of an expert computation, or None."""
    if node.op != "call_function":
        return None
    target = node.target
    if target in _GROUPED or getattr(getattr(target, "_schema", None), "name", "") == \
            "transformers::grouped_mm_fallback":
        return "grouped GEMM"
    if target in _GEMMS:
        for a in node.all_input_nodes:
            if a.target is aten.index.Tensor and _stacked(a.args[0]):
                return "GEMM on expert weights gathered by id"
            if a.target is aten.select.int and _stacked(a.args[0]):
                return "GEMM on one expert's weights"
            if target in (aten.bmm.default, aten.baddbmm.default) and _stacked(a):
                return "batched GEMM on stacked expert weights"
    if target is aten.index_add.default and _from_nonzero(node.args[2]):
        return "index_add of tokens gathered by a data-dependent where"
    return None


def _stacked(node: object) -> bool:
    """A frozen weight with 3 dims (experts first), through views and transposes."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _THROUGH:
        node = node.args[0]
    if not (isinstance(node, fx.Node) and frozen(node)):
        return False
    val = fake_value(node)
    return isinstance(val, torch.Tensor) and val.dim() == 3


def _from_nonzero(node: object, depth: int = 4) -> bool:
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return False
        if node.target is aten.nonzero.default:
            return True
        node = node.args[0]
    return False


def _routing_source(node: fx.Node) -> fx.Node | None:
    """The routing an expert-like node depends on: the nearest router top-k above it, else the
    integer graph input its ids come from, else None. Routing reaches a sparse form through
    integer tensors (ids, token indices): those are searched first, so the hidden states'
    long path back to an earlier layer's router is not taken for this block's routing. A dense
    form is routed through float scores, searched next."""
    return _search_up(node, integers_only=True) or _search_up(node, integers_only=False)


def _search_up(node: fx.Node, integers_only: bool, limit: int = 400) -> fx.Node | None:
    seen, frontier, inputs = set(), [node], []
    while frontier and len(seen) < limit:
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if is_router(n):
                return n
            val = fake_value(n)
            floating = isinstance(val, torch.Tensor) and val.is_floating_point()
            if n.op == "placeholder" and isinstance(val, torch.Tensor) and not floating:
                inputs.append(n)
            if n is node or not (integers_only and floating):
                nxt.extend(n.all_input_nodes)
        frontier = nxt
    return inputs[0] if inputs else None
