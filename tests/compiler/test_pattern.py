"""The pattern language on its own: captures, optional pieces, alternatives, look-through,
schema defaults, checks with reasons, and Before/Expected rewrites compared structurally."""

import operator

import pytest
import torch
import torch.fx as fx

from attnopt.compiler.graph import insert_call
from attnopt.compiler.options import Options
from attnopt.compiler.pattern import (
    ANY,
    Call,
    Capture,
    Literal,
    Matcher,
    Rule,
    is_number,
    optional,
)
from attnopt.compiler.pipeline import PassContext
from attnopt.compiler.rewrite import PatternPass
from tests.graphs import aten_graph, ops, structure

aten = torch.ops.aten


class Ctx(PassContext):
    def __init__(self):
        super().__init__(Options.parse({}), training=False, frozen=True)


def anchor(gm, target):
    return next(n for n in reversed(gm.graph.nodes) if n.target is target)


x = Capture("x")
relu_of_scaled = Call(aten.relu.default, optional(
    Call(aten.mul.Tensor, x, Literal("scale", where=is_number), commutative=True), through=x))


def test_capture_binds_input_and_literal():
    gm = aten_graph(lambda t: torch.relu(t * 3.0), torch.randn(4))
    m = next(Matcher().match(relu_of_scaled, anchor(gm, aten.relu.default)))
    assert m["x"].op == "placeholder" and m["scale"] == 3.0
    assert [n.target for n in m.nodes] == [aten.relu.default, aten.mul.Tensor]


def test_optional_piece_absent():
    gm = aten_graph(lambda t: torch.relu(t), torch.randn(4))
    m = next(Matcher().match(relu_of_scaled, anchor(gm, aten.relu.default)))
    assert "scale" not in m.captures and m["x"].op == "placeholder"


def test_alternatives_yield_longest_first_then_shorter():
    gm = aten_graph(lambda t: torch.relu(t * 2.0), torch.randn(4))
    matches = list(Matcher().match(relu_of_scaled, anchor(gm, aten.relu.default)))
    assert [len(m.nodes) for m in matches] == [2, 1]
    assert matches[1]["x"].target is aten.mul.Tensor


def test_tensor_scale_is_not_a_literal():
    gm = aten_graph(lambda t, s: torch.relu(t * s), torch.randn(4), torch.randn(4))
    (m,) = Matcher().match(relu_of_scaled, anchor(gm, aten.relu.default))
    assert "scale" not in m.captures  # only the shorter alternative fits


def test_repeated_capture_must_bind_the_same_node():
    same = Call(aten.add.Tensor, Capture("a"), Capture("a"))
    gm_same = aten_graph(lambda t: t + t, torch.randn(3))
    gm_diff = aten_graph(lambda t, u: t + u, torch.randn(3), torch.randn(3))
    assert list(Matcher().match(same, anchor(gm_same, aten.add.Tensor)))
    assert not list(Matcher().match(same, anchor(gm_diff, aten.add.Tensor)))


def test_unmentioned_argument_must_hold_its_default():
    # add(x, y, alpha=2) is not x + y: a pattern that does not mention alpha must not match it.
    plain_add = Call(aten.add.Tensor, Capture("a"), Capture("b"))
    gm = aten_graph(lambda t, u: torch.add(t, u, alpha=2), torch.randn(3), torch.randn(3))
    assert not list(Matcher().match(plain_add, anchor(gm, aten.add.Tensor)))
    with_alpha = Call(aten.add.Tensor, Capture("a"), Capture("b"), alpha=Literal("alpha"))
    (m,) = Matcher().match(with_alpha, anchor(gm, aten.add.Tensor))
    assert m["alpha"] == 2


def test_keyword_and_positional_spellings_match_alike():
    p = Call(aten.sum.dim_IntList, Capture("t"), [-1], True)
    gm = aten_graph(lambda t: torch.sum(t, dim=-1, keepdim=True), torch.randn(2, 3))
    assert list(Matcher().match(p, anchor(gm, aten.sum.dim_IntList)))
    gm = aten_graph(lambda t: torch.sum(t, dim=0, keepdim=True), torch.randn(2, 3))
    assert not list(Matcher().match(p, anchor(gm, aten.sum.dim_IntList)))  # dim is checked


def test_commutative_tries_both_orders():
    p = Call(aten.mul.Tensor, Capture("t"), Literal("k", where=is_number), commutative=True)
    g = fx.Graph()
    t = g.placeholder("t")
    mul = g.call_function(aten.mul.Tensor, (2.0, t))
    g.output(mul)
    (m,) = Matcher().match(p, mul)
    assert m["k"] == 2.0 and m["t"] is t


