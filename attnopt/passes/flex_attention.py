"""flex_attention calls whose score_mod and mask_mod are functions the op has a variant for.

`torch.nn.attention.flex_attention` reaches the ATen graph as the higher-order op
`flex_attention(q, k, v, score_mod, block_mask, scale, kernel_options, score_buffers,
mask_buffers)`, score_mod and the block mask's mask_mod being small traced graphs of their own
(over 0-dim b, h, q_idx, kv_idx). Its eager meaning (`torch._higher_order_ops.flex_attention.
math_attention`, what runs outside torch.compile) is: s = q·kᵀ·scale in fp32, s' =
score_mod(s, b, h, q_idx, kv_idx), -inf where mask_mod is False, a softmax that gives 0 to
rows with no key, then @ v. The block mask's block tables only let compiled kernels skip work:
eager reads mask_mod alone, and so does this rewrite.

What is recognised, by reading the two graphs (anything else is refused, naming what):

    score_mod   score                                            nothing
                tanh(score / c) · c                              softcap c
                ... + slopes[h] · (kv_idx - q_idx)               ALiBi, slopes a [Hq] buffer
    mask_mod    any conjunction (&, and transformers' and_masks) of
                kv_idx <= q_idx (+ a constant), comparisons of kv_idx - q_idx with a
                constant, in any orientation                     causal flag and window
                padding[b, kv_idx]                               a [B, Lk] bool mask

flex's q_idx and kv_idx count from the first query and key (top-left); the op's band and
ALiBi count from the last (bottom-right). They agree when Lq == Lk, which is required (known
at compile time) whenever the band or ALiBi is used.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnopt.compiler import layout
from attnopt.compiler.graph import insert_call, short_target
from attnopt.compiler.pattern import ANY, Call, Capture, Literal, Match, Rule, is_tensor_node
from attnopt.passes.attention_call import AttentionPlan, emit_attention, qkv_problem, val

aten = torch.ops.aten
FLEX = torch.ops.higher_order.flex_attention

pattern = Call(operator.getitem, Call(
    FLEX, Capture("q", where=is_tensor_node()), Capture("k", where=is_tensor_node()),
    Capture("v", where=is_tensor_node()), Capture("score_mod"), Capture("block_mask"),
    Literal("flex_scale"), ANY, Capture("score_buffers"), Capture("mask_buffers"),
    name="flex"), 0)


# --- reading the mask_mod: a band of kv_idx - q_idx and padding ---------------------------------


@dataclass(frozen=True)
class Linear:
    """a·q_idx + b·kv_idx + c."""

    a: int = 0
    b: int = 0
    c: int = 0

    def __add__(self, other: Linear) -> Linear:
        return Linear(self.a + other.a, self.b + other.b, self.c + other.c)

    def __neg__(self) -> Linear:
        return Linear(-self.a, -self.b, -self.c)


KV = Linear(b=1)
Q = Linear(a=1)


@dataclass
class Conjunction:
    """lo <= kv_idx - q_idx <= hi (None: unbounded) and every padding[b, kv_idx]."""

    lo: int | None = None
    hi: int | None = None
    padding: list[fx.Node] = field(default_factory=list)

    def __and__(self, other: Conjunction) -> Conjunction:
        return Conjunction(_tighter(max, self.lo, other.lo), _tighter(min, self.hi, other.hi),
                           self.padding + other.padding)


def _tighter(pick, a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else pick(a, b)


_COMPARE = {aten.le.Tensor: "le", aten.lt.Tensor: "lt", aten.ge.Tensor: "ge",
            aten.gt.Tensor: "gt", aten.le.Scalar: "le", aten.lt.Scalar: "lt",
            aten.ge.Scalar: "ge", aten.gt.Scalar: "gt"}
_AND = {aten.bitwise_and.Tensor, aten.logical_and.default, aten.mul.Tensor}


class Unrecognised(Exception):
    """Why a mod's graph is not one the op has a variant for."""


