"""Small, plain-data descriptions of the parts of a graph a pass touched, for the report's
pictures.

A pass works on a live FX graph that keeps changing; the report outlives it. So at the moment of
a rewrite (or a refusal) the touched nodes are written down as strings (name, op, dtype, shape,
which pictured nodes each reads) together with one hop of context: the nodes they read and the
nodes that read them. Nothing here holds an `fx.Node`, so a report keeps no graph alive, and the
cost is proportional to the region, never to the graph.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from attnopt.compiler.graph import short_target

# A node read by many (the attention mask, a shared activation) would bury the region in its
# users: at most this many users outside the region are pictured per node.
MAX_USERS_PICTURED = 4


@dataclass(frozen=True)
class PictureNode:
    name: str
    op: str  # "aten.mm", "attnopt.attention", "input", "constant", "output"
    dtype: str  # "float32"; "" when the node holds no tensor
    shape: str  # "[2, 8, 64]", or the value of a scalar node; "" when unknown
    inputs: tuple[str, ...]  # the pictured nodes it reads, one entry per edge
    context: bool  # one hop outside the region (an input it reads, a user of its result)


@dataclass(frozen=True)
class Subgraph:
    nodes: tuple[PictureNode, ...]
    marked: frozenset[str] = frozenset()  # drawn as the culprit: a refused candidate's anchor
    users_left_out: int = 0  # users beyond MAX_USERS_PICTURED, counted, not drawn

    @property
    def region(self) -> list[PictureNode]:
        return [n for n in self.nodes if not n.context]


@dataclass(frozen=True)
class Rewrite:
    rule: str  # "softmax.softmax", as in the new node's meta["attnopt_rule"]
    replaced: Subgraph  # the matched nodes before the rewrite, with their inputs and users
    added: Subgraph  # the nodes the rewrite inserted, with their inputs and users


def describe(region: Iterable[fx.Node], marked: Iterable[fx.Node] = ()) -> Subgraph:
    """`region` with one hop of context, as it stands in the graph now."""
    inside = dict.fromkeys(region)
    context: dict[fx.Node, None] = {}
    users_left_out = 0
    for node in inside:
        context.update((a, None) for a in node.all_input_nodes if a not in inside)
        outside = [u for u in node.users if u not in inside]
        context.update((u, None) for u in outside[:MAX_USERS_PICTURED])
        users_left_out += max(0, len(outside) - MAX_USERS_PICTURED)
    pictured = inside | context
    nodes = tuple(_picture_node(n, pictured, n in context) for n in pictured)
    return Subgraph(nodes, frozenset(n.name for n in marked), users_left_out)


def nodes_between(first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """The nodes strictly between two nodes of one graph (what a rewrite inserted before its
    anchor, given the node that preceded the anchor before the rewrite)."""
    out, node = [], first.next
    while node is not last:
        out.append(node)
        node = node.next
    return out


def _picture_node(node: fx.Node, pictured: dict[fx.Node, None], context: bool) -> PictureNode:
    dtype, shape = _value(node.meta.get("val"))
    # all_input_nodes lists each input once: an op reading x twice (mul(x, x)) is one edge.
    inputs = tuple(a.name for a in node.all_input_nodes if a in pictured)
    return PictureNode(node.name, _op(node), dtype, shape, inputs, context)


def _op(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "constant"
    if node.op == "call_function":
        return short_target(node)
    return node.op if node.op == "output" else f"{node.op} {node.target}"


def _value(val: Any) -> tuple[str, str]:
    """(dtype, shape) of a node's fake value; a tuple of tensors shows its first element."""
    if isinstance(val, (tuple, list)) and val:
        dtype, shape = _value(val[0])
        more = f" (+{len(val) - 1} more)" if len(val) > 1 else ""
        return dtype, shape + more
    if isinstance(val, torch.Tensor):
        return str(val.dtype).replace("torch.", ""), f"[{', '.join(str(d) for d in val.shape)}]"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        return type(val).__name__, str(val)
    return "", ""
