"""The pictures' raw material and drawing: what `describe` writes down about a region (one hop
of context, a cap on users, labels from the fake values), and that the layered layout of any
small DAG puts every box apart and every edge pointing down."""

from __future__ import annotations

import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.compiler.subgraph import (
    MAX_USERS_PICTURED,
    PictureNode,
    Subgraph,
    describe,
    nodes_between,
)
from attnopt.compiler.viz import layout, svg
from tests.graphs import aten_graph


def by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def test_describe_takes_one_hop_of_context_and_labels_from_fake_values():
    gm = aten_graph(lambda x, w: torch.relu(x @ w).sum(0), torch.randn(3, 4), torch.randn(4, 5))
    nodes = by_name(gm)
    sub = describe([nodes["mm"], nodes["relu"]], marked=[nodes["relu"]])
    pictured = {n.name: n for n in sub.nodes}
    assert [n.name for n in sub.region] == ["mm", "relu"]
    assert {n for n, p in pictured.items() if p.context} == {"x_1", "w_1", "sum_1"}
    assert pictured["mm"] == PictureNode("mm", "aten.mm", "float32", "[3, 5]",
                                         ("x_1", "w_1"), False)
    assert pictured["x_1"].op == "input" and pictured["sum_1"].inputs == ("relu",)
    assert pictured["sum_1"].shape == "[5]" and sub.marked == {"relu"}


def test_describe_caps_the_users_of_a_widely_read_node():
    def fan_out(x):
        y = x * 2
        return [y + i for i in range(MAX_USERS_PICTURED + 3)]

    gm = aten_graph(fan_out, torch.randn(2))
    sub = describe([by_name(gm)["mul"]])
    assert sum(1 for n in sub.nodes if n.context) == 1 + MAX_USERS_PICTURED  # x, then users
    assert sub.users_left_out == 3


def test_describe_a_tuple_value_and_nodes_between():
    gm = aten_graph(lambda x: torch.max(x, 1)[0], torch.randn(3, 4))
    nodes = by_name(gm)
    pictured = {n.name: n for n in describe([nodes["max_1"]]).nodes}
    assert (pictured["max_1"].dtype, pictured["max_1"].shape) == ("float32", "[3] (+1 more)")
    order = list(gm.graph.nodes)
    assert nodes_between(order[0], order[3]) == order[1:3]
    assert nodes_between(order[0], order[1]) == []


@st.composite
def dags(draw) -> Subgraph:
    n = draw(st.integers(0, 18))  # 0: a rewrite that only reuses a value
    nodes = []
    for i in range(n):
        inputs = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        nodes.append(PictureNode(
            f"n{i}", "aten." + "x" * draw(st.integers(1, 60)), "float32",
            f"[{draw(st.integers(1, 4096))}]", tuple(f"n{j}" for j in sorted(inputs)),
            context=draw(st.booleans())))
    return Subgraph(tuple(nodes))


@settings(max_examples=60, deadline=None)
@given(dags())
def test_layout_keeps_boxes_apart_and_edges_pointing_down(sub):
    boxes, routes, width, height = layout(sub)
    assert set(boxes) == {n.name for n in sub.nodes}
    for b in boxes.values():
        assert b.xy[0] >= 0 and b.xy[0] + b.w <= width + 1e-6
        assert b.xy[1] >= 0 and b.xy[1] + b.h <= height + 1e-6
    placed = sorted(boxes.values(), key=lambda b: b.xy)
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            apart = (a.xy[0] + a.w <= b.xy[0] + 1e-6 or b.xy[0] + b.w <= a.xy[0] + 1e-6
                     or a.xy[1] + a.h <= b.xy[1] + 1e-6 or b.xy[1] + b.h <= a.xy[1] + 1e-6)
            assert apart, (a, b)
    assert len(routes) == sum(len(n.inputs) for n in sub.nodes)
    for src, dst, _ in routes:
        assert boxes[src].xy[1] + boxes[src].h < boxes[dst].xy[1]
    picture = svg(sub, "old", "a picture")
    assert picture.count("<path ") == len(routes) and picture.count("<g class=") == len(sub.nodes)
