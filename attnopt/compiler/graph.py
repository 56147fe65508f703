"""Small FX helpers every pass shares: inserting nodes with their fake values, and rendering a
graph as one readable line per node (what the diff and the HTML report show)."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.utils._pytree import tree_map


def fake_value(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def insert_call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """Add `target(*args, **kwargs)` at the graph's insertion point, with `meta["val"]` computed by
    running the op's fake implementation on its inputs' fake values (Inductor needs it)."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = tree_map(fake_value, (args, kwargs))
    mode = detect_fake_mode([v for v in (*fake_args, *fake_kwargs.values())
                             if isinstance(v, torch.Tensor)])
    if mode is not None:
        # Frozen weights are real tensors beside fake activations, as in Inductor's freezing.
        allow = mode.allow_non_fake_inputs
        mode.allow_non_fake_inputs = True
        try:
            with mode:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        finally:
            mode.allow_non_fake_inputs = allow
    return node


def short_target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.namespace, t._schema.name.split("::")[-1]
        overload = "" if t._overloadname == "default" else f".{t._overloadname}"
        return f"{ns}.{name}{overload}"
    return getattr(t, "__name__", str(t))


def _fmt(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    return repr(a)


def _shape(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"  # {str(val.dtype).replace('torch.', '')}[{dims}]"
    return ""


def render_node(node: fx.Node) -> str:
    """`name = ns.op(args, k=v)  # dtype[shape]`: one stable line a person can read."""
    if node.op == "placeholder":
        return f"{node.name} = input(){_shape(node)}"
    if node.op == "get_attr":
        return f"{node.name} = constant({node.target}){_shape(node)}"
    if node.op == "output":
        return f"return {_fmt(node.args[0])}"
    args = [_fmt(a) for a in node.args] + [f"{k}={_fmt(v)}" for k, v in node.kwargs.items()]
    return f"{node.name} = {short_target(node)}({', '.join(args)}){_shape(node)}"


def render(graph: fx.Graph) -> list[str]:
    return [render_node(n) for n in graph.nodes]


def node_names(lines: Iterable[str]) -> set[str]:
    """The node names defined by rendered lines (the text before ` = `)."""
    return {line.split(" = ", 1)[0] for line in lines if " = " in line}


def count_ops(graph: fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function")


def constant_value(node: fx.Node, max_nodes: int = 64) -> torch.Tensor | None:
    """The value of `node` when it depends on no graph input (a causal mask built from arange
    and comparisons, say), computed for real. None when it reads an input, has symbolic shapes,
    calls something other than an ATen op, or takes more than `max_nodes` nodes."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        val = n.meta.get("val")
        if (n.op == "placeholder" or len(seen) > max_nodes
                or (n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload))
                or (isinstance(val, torch.Tensor)
                    and not all(isinstance(d, int) for d in val.shape))):
            return None
        stack.extend(n.all_input_nodes)
    position = {n: i for i, n in enumerate(node.graph.nodes)}
    env: dict[fx.Node, Any] = {}
    with unset_fake_temporarily():
        for n in sorted(seen, key=position.__getitem__):
            if n.op == "get_attr":
                env[n] = operator.attrgetter(n.target)(node.graph.owning_module)
            else:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
                env[n] = n.target(*args, **kwargs)
    return env[node]


def call_site(node: fx.Node) -> str | None:
    """The dotted path of the module whose forward made this call (`lm_head`,
    `model.layers.0.mlp.up_proj`), from the `nn_module_stack` Dynamo and torch.export record;
    None when it is not known. A tied weight is named after its first owner; its call site says
    which layer uses it here."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    source = list(stack.values())[-1][0]
    path = re.sub(r"^L\[[^\]]*\](\[\d+\])?", "", source)  # the root: L['self'], L['args'][0]
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.lstrip(".") or None