def test_look_through_clone_only_when_allowed():
    p = Call(aten.relu.default, Call(aten.neg.default, Capture("t")))
    gm = aten_graph(lambda t: torch.relu(torch.neg(t).clone()), torch.randn(3))
    relu = anchor(gm, aten.relu.default)
    assert not list(Matcher().match(p, relu))
    (m,) = Matcher(through=lambda n: n.target is aten.clone.default).match(p, relu)
    assert [n.target for n in m.nodes] == [aten.relu.default, aten.clone.default,
                                           aten.neg.default]


def test_packet_matches_every_overload_and_any_is_explicit():
    p = Call(aten.full, ANY, Literal("v"), dtype=ANY, layout=ANY, device=ANY, pin_memory=ANY)
    g = fx.Graph()
    full = g.call_function(aten.full.default, ([2], 7.0), {"dtype": torch.float32})
    g.output(full)
    (m,) = Matcher().match(p, full)
    assert m["v"] == 7.0


def test_python_callable_targets_match_positionally():
    p = Call(operator.getitem, Capture("seq"), 1)
    g = fx.Graph()
    s = g.placeholder("s")
    item = g.call_function(operator.getitem, (s, 1))
    g.output(item)
    assert list(Matcher().match(p, item))


# --- a rule applied by a PatternPass: Before / Expected --------------------------------------

def fuse_scaled_relu(m, graph, ctx):
    # Expected form: relu(x * scale) -> mul(relu(x), scale) for a positive scale (a toy rewrite
    # whose result is easy to state).
    r = insert_call(graph, aten.relu.default, (m["x"],))
    return insert_call(graph, aten.mul.Tensor, (r, m.get("scale", 1.0)))


def positive_scale(m, ctx=None):
    scale = m.get("scale", 1.0)
    return None if scale > 0 else f"scale {scale} is not positive"


toy_pass = PatternPass("toy", "softmax", [Rule("scaled_relu", relu_of_scaled, fuse_scaled_relu,
                                              positive_scale)])


def test_before_expected_structural():
    before = aten_graph(lambda t: torch.relu(t * 2.0) + 1, torch.randn(4))
    expected = aten_graph(lambda t: torch.relu(t) * 2.0 + 1, torch.randn(4))
    assert toy_pass.apply(before, Ctx()) == 1
    before.graph.lint()
    assert structure(before) == structure(expected)


def test_refused_longer_match_falls_back_to_shorter():
    gm = aten_graph(lambda t: torch.relu(t * -2.0), torch.randn(4))
    expected = aten_graph(lambda t: torch.relu(t * -2.0) * 1.0, torch.randn(4))
    assert toy_pass.apply(gm, Ctx()) == 1  # relu alone (scale 1.0), the mul stays
    assert structure(gm) == structure(expected)


def test_refusal_reason_is_reported_when_nothing_fits():
    always_scaled = Call(aten.relu.default, Call(aten.mul.Tensor, x, Literal("scale")))
    p = PatternPass("toy", "softmax", [Rule("r", always_scaled, fuse_scaled_relu, positive_scale)])
    gm = aten_graph(lambda t: torch.relu(t * -2.0), torch.randn(4))
    ctx = Ctx()
    assert p.apply(gm, ctx) == 0
    assert ctx.rejected == ["relu: scale -2.0 is not positive"]
    assert ops(gm) == ["aten.mul.Tensor", "aten.relu"]


def test_intermediate_used_outside_is_not_swallowed():
    always_scaled = Call(aten.relu.default, Call(aten.mul.Tensor, x, Literal("scale")))
    p = PatternPass("toy", "softmax", [Rule("r", always_scaled, fuse_scaled_relu)])
    g = fx.Graph()
    t = g.placeholder("t")
    mul = g.call_function(aten.mul.Tensor, (t, 2.0), name="mul")
    relu = g.call_function(aten.relu.default, (mul,), name="relu")
    g.output((relu, mul))
    gm = fx.GraphModule(torch.nn.Module(), g)
    ctx = Ctx()
    assert p.apply(gm, ctx) == 0
    assert ctx.rejected == ["relu: intermediate mul is also used by output"]


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_rewrite_preserves_values(scale):
    t = torch.randn(16)
    gm = aten_graph(lambda t: torch.relu(t * scale), t)
    toy_pass.apply(gm, Ctx())
    gm.recompile()
    torch.testing.assert_close(gm(t), torch.relu(t * scale))
