"""The softmax pass: each spelling it claims, as a Before/Expected graph and end to end through
torch.compile against eager, in fp32 and 16-bit; near misses are left alone with a reason."""

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.compiler.options import Options
from attnopt.compiler.pipeline import PassContext
from attnopt.passes.softmax import softmax_pass
from attnopt.testing import assert_matches_eager
from tests.graphs import aten_graph, ops, structure

NEG_INF = float("-inf")
S = torch.randn(2, 3, 5, 16)
BIAS = torch.randn(2, 1, 1, 16)
MASK = torch.rand(2, 1, 5, 16) > 0.7


def run_pass(gm, kernels="auto"):
    ctx = PassContext(Options.parse({"kernels": kernels}), training=False, frozen=True)
    n = softmax_pass.apply(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return n, ctx.rejected


SPELLINGS = {
    "aten_softmax": lambda s, b, m: torch.softmax(s, -1),
    "scaled_mul": lambda s, b, m: torch.softmax(s * 0.125, dim=-1),
    "scaled_div": lambda s, b, m: F.softmax(s / 8.0, dim=-1),
    "bias": lambda s, b, m: torch.softmax(s * 0.5 + b, -1),
    "bias_first": lambda s, b, m: torch.softmax(b + s, -1),
    "masked_fill": lambda s, b, m: torch.softmax(s.masked_fill(m, NEG_INF), -1),
    "masked_fill_min": lambda s, b, m: torch.softmax(
        (s / 4 + b).masked_fill(m, torch.finfo(s.dtype).min), -1),
    "where_keep": lambda s, b, m: torch.softmax(torch.where(~m, s, NEG_INF), -1),
    "fp32_upcast": lambda s, b, m: F.softmax(s * 0.3 + b, dim=-1, dtype=torch.float32).to(s.dtype),
    "float_then_half": lambda s, b, m: torch.softmax(s.float() * 0.3, -1).to(s.dtype),
    "other_dim": lambda s, b, m: torch.softmax(s, dim=1),
    "safe": lambda s, b, m: torch.ops.aten._safe_softmax(s.masked_fill(m, NEG_INF), -1),
    "decomposed": lambda s, b, m: (lambda e: e / e.sum(-1, keepdim=True))(
        torch.exp(s - s.amax(-1, keepdim=True))),
}


@pytest.mark.parametrize("name", SPELLINGS)
def test_each_spelling_becomes_one_op(name):
    gm = aten_graph(SPELLINGS[name], S, BIAS, MASK)
    n, rejected = run_pass(gm)
    assert (n, rejected) == (1, [])
    remaining = [o for o in ops(gm) if "softmax" in o or o in ("aten.exp", "aten.amax")]
    assert remaining == ["attnopt.softmax"], ops(gm)
    torch.testing.assert_close(gm(S, BIAS, MASK), SPELLINGS[name](S, BIAS, MASK), equal_nan=True)


def test_before_expected_scale_bias_mask_folded():
    before = aten_graph(lambda s, b, m: torch.softmax((s * 0.5 + b).masked_fill(m, NEG_INF), -1),
                        S, BIAS, MASK)
    expected = aten_graph(lambda s, b, m: torch.ops.attnopt.softmax(
        s, -1, 0.5, b, m, NEG_INF, keep_mask=False, safe=False, dtype=torch.float32,
        impl="auto"), S, BIAS, MASK)
    assert run_pass(before)[0] == 1
    assert structure(before) == structure(expected)


def test_fp16_model_with_fp32_softmax_becomes_one_op_with_fp16_output():
    s16, b16 = S.half(), BIAS.half()
    fn = SPELLINGS["fp32_upcast"]
    gm = aten_graph(fn, s16, b16, MASK)
    assert run_pass(gm)[0] == 1
    (node,) = [n for n in gm.graph.nodes if "attnopt" in str(n.target)]
    assert node.kwargs["dtype"] == torch.float16 and node.args[0].meta["val"].dtype == torch.float16
    torch.testing.assert_close(gm(s16, b16, MASK), fn(s16, b16, MASK), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("fill", [NEG_INF, torch.finfo(torch.float16).min])
def test_fully_masked_rows_in_fp16_match_eager(fill):
    # -inf gives NaN rows, finfo.min gives uniform rows: the fused op must give the same.
    s16, full_mask = S.half(), torch.ones_like(MASK)
    fn = lambda s, b, m: torch.softmax(s.masked_fill(m, fill).float(), -1).half()
    gm = aten_graph(fn, s16, BIAS, full_mask)
    assert run_pass(gm)[0] == 1
    torch.testing.assert_close(gm(s16, BIAS, full_mask), fn(s16, BIAS, full_mask), equal_nan=True)


def test_bias_that_would_enlarge_scores_is_left_outside():
    big = torch.randn(4, 1, 1, 1, 16)  # neither side broadcasts into the other
    fn = lambda s, b, m: torch.softmax(s + b, -1)
    gm = aten_graph(fn, S, big, MASK)
    assert run_pass(gm) == (1, [])
    assert ops(gm) == ["aten.add.Tensor", "attnopt.softmax"]
    torch.testing.assert_close(gm(S, big, MASK), fn(S, big, MASK))


def test_tensor_scale_is_left_outside():
    # A 0-dim tensor scale (what dynamic=True makes of a Python float) is not a number the op
    # can take: the multiply stays, the softmax is still rewritten.
    scale = torch.tensor(0.5)
    fn = lambda s, t, m: torch.softmax(s * t, -1)
    gm = aten_graph(fn, S, scale, MASK)
    assert run_pass(gm) == (1, [])
    assert ops(gm) == ["aten.mul.Tensor", "attnopt.softmax"]
    torch.testing.assert_close(gm(S, scale, MASK), fn(S, scale, MASK))


def test_near_miss_amax_and_sum_over_different_dims_is_reported():
    fn = lambda s, b, m: (lambda e: e / e.sum(1, keepdim=True))(
        torch.exp(s - s.amax(-1, keepdim=True)))
    gm = aten_graph(fn, S, BIAS, MASK)
    n, rejected = run_pass(gm)
    assert n == 0
    assert rejected == ["div: amax over [-1] but sum over [1]: not a softmax over one dim"]


def test_shared_intermediate_blocks_the_fused_form():
    def fn(s, b, m):
        scores = s * 0.5
        return torch.softmax(scores, -1), scores.sum()

    gm = aten_graph(fn, S, BIAS, MASK)
    assert run_pass(gm) == (1, [])  # the softmax alone; the shared mul stays
    assert ops(gm).count("aten.mul.Tensor") == 1


class Scores(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, s, b, m):
        return self.fn(s, b, m)


@pytest.mark.parametrize("kernels", ["auto", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["bias", "masked_fill_min", "fp32_upcast", "safe", "where_keep"])
def test_end_to_end_matches_eager(name, dtype, kernels):
    reports = assert_matches_eager(
        Scores(SPELLINGS[name]), (S.to(dtype), BIAS.to(dtype), MASK),
        options={"inner": "eager", "kernels": kernels})
    assert [r.counts["softmax"] for r in reports] == [1]


def test_passes_option_can_disable_softmax():
    reports = assert_matches_eager(Scores(SPELLINGS["bias"]), (S, BIAS, MASK),
                                   options={"inner": "eager", "passes": []})
    assert reports[0].counts["softmax"] == 0 and reports[0].passes == []


def test_report_records_the_rewrite():
    compiled = torch.compile(Scores(SPELLINGS["masked_fill"]), backend="attnopt",
                             options={"inner": "eager"})
    compiled(S, BIAS, MASK)
    (report,) = attnopt.reports()
    record = report.pass_record("softmax")
    assert record.rewrites == 1 and record.error is None
    assert record.nodes_before - record.nodes_after == 1
    diff = report.diff("softmax")
    assert "-masked_fill = aten.masked_fill.Scalar" in diff and "+softmax" in diff
