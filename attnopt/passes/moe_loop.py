"""Expert loops: a Python loop over the experts, each step gathering the tokens routed to its
expert (a data-dependent `where`), running that expert on them and adding its weighted output
back with `index_add_`:

    mask = one_hot(ids, C).permute(2, 1, 0)                       C = E, or E + 1 (a sentinel)
    for e in range(E):
        slot, tok = where(mask[e])
        y = expert_e(x[tok]) · w[tok, slot]
        out.index_add_(0, tok, y)

This is the classic `nn.ModuleList` MoE (Mixtral as transformers v4 wrote it), transformers'
`experts_implementation="eager"`, GPT-OSS's, DBRX's: Dynamo puts the loop in one graph when
data-dependent output shapes are captured (`compiler/whole_block.py`). expert_e is any gated MLP
`moe_gating` knows, its projections `mm(a, W)` (+ bias, or `addmm`) where W is anything computed
from frozen weights alone: a ModuleList expert's own matrix, `W[e]` of a stacked [E, N, K]
parameter (transposed or not), a view of one (DBRX). Its per-expert matrices are evaluated at
compile time; stacked parameters are read as views, ModuleList matrices stacked once.

A fixed-size pattern cannot say "E copies of one step chained through `out`", so the steps are
matched one by one from the last index_add back to the zeros they start from. The loop is
rewritten when its steps are experts 0 .. E-1 of one mask, each exactly once, over the same x,
ids and weights, all of one form (in any order: each step's weights are its own expert's, and
the sum over experts only changes order, as fp rounding). Anything else is refused with the
reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from attnopt.compiler import layout
from attnopt.compiler.graph import constant_value, fake_value
from attnopt.compiler.pattern import ANY, Call, Capture, Literal, Match, Matcher, Pattern
from attnopt.passes.moe_emit import as_constant, emit_moe
from attnopt.passes.moe_gating import form_of, gated, gated_pair, gating_problem

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default)


def frozen(node: object, budget: int = 16) -> bool:
    """Whether `node` is computed from frozen constants alone (a weight, W[e], W.view(...)[e]ᵀ):
    no graph input, a handful of ATen ops."""
    if not isinstance(node, fx.Node):
        return False
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" or len(seen) > budget or (
                n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload)):
            return False
        stack.extend(n.all_input_nodes)
    return True


x, topk_ids, topk_weights = Capture("x"), Capture("topk_ids"), Capture("topk_weights")
_one_hot = Call(aten.permute.default, Call(aten._to_copy.default, Call(
    aten.eq.Tensor, Call(aten.unsqueeze.default, topk_ids, -1),
    Call(aten.arange.default, Literal("classes"), dtype=ANY, device=ANY, pin_memory=ANY)),
    dtype=torch.int64), [2, 1, 0])
_hits = Call(aten.unbind.int, Call(aten.nonzero.default, Call(
    aten.select.int, _one_hot, 0, Literal("expert"))), 1)
slot, token = Call(operator.getitem, _hits, 0), Call(operator.getitem, _hits, 1)
x_token = (Call(aten.index.Tensor, x, [token])
           | Call(_VIEWS, Call(aten.index.Tensor, Call(aten.unsqueeze.default, x, 0),
                                [None, token]), ANY))


def projection(a: Pattern, weight: str) -> Pattern:
    """a @ W (+ b): W [K, N] and b [N] computed from frozen weights (captured as `weight` and
    `weight`_bias)."""
    w, b = Capture(weight, where=frozen), Capture(f"{weight}_bias", where=frozen)
    product = Call(aten.mm.default, a, w)
    return (Call(aten.addmm.default, b, a, w)
            | Call(aten.add.Tensor, product, b, commutative=True) | product)


_h = gated(projection(x_token, "w_gate_up")) | gated_pair(projection(x_token, "w_gate"),
                                                          projection(x_token, "w_up"))


def _same_shape(view: fx.Node) -> bool:
    """A view that changes nothing (DBRX's `.view(-1, H)` of the [n, H] expert output)."""
    a, b = fake_value(view), fake_value(view.args[0])
    return len(a.shape) == len(b.shape) and all(map(layout.same, a.shape, b.shape))


_y = projection(_h, "w_down")
_y = Call(_VIEWS, _y, ANY, where=_same_shape) | _y
_weighted = Call(aten.mul.Tensor, _y, Call(aten.index.Tensor, Call(
    aten.unsqueeze.default, topk_weights, 2), [token, slot]), commutative=True)
loop_step = Call(aten.index_add.default, Capture("acc"), 0, token,
                 Call(aten._to_copy.default, _weighted, dtype=ANY) | _weighted)


@dataclass
class Expert:
    """One step of the loop: the expert it runs (the mask row it reads) and its match."""

    index: int
    match: Match


def ids_bound(ids: fx.Node) -> int | None:
    """An upper bound on the ids' values the graph proves: they are top-k indices over a last
    dim of fixed size n (so in [0, n)); None if nothing says so."""
    node = ids
    while node.op == "call_function" and (node.target in _VIEWS or (
            node.target is aten._to_copy.default and fake_value(node).dtype in (
                torch.int32, torch.int64))):
        node = node.args[0]
    if node.target is operator.getitem and node.args[1] == 1 and \
            node.args[0].target is aten.topk.default:
        scores = fake_value(node.args[0].args[0])
        dim = node.args[0].args[2] if len(node.args[0].args) > 2 else -1
        size = scores.shape[dim]
        return size if isinstance(size, int) else None
    return None


def loop_steps(last: fx.Node) -> list[Expert] | str | None:
    """The steps of the loop ending at index_add `last`, first to last; a reason if it looks
    like an expert loop but is not one the op computes; None if it is no expert loop."""
    steps, node = [], last
    while node.target is aten.index_add.default:
        m = next(Matcher().match(loop_step, node), None)
        if m is None:
            return None if not steps else (
                f"the loop's step at {node.name} is not an expert step (a gated MLP of frozen "
                "weights on the gathered tokens, weighted by their routing weight)")
        steps.append(Expert(m["expert"], m))
        node = m["acc"]
    steps.reverse()
    if not steps or not _zeros_like_x(node, steps[0].match["x"]):
        return None
    first = steps[0].match
    for s in steps:
        for key in ("x", "topk_ids", "topk_weights", "classes"):
            if s.match[key] is not first[key] and s.match[key] != first[key]:
                return (f"the index_add chain mixes {key}s across its steps: not one loop over "
                        "the same tokens, ids and weights")
    experts = len(steps)
    indices = sorted(s.index for s in steps)
    if indices != list(range(experts)):
        return (f"the loop covers mask rows {indices}, not experts 0..{first['classes'] - 1} "
                "each once: tokens routed elsewhere would get nothing")
    classes, bound = first["classes"], ids_bound(first["topk_ids"])
    if classes != experts and not (classes > experts and bound is not None
                                   and bound <= experts):
        return (f"the loop covers experts 0..{experts - 1} of a one-hot over {classes} classes, "
                f"and the ids are not provably below {experts}: not one loop over experts "
                f"0..{classes - 1}")
    return steps


def _zeros_like_x(node: fx.Node, xnode: fx.Node) -> bool:
    """The accumulator starts as zeros of x's shape and dtype."""
    if node.target not in (aten.zeros_like.default, aten.zeros.default, aten.new_zeros.default):
        return False
    a, b = fake_value(node), fake_value(xnode)
    return a.dtype == b.dtype and len(a.shape) == len(b.shape) == 2 and all(
        map(layout.same, a.shape, b.shape))


def steps_problem(steps: list[Expert]) -> str | None:
    """Why the steps' experts are not one `ExpertForm` with one weight layout, else None."""
    first = steps[0].match
    forms = set()
    for s in steps:
        m = s.match
        width = fake_value(m["w_gate_up"]).shape[-1] if "w_gate_up" in m.captures else None
        if problem := gating_problem(m, width):
            return f"expert {s.index}: {problem}"
        forms.add(form_of(m))
    if len(forms) != 1:
        return f"the experts use different gatings: {sorted(f.activation for f in forms)}"
    def parts(m: Match) -> list[str]:  # the projections and biases an expert has
        return sorted(k for k in m.captures if k.startswith("w_"))

    if any(parts(s.match) != parts(first) for s in steps):
        return "the experts differ in which projections and biases they have"
    for s in steps:
        for name in (k for k in s.match.captures if k.endswith("_bias")):
            bias, weight = fake_value(s.match[name]), fake_value(s.match[name[:-5]])
            if bias.numel() != weight.shape[-1]:
                return (f"expert {s.index}: {s.match[name].name} {list(bias.shape)} is not one "
                        f"bias per output of its [{weight.shape[-1]}] projection")
    return None


def expert_weights(steps: list[Expert]) -> dict[str, torch.Tensor | None]:
    """gate_up [E, 2I, H], down [E, H, I] and the biases, in expert order, each a view of the
    model's stacked tensor where every step reads row e of the same one, else stacked."""
    ordered = sorted(steps, key=lambda s: s.index)
    matches = [s.match for s in ordered]
    with unset_fake_temporarily():
        def matrices(name: str) -> torch.Tensor:  # [E, N, K]
            return stacked([m[name] for m in matches])

        def biases(name: str) -> torch.Tensor | None:
            if f"{name}_bias" not in matches[0].captures:
                return None
            return torch.stack([constant_value(m[f"{name}_bias"]).reshape(-1) for m in matches])

        if "w_gate_up" in matches[0].captures:
            gate_up, b_gate_up = matrices("w_gate_up"), biases("w_gate_up")
        else:
            gate_up = torch.cat([matrices("w_gate"), matrices("w_up")], 1)
            parts = [biases("w_gate"), biases("w_up")]
            b_gate_up = None if parts == [None, None] else torch.cat([
                p if p is not None else gate_up.new_zeros(gate_up.shape[0], gate_up.shape[1] // 2)
                for p in parts], 1)
        return {"w_gate_up": gate_up, "w_down": matrices("w_down"), "b_gate_up": b_gate_up,
                "b_down": biases("w_down")}


def stacked_view(nodes: list[fx.Node]) -> torch.Tensor | None:
    """[E, N, K] as a view when expert e's W ([K, N] in `mm(a, W)`) is `base[e]` or `base[e]ᵀ`
    of one node `base` computed from frozen weights: no copy of the model's stacked experts."""
    bases, transposed = set(), set()
    for e, node in enumerate(nodes):
        flipped = node.target in _TRANSPOSES and _swaps_last_two(node)
        if flipped:
            node = node.args[0]
        if node.target is not aten.select.int or node.args[1] != 0 or node.args[2] != e:
            return None
        bases.add(node.args[0])
        transposed.add(flipped)
    if len(bases) != 1 or len(transposed) != 1:
        return None
    base = constant_value(bases.pop())
    if base is None or base.dim() != 3:
        return None
    base = base[:len(nodes)]
    return base if transposed.pop() else base.transpose(1, 2)


def stacked(nodes: list[fx.Node]) -> torch.Tensor:
    """[E, N, K] from each expert's W ([K, N] in `mm(a, W)`): a view where `stacked_view`
    finds one, else the matrices evaluated and stacked (a copy, made once)."""
    with unset_fake_temporarily():
        view = stacked_view(nodes)
        return view if view is not None else torch.stack([constant_value(n).T for n in nodes])


def _swaps_last_two(node: fx.Node) -> bool:
    if node.target is aten.t.default:
        return True
    if node.target is aten.transpose.int:
        return {node.args[1] % 2, node.args[2] % 2} == {0, 1}
    return list(node.args[1]) == [1, 0]


def rewrite_loop(gm: fx.GraphModule, last: fx.Node, steps: list[Expert], ctx) -> fx.Node:
    first = steps[0].match
    weights = expert_weights(steps)
    experts = experts_name([s.match for s in steps])
    with gm.graph.inserting_before(last):
        # Named as before this pass took biases: `<experts>.gate_up`, `<experts>.down`.
        suffix = {"w_gate_up": "gate_up", "w_down": "down", "b_gate_up": "gate_up_bias",
                  "b_down": "down_bias"}
        nodes = {k: None if v is None else as_constant(
            gm, v, f"{last.name}_moe_{suffix[k]}", f"{experts}.{suffix[k]}" if experts else None)
            for k, v in weights.items()}
        out = emit_moe(gm, ctx, first["x"], first["topk_ids"], first["topk_weights"],
                       nodes["w_gate_up"], nodes["w_down"], form_of(first),
                       nodes["b_gate_up"], nodes["b_down"])
        out.meta["attnopt_rule"] = "moe.expert_loop"
    last.replace_all_uses_with(out)
    return out


def _parameter(node: fx.Node) -> str | None:
    while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.meta.get("attnopt_parameter") if node.op == "get_attr" else None


def experts_name(matches: list[Match]) -> str | None:
    return experts_name_of([m[k] for m in matches for k in m.captures
                            if k.startswith("w_") and isinstance(m[k], fx.Node)])


def experts_name_of(weights: list[fx.Node]) -> str | None:
    """The module holding the experts (`model.layers.0.mlp.experts`): the dotted prefix common to
    the parameter names of every expert weight (`...experts.0.w1.weight`, or the one stacked
    `...experts.gate_up_proj`, whose module is its parent)."""
    names = {_parameter(w) for w in weights}
    if None in names or not names:
        return None
    parts = [n.split(".") for n in names]
    if len(parts) == 1:
        return ".".join(parts[0][:-1]) or None
    common = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common) or None


# Ops that only assert facts about a data-dependent size (Dynamo's runtime checks on the size of
# each `where` of the loop): kept alive by the asserts alone once the loop is gone.
_ASSERTION_ONLY = {aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
                   aten.sym_constrain_range.default, aten.sym_size.int, aten.unbind.int,
                   operator.getitem, operator.ge, operator.le, operator.gt, operator.lt,
                   operator.eq, operator.and_, torch.sym_sum, aten._local_scalar_dense.default,
                   aten.select.int}


def drop_dead_nonzeros(graph: fx.Graph) -> None:
    """Erase each `nonzero` (and `.item()` of a count) whose results only feed assertions on
    their own values (what is left of a rewritten loop's `where`s or of a split's sizes: dead
    code that dead-code elimination keeps, since asserts are side effects), with those
    assertions. They constrain nothing else."""
    for node in list(graph.nodes):
        if node.target not in (aten.nonzero.default, aten._local_scalar_dense.default) or \
                getattr(node, "_erased", False):
            continue
        users, stack = set(), list(node.users)
        while stack:
            u = stack.pop()
            if u not in users:
                users.add(u)
                stack.extend(u.users)
        if all(u.target in _ASSERTION_ONLY for u in users):
            for u in sorted(users, key=lambda n: -_position(graph, n)):
                graph.erase_node(u)
            graph.erase_node(node)
    graph.eliminate_dead_code()


def _position(graph: fx.Graph, node: fx.Node) -> int:
    return next(i for i, n in enumerate(graph.nodes) if n is node)