def _compare(op: str, diff: Linear) -> Conjunction:
    """`diff OP 0` as bounds on r = kv_idx - q_idx, diff = k·r + c with k = ±1."""
    if diff.b not in (1, -1) or diff.a != -diff.b:
        raise Unrecognised("a comparison that is not between kv_idx - q_idx and a constant")
    k, c = diff.b, diff.c
    # k·r + c OP 0 -> r OP' bound, with OP flipped for k = -1.
    if k == -1:
        op = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}[op]
        c = -c
    bound = {"le": -c, "lt": -c - 1, "ge": -c, "gt": -c + 1}[op]
    return Conjunction(hi=bound) if op in ("le", "lt") else Conjunction(lo=bound)


def read_mask_mod(gm: fx.GraphModule, buffers: tuple) -> Conjunction:
    """The conjunction a mask_mod graph (b, h, q_idx, kv_idx, *buffers) computes, with its
    padding buffers as the outer graph's nodes; raises Unrecognised."""
    env: dict[fx.Node, object] = {}
    inputs = ["b", "h", Q, KV, *buffers]
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = inputs[len(env)]
        elif node.op == "output":
            result = env[node.args[0]]
            if not isinstance(result, Conjunction):
                raise Unrecognised("a mask_mod that returns something other than a condition")
            return result
        else:
            env[node] = _mask_value(node, env)
    raise Unrecognised("a mask_mod graph without an output")


def _mask_value(node: fx.Node, env: dict) -> object:
    args = fx.node.map_arg(node.args, env.__getitem__)
    target = node.target
    if target in (aten.add.Tensor, aten.sub.Tensor) and len(args) == 2:
        x, y = (Linear(c=a) if isinstance(a, int) and not isinstance(a, bool) else a
                for a in args)
        if isinstance(x, Linear) and isinstance(y, Linear):
            return x + (y if target is aten.add.Tensor else -y)
    if target in _COMPARE:
        x, y = (Linear(c=a) if isinstance(a, int) and not isinstance(a, bool) else a
                for a in args)
        if isinstance(x, Linear) and isinstance(y, Linear):
            return _compare(_COMPARE[target], x + -y)
    if target in _AND and all(isinstance(a, Conjunction) for a in args):
        return args[0] & args[1]
    if target in (aten.new_ones.default, aten.ones.default) and node.kwargs.get(
            "dtype") == torch.bool and list(args[-1] if target is aten.ones.default
                                            else args[1]) == []:
        return Conjunction()  # and_masks' True to start from
    if target is aten._to_copy.default and isinstance(args[0], Conjunction) and set(
            node.kwargs) <= {"device"}:
        return args[0]  # .to(device): the same condition
    if target is aten.index.Tensor and len(args[1]) == 2 and args[1][0] == "b" \
            and args[1][1] == KV and isinstance(args[0], fx.Node):
        return Conjunction(padding=[args[0]])
    raise Unrecognised(f"{short_target(node)} in the mask_mod")


# --- reading the score_mod: softcap, ALiBi ------------------------------------------------------


@dataclass(frozen=True)
class ScoreMod:
    softcap: float = 0.0
    slopes: fx.Node | None = None  # the outer graph's [Hq] buffer


