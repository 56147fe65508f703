"""Building ATen graphs for Before/Expected tests, and comparing graphs structurally."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from attnopt.compiler.graph import short_target
from attnopt.compiler.pattern import bound_arguments


def aten_graph(fn: Callable, *inputs: torch.Tensor) -> fx.GraphModule:
    """The ATen graph of `fn`, with fake values on every node, as the backend's passes see it
    (dead nodes removed, as AOTAutograd removes them)."""
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def structure(gm: fx.GraphModule) -> list[tuple]:
    """(op, target, args) per node with nodes replaced by their position: two graphs compare
    equal when they compute the same thing the same way, whatever their node names."""
    index = {n: i for i, n in enumerate(gm.graph.nodes)}

    def norm(a):
        if isinstance(a, fx.Node):
            return ("%", index[a])
        if isinstance(a, (list, tuple)):
            return type(a)(norm(x) for x in a)
        if isinstance(a, dict):
            return {k: norm(v) for k, v in a.items()}
        return a

    def arguments(n: fx.Node):
        if n.op == "call_function":  # by schema name, defaults filled: spelling does not count
            return norm(bound_arguments(n))
        return norm((n.args, dict(n.kwargs)))

    return [(n.op, short_target(n) if n.op == "call_function" else n.op, arguments(n))
            for n in gm.graph.nodes]


def ops(gm: fx.GraphModule) -> list[str]:
    return [short_target(n) for n in gm.graph.nodes if n.op == "call_function"]
