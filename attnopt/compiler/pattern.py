"""The pattern language: patterns are data, written close to how the math reads.

    x = Capture("x")
    scaled = optional(Call(aten.mul.Tensor, x, Literal("scale", where=is_number)), through=x)
    softmax = Call(aten._softmax.default, scaled, Literal("dim"), False)

- `Capture(name)` matches any value (a node or a literal) and binds it; a name used twice must
  bind the same value both times.
- `Literal(name)` matches a non-node argument (a number, a dim list) and binds it.
- A plain Python value in a pattern must be equal to the argument.
- `Call(targets, *args, **kwargs)` matches a call of one of `targets` (an OpOverload, or an
  OpOverloadPacket for all its overloads). Arguments are compared by schema name, so positional
  and keyword spellings match alike. An argument the pattern does not mention must hold its
  schema default: a pattern never silently ignores a constant that changes the meaning. Say
  `ANY` where a value truly does not matter.
- `a | b` tries `a`, then `b`; `optional(p, through=x)` is `p | x`: the piece may be absent.
- `Rule.through(node)`: nodes the matcher may look through (clones, aliases, widening casts).

Matching walks backwards from an anchor node and yields every way the pattern fits, longest
first, so a rule can fall back to a shorter match when a longer one is refused. A `Rule` adds
a `check` (returns the reason it refuses, or None) and a `rewrite`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

Target = Any  # OpOverload | OpOverloadPacket | a Python callable
Predicate = Callable[[Any], bool]


class Pattern:
    def __or__(self, other: Pattern) -> Pattern:
        return AnyOf((self, other))


@dataclass(frozen=True, eq=False)
class Capture(Pattern):
    name: str
    where: Predicate | None = None


@dataclass(frozen=True, eq=False)
class Literal(Pattern):
    name: str | None = None
    where: Predicate | None = None


ANY = Literal()  # explicit "this argument does not matter here"


@dataclass(frozen=True, eq=False)
class AnyOf(Pattern):
    options: tuple[Pattern, ...]

    def __or__(self, other: Pattern) -> Pattern:
        return AnyOf((*self.options, other))


class Call(Pattern):
    def __init__(
        self,
        targets: Target | tuple[Target, ...],
        *args: Any,
        name: str | None = None,
        where: Predicate | None = None,
        commutative: bool = False,
        **kwargs: Any,
    ) -> None:
        self.targets = targets if isinstance(targets, tuple) else (targets,)
        self.args, self.kwargs = args, kwargs
        self.name, self.where, self.commutative = name, where, commutative

    def matches_target(self, target: Target) -> bool:
        for t in self.targets:
            if target is t:
                return True
            if isinstance(t, str):  # "ns::op": an op another library registers when imported
                schema = getattr(target, "_schema", None)
                if schema is not None and schema.name == t:
                    return True
                continue
            packet = getattr(target, "overloadpacket", None)
            if packet is not None and packet is t:
                return True
        return False

    def __repr__(self) -> str:
        return f"Call({', '.join(map(str, self.targets))})"


@dataclass(frozen=True, eq=False)
class Chain(Pattern):
    """`inner` under zero or more of the ops in `ops` (each read through its first argument);
    the outermost node is captured as `name`. What the chain does is the rule's to check:
    `compiler/layout.py` works out which dims a chain of views holds."""

    inner: Pattern
    ops: frozenset
    name: str


def optional(piece: Pattern, through: Pattern) -> Pattern:
    """`piece` if it is there, else just `through` (the value `piece` would have consumed)."""
    return AnyOf((piece, through))


def root_targets(p: Pattern) -> tuple[Target, ...]:
    """The targets a match of `p` can be anchored at (what a pass indexes candidates by)."""
    if isinstance(p, Call):
        return p.targets
    if isinstance(p, AnyOf):
        return tuple(t for o in p.options for t in root_targets(o))
    if isinstance(p, Chain):
        return (*p.ops, *root_targets(p.inner))
    return ()


@dataclass(frozen=True)
class Match:
    anchor: fx.Node
    captures: Mapping[str, Any]
    nodes: tuple[fx.Node, ...]  # every call node the pattern consumed, anchor included

    def __getitem__(self, name: str) -> Any:
        return self.captures[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.captures.get(name, default)


@dataclass(frozen=True)
class _State:
    captures: Mapping[str, Any] = field(default_factory=dict)
    nodes: tuple[fx.Node, ...] = ()

    def bind(self, name: str | None, value: Any) -> _State | None:
        if name is None:
            return self
        if name in self.captures:
            return self if _same(self.captures[name], value) else None
        return _State({**self.captures, name: value}, self.nodes)

    def consume(self, node: fx.Node) -> _State:
        return self if node in self.nodes else _State(self.captures, (*self.nodes, node))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return type(a) is type(b) and a == b


def bound_arguments(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in; positional names `0, 1, ...`
    for targets without a schema (Python callables such as operator.getitem)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {str(i): a for i, a in enumerate(node.args)} | dict(node.kwargs)
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _schema_defaults(node: fx.Node) -> dict[str, Any]:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    return {a.name: a.default_value for a in schema.arguments if a.has_default_value()}


def _positional_names(node: fx.Node) -> list[str]:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return [str(i) for i in range(len(node.args))]
    return [a.name for a in schema.arguments if not a.kwarg_only]


def _nothing(node: fx.Node) -> bool:
    return False


class Matcher:
    """`through(node)` says whether the matcher may look through a node to its first argument
    (a clone, an alias, a cast that loses nothing)."""

    def __init__(self, through: Callable[[fx.Node], bool] = _nothing) -> None:
        self.through = through

    def match(self, pattern: Pattern, anchor: fx.Node) -> Iterator[Match]:
        for state in self._match(pattern, anchor, _State(), anchor=True):
            yield Match(anchor, dict(state.captures), state.nodes)

    def _match(self, p: Any, v: Any, s: _State, anchor: bool = False) -> Iterator[_State]:
        if isinstance(p, Capture):
            if p.where is None or p.where(v):
                bound = s.bind(p.name, v)
                if bound is not None:
                    yield bound
        elif isinstance(p, Literal):
            if not isinstance(v, fx.Node) and (p.where is None or p.where(v)):
                bound = s.bind(p.name, v)
                if bound is not None:
                    yield bound
        elif isinstance(p, AnyOf):
            for option in p.options:
                yield from self._match(option, v, s, anchor)
        elif isinstance(p, Call):
            yield from self._match_call(p, v, s, anchor)
        elif isinstance(p, Chain):
            bound = s.bind(p.name, v)
            if bound is not None:
                yield from self._match_chain(p, v, bound)
        elif isinstance(p, list | tuple) and any(isinstance(e, Pattern) for e in p):
            # A list argument holding nodes (index's indices, cat's tensors): element by element.
            if isinstance(v, list | tuple) and len(v) == len(p):
                yield from self._match_all([(i, e) for i, e in enumerate(p)], dict(enumerate(v)), s)
        elif not isinstance(v, fx.Node) and _equal_literal(p, v):
            yield s

    def _match_chain(self, p: Chain, v: Any, s: _State) -> Iterator[_State]:
        if isinstance(v, fx.Node) and v.op == "call_function" and v.target in p.ops:
            yield from self._match_chain(p, v.args[0], s.consume(v))
        yield from self._match(p.inner, v, s)

    def _match_call(self, p: Call, v: Any, s: _State, anchor: bool) -> Iterator[_State]:
        if not isinstance(v, fx.Node) or v.op != "call_function":
            return
        if p.matches_target(v.target) and (p.where is None or p.where(v)):
            bound = s.bind(p.name, v)
            if bound is not None:
                yield from self._match_args(p, v, bound.consume(v))
        # Look through value-preserving ops (never at the anchor: its users see the result).
        if not anchor and v.args and self.through(v):
            yield from self._match_call(p, v.args[0], s.consume(v), anchor=False)

    def _match_args(self, p: Call, node: fx.Node, s: _State) -> Iterator[_State]:
        actual = bound_arguments(node)
        names = _positional_names(node)
        if len(p.args) > len(names):
            return
        orders = [list(p.args)]
        if p.commutative and len(p.args) >= 2:
            orders.append([p.args[1], p.args[0], *p.args[2:]])
        defaults = _schema_defaults(node)
        for order in orders:
            wanted = dict(zip(names, order, strict=False)) | p.kwargs
            if any(name not in actual for name in wanted):
                continue
            # Unmentioned arguments must hold their defaults (kwargs passed explicitly equal to
            # the default are fine).
            if any(name not in wanted and name in defaults and not _equal_literal(defaults[name], a)
                   for name, a in actual.items()):
                continue
            yield from self._match_all(list(wanted.items()), actual, s)

    def _match_all(self, items: list[tuple[str, Any]], actual: dict, s: _State) -> Iterator[_State]:
        if not items:
            yield s
            return
        (name, sub), rest = items[0], items[1:]
        for s2 in self._match(sub, actual[name], s):
            yield from self._match_all(rest, actual, s2)


def _equal_literal(expected: Any, actual: Any) -> bool:
    if isinstance(actual, fx.Node):
        return False
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(expected) == len(actual) and all(map(_equal_literal, expected, actual))
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual
    try:
        return expected == actual
    except (TypeError, RuntimeError):
        return False


RewriteFn = Callable[[Match, fx.Graph, Any], fx.Node]  # (match, graph, pass context)
CheckFn = Callable[[Match, Any], "str | None"]  # (match, pass context)


@dataclass
class Rule:
    """One entry of a pass's table: a pattern, the check that may refuse it, and the rewrite.
    `rewrite` adds nodes at the graph's insertion point (just before the anchor) and returns the
    node that replaces the anchor."""

    name: str
    pattern: Pattern
    rewrite: RewriteFn
    check: CheckFn | None = None
    through: Callable[[fx.Node], bool] | None = None

    def find(self, anchor: fx.Node, ctx: Any = None) -> tuple[Match | None, Refusal | None]:
        """The longest match at `anchor` that is self-contained and passes `check`; else None and
        why the longest structural match was refused (None if nothing matched at all)."""
        refusal = None
        for m in Matcher(self.through or _nothing).match(self.pattern, anchor):
            reason = _containment_problem(m) or (self.check(m, ctx) if self.check else None)
            if reason is None:
                return m, None
            refusal = refusal or Refusal(reason, m.nodes)
        return None, refusal


@dataclass(frozen=True)
class Refusal:
    reason: str
    nodes: tuple[fx.Node, ...]  # the candidate refused: one reason covers all of it


def _containment_problem(m: Match) -> str | None:
    """A match is replaced as a whole, so no inner node may feed anything outside it. This also
    makes the region convex: a path that left it and came back to a captured input would have to
    leave through an inner node with an outside user."""
    inside = set(m.nodes)
    for n in m.nodes:
        if n is m.anchor:
            continue
        outside = [u.name for u in n.users if u not in inside]
        if outside:
            return f"intermediate {n.name} is also used by {', '.join(outside)}"
    return None


def erase_unused(graph: fx.Graph, nodes: tuple[fx.Node, ...]) -> None:
    """Erase matched nodes that nothing uses any more, users before producers."""
    for n in sorted(nodes, key=_topo_index(graph), reverse=True):
        if not n.users:
            graph.erase_node(n)


def _topo_index(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_tensor_node(dtype_pred: Callable[[torch.dtype], bool] | None = None) -> Predicate:
    def pred(v: Any) -> bool:
        val = v.meta.get("val") if isinstance(v, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return False
        return dtype_pred is None or dtype_pred(val.dtype)

    return pred