def read_score_mod(gm: fx.GraphModule, buffers: tuple) -> ScoreMod:
    """The variants a score_mod graph (score, b, h, q_idx, kv_idx, *buffers) computes:
    score, then an optional softcap, then an optional ALiBi term; raises Unrecognised."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    score, _b, head, q_idx, kv_idx = placeholders[:5]
    buffer_of = dict(zip(placeholders[5:], buffers, strict=True))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    slopes = None
    if isinstance(out, fx.Node) and out.target is aten.add.Tensor:
        for rest, term in (out.args, out.args[::-1]):
            slopes = _alibi_term(term, head, q_idx, kv_idx, buffer_of)
            if slopes is not None:
                out = rest
                break
    softcap = 0.0
    if out is not score:
        softcap = _softcap_of(out, score)
    return ScoreMod(softcap, slopes)


def _alibi_term(term: object, head: fx.Node, q_idx: fx.Node, kv_idx: fx.Node,
                buffer_of: dict) -> fx.Node | None:
    """The slopes buffer when `term` is slopes[h] · (kv_idx - q_idx), in either order."""
    if not isinstance(term, fx.Node) or term.target is not aten.mul.Tensor:
        return None
    for slope, rel in (term.args, term.args[::-1]):
        if (isinstance(slope, fx.Node) and slope.target is aten.index.Tensor
                and slope.args[0] in buffer_of and list(slope.args[1]) == [head]
                and isinstance(rel, fx.Node) and rel.target is aten.sub.Tensor
                and list(rel.args) == [kv_idx, q_idx]):
            return buffer_of[slope.args[0]]
    return None


def _softcap_of(out: object, score: fx.Node) -> float:
    """c when `out` is tanh(score / c) · c."""
    if isinstance(out, fx.Node) and out.target is aten.mul.Tensor:
        tanh, c = out.args if isinstance(out.args[0], fx.Node) else out.args[::-1]
        if (isinstance(tanh, fx.Node) and tanh.target is aten.tanh.default
                and tanh.args[0].target is aten.div.Tensor and tanh.args[0].args[0] is score
                and tanh.args[0].args[1] == c and isinstance(c, float | int) and c > 0):
            return float(c)
    what = short_target(out) if isinstance(out, fx.Node) else repr(out)
    raise Unrecognised(f"a score_mod computing {what} of the score (not tanh(score / c) · c "
                       "or slopes[h] · (kv_idx - q_idx) added to it)")


# --- the rule --------------------------------------------------------------------------------


def _plan(m: Match) -> AttentionPlan | str:
    qv, kv, vv = val(m["q"]), val(m["k"]), val(m["v"])
    if reason := qkv_problem(qv, kv, vv):
        return reason
    owner = m["flex"].graph.owning_module
    block_mask = m["block_mask"]
    try:
        mods = read_score_mod(getattr(owner, m["score_mod"].target), m["score_buffers"])
        band = read_mask_mod(getattr(owner, block_mask[-1].target), m["mask_buffers"])
    except Unrecognised as why:
        return f"flex_attention with {why}"
    plan = AttentionPlan(scale=float(m["flex_scale"]), softcap=mods.softcap,
                         alibi_slopes=mods.slopes)
    if mods.slopes is not None and (reason := _slopes_problem(mods.slopes, qv.shape[1])):
        return reason
    if (band.hi is not None and band.hi < 0) or (band.lo is not None and band.lo > 0):
        return (f"flex_attention's mask keeps {band.lo} <= kv_idx - q_idx <= {band.hi}: a "
                "band that leaves out the diagonal")
    if (band.hi is not None or band.lo is not None or mods.slopes is not None) and \
            not statically_known_true(qv.shape[2] == kv.shape[2]):
        return ("flex_attention's q_idx and kv_idx count from the first query (top-left), the "
                "op's band and ALiBi from the last (bottom-right): they agree only for Lq == Lk")
    plan.is_causal = band.hi == 0
    plan.window_right = band.hi if band.hi else -1
    plan.window_left = -band.lo if band.lo is not None else -1
    if len(band.padding) > 1:
        return "flex_attention's mask_mod reads more than one padding tensor"
    if band.padding:
        pad = val(band.padding[0])
        if pad.dtype != torch.bool or pad.dim() != 2 or not layout.same(
                pad.shape[1], kv.shape[2]) or not layout.broadcasts_into(
                [pad.shape[0]], [qv.shape[0]]):
            return (f"flex_attention's padding[b, kv_idx] reads a {pad.dtype} "
                    f"{list(pad.shape)} tensor, not a bool [B, Lk]")
        plan.bool_mask = band.padding[0]
    return plan


def _slopes_problem(slopes: fx.Node, heads: object) -> str | None:
    s = val(slopes)
    if s.dim() != 1 or not layout.same(s.shape[0], heads) or not s.is_floating_point():
        return f"ALiBi slopes of {s.dtype} {list(s.shape)}, not one float per query head"
    return None


def check(m: Match, ctx=None) -> str | None:
    plan = _plan(m)
    return plan if isinstance(plan, str) else None


def rewrite(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    plan = _plan(m)
    if plan.bool_mask is not None:  # padding[b, kv_idx] -> [B, 1, 1, Lk]
        mask = insert_call(graph, aten.unsqueeze.default, (plan.bool_mask, 1))
        plan.bool_mask = insert_call(graph, aten.unsqueeze.default, (mask, 1))
    return emit_attention(graph, ctx, m["q"], m["k"], m["v"], plan)


flex_rule = Rule("flex_attention", pattern, rewrite, check)
