"""Which dims of which tensor a chain of views holds: the algebra behind matching einsum and
3-D bmm attention, whose lowerings reshuffle q, k and v through unsqueeze/permute/view chains.

A tensor is described by its axes; each axis is the tuple of *source dims* merged into it,
outermost first, where a source dim is (tensor name, dim index); a size-1 axis from unsqueeze
is the empty tuple. `q.view(B*H, L, D)` of a [B, H, L, D] q is [(q0, q1), (q2,), (q3,)], and
its transpose is [(q0, q1), (q3,), (q2,)].

Views only regroup or reorder dims, so two chains describe the same elements in the same order
exactly when their axes are equal — a structural check with no arithmetic on data. Sizes may be
symbolic (dynamic shapes): they are only compared with `statically_known_true`, which never adds
a guard, so matching cannot cause a recompile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

Dim = tuple[str, int]
Axis = tuple[Dim, ...]

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# Ops whose result holds the same elements as their input in the same order.
_SAME = {aten.clone.default, aten.contiguous.default, aten.alias.default}
CHAIN_OPS = _VIEWS | _SAME | {aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                              aten.permute.default, aten.transpose.int, aten.expand.default}


@dataclass(frozen=True)
class Layout:
    axes: tuple[Axis, ...]
    sizes: dict[Dim, int]  # size of every source dim named in `axes` (an int or a SymInt)

    def size(self, axis: Axis) -> int:
        return math.prod(self.sizes[d] for d in axis)

    def shape(self) -> list[int]:
        return [self.size(a) for a in self.axes]

    def is_unit(self, d: Dim) -> bool:
        return same(self.sizes[d], 1)


def same(a: object, b: object) -> bool:
    return statically_known_true(a == b)


def differ(a: object, b: object) -> bool:
    """Sizes provably unequal (two unrelated symbols are neither `same` nor `differ`)."""
    return statically_known_true(a != b)


def broadcasts_into(small: Sequence, big: Sequence) -> bool:
    """Whether a tensor of shape `small` broadcasts to `big` without enlarging it."""
    if len(small) > len(big):
        return False
    return all(same(a, 1) or same(a, b)
               for a, b in zip(reversed(small), reversed(big), strict=False))


def source_layout(name: str, shape: torch.Size) -> Layout:
    return Layout(tuple(((name, i),) for i in range(len(shape))),
                  {(name, i): n for i, n in enumerate(shape)})


def trace(node: fx.Node, stop: dict[fx.Node, Layout]) -> Layout | None:
    """The layout of `node` as a chain of view ops over one of the `stop` nodes (whose layouts
    are given); None if the chain holds an op the algebra does not model."""
    chain = []
    while node not in stop:
        if node.op != "call_function" or node.target not in CHAIN_OPS:
            return None
        chain.append(node)
        node = node.args[0]
    layout = stop[node]
    for op in reversed(chain):
        layout = _apply(op, layout)
        if layout is None:
            return None
    return layout


def value(a: object) -> object:
    """Shape arguments may be nodes (a SymInt computed in the graph): their traced value."""
    if isinstance(a, fx.Node):
        return a.meta.get("val")
    if isinstance(a, list | tuple):
        return [value(x) for x in a]
    return a


def _apply(op: fx.Node, layout: Layout) -> Layout | None:
    axes, t = list(layout.axes), op.target
    op_args = [value(a) for a in op.args]
    rank = len(axes)
    if t in _SAME:
        return layout
    if t is aten.unsqueeze.default:
        d = op_args[1] % (rank + 1)
        return Layout((*axes[:d], (), *axes[d:]), layout.sizes)
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        dims = op_args[1] if isinstance(op_args[1], list) else [op_args[1]]
        drop = {d % rank for d in dims if same(layout.size(axes[d % rank]), 1)}
        return Layout(tuple(a for i, a in enumerate(axes) if i not in drop), layout.sizes)
    if t is aten.permute.default:
        return Layout(tuple(axes[d % rank] for d in op_args[1]), layout.sizes)
    if t is aten.transpose.int:
        a, b = op_args[1] % rank, op_args[2] % rank
        axes[a], axes[b] = axes[b], axes[a]
        return Layout(tuple(axes), layout.sizes)
    if t is aten.expand.default:  # only the no-op expand that matmul's lowering emits
        noop = all(same(n, -1) or same(n, s)
                   for n, s in zip(op_args[1], layout.shape(), strict=False))
        return layout if noop and len(op_args[1]) == rank else None
    return _reshape(layout, op_args[1])


def _reshape(layout: Layout, shape: list) -> Layout | None:
    """Regroup the source dims into axes of the target sizes; dims are never cut in two."""
    dims = [d for a in layout.axes for d in a]
    if any(same(n, -1) for n in shape):
        known = math.prod(n for n in shape if not same(n, -1))
        total = math.prod(layout.sizes[d] for d in dims)
        shape = [total // known if same(n, -1) else n for n in shape]
    axes, i = [], 0
    for n in shape:
        axis: list[Dim] = []
        while not same(math.prod(layout.sizes[d] for d in axis), n) and i < len(dims):
            axis.append(dims[i])
            i += 1
        if not same(math.prod(layout.sizes[d] for d in axis), n):
            return None
        # Size-1 source dims carry nothing: attach them where they fall without a new axis.
        while not same(n, 1) and i < len(dims) and layout.is_unit(dims[i]):
            i += 1
        axes.append(tuple(d for d in axis if not layout.is_unit(d) or same(n, 1)))
    if any(not layout.is_unit(d) for d in dims[i:]):
        return None
    return Layout(tuple(axes), layout.sizes)


def drop_units(axes: tuple[Axis, ...], layout: Layout) -> tuple[Axis, ...]:
    """Axes without size-1 source dims (and without empty unit axes): what is compared."""
    kept = (tuple(d for d in a if not layout.is_unit(d)) for a in axes)
    return tuple(a for a in kept if a)
