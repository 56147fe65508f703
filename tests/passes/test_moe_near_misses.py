"""Near misses of the MoE forms: each one is rewritten exactly (outputs equal eager) or refused
with one line in the moe pass's `rejected` naming the node and the reason; a graph break
through an MoE block is named in the notes."""

import pytest
import torch

import attnopt
from attnopt.testing import assert_matches_eager
from tests.moe_models import VOCAB, ClassicMoE, EinsumMoE, build

pytestmark = pytest.mark.slow


def compile_and_compare(model, x, **tol):
    with torch.no_grad():
        return assert_matches_eager(model.eval(), (x,), options={"inner": "eager"}, **tol)


def x_in():
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("variant", [
    dict(order=[3, 2, 1, 0]),  # experts out of order: each step still runs its own expert
    dict(down_bias=True),  # a bias on one projection only (b_down, no b_gate_up)
    dict(softmax_first=False),  # top-k of the logits, then a softmax over the k
])
def test_exact_variants_are_rewritten(variant):
    (report,) = compile_and_compare(ClassicMoE(**variant), x_in())
    assert report.counts["moe"] == 1 and not report.pass_record("moe").rejected


@pytest.mark.parametrize(("variant", "reason"), [
    (dict(order=[0, 1, 2]),  # a loop over E - 1 experts: tokens routed to expert 3 get nothing
     "the loop covers experts 0..2 of a one-hot over 4 classes"),
    (dict(order=[0, 1, 1, 2, 3]),  # one expert twice
     "the loop covers mask rows [0, 1, 1, 2, 3], not experts 0..3 each once"),
    (dict(acts=[torch.nn.functional.silu] * 3 + [torch.nn.functional.gelu]),
     "the experts use different gatings: ['gelu', 'silu']"),
])
def test_loop_near_misses_are_refused_with_reason(variant, reason):
    (report,) = compile_and_compare(ClassicMoE(**variant), x_in())
    assert report.counts["moe"] == 0
    (line,) = report.pass_record("moe").rejected
    assert line.startswith("index_add") and reason in line


@pytest.mark.parametrize("variant", [dict(), dict(softmax_after=True)])
def test_einsum_gate_provably_zero_outside_top_k_is_rewritten(variant):
    """zeros.scatter(ids, softmax(top)), and softmax(full(-inf).scatter(ids, top)): -inf maps
    to exactly 0."""
    (report,) = compile_and_compare(EinsumMoE(**variant), x_in(), rtol=1e-5, atol=1e-5)
    assert report.counts["moe"] == 1 and not report.pass_record("moe").rejected


def test_einsum_gate_not_provably_zero_is_refused():
    """A gate scattered into 1e-3 is not zero outside the top-k: every expert contributes."""
    (report,) = compile_and_compare(EinsumMoE(fill=1e-3), x_in(), rtol=1e-5, atol=1e-5)
    assert report.counts["moe"] == 0
    (line,) = report.pass_record("moe").rejected
    assert "the scores are scattered into full_like, not zeros or -inf" in line


def clamped_swiglu(gate, up, limit, alpha, up_limit=None, plus=1.0):
    """GPT-OSS's gate, with the up clamp's limit and the added constant as parameters."""
    up_limit = limit if up_limit is None else up_limit
    gate = gate.clamp(min=None, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up.clamp(min=-up_limit, max=up_limit) + plus) * glu


@pytest.mark.parametrize(("variant", "reason"), [
    (dict(up_limit=6.0), "gate clamp max=7.0 and up clamp [-6.0, 6.0]: not one positive limit"),
    (dict(plus=2.0), "router top-k whose experts (grouped GEMM) were not rewritten"),
])
def test_gpt_oss_gating_near_misses_are_refused(monkeypatch, variant, reason):
    pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    monkeypatch.setattr(GptOssExperts, "_apply_gate", lambda self, gate_up: clamped_swiglu(
        gate_up[..., ::2], gate_up[..., 1::2], self.limit, self.alpha, **variant))
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    (report,) = compile_and_compare(build("gpt_oss", 1, "grouped_mm"), ids, rtol=1e-5,
                                    atol=1e-5)
    assert report.counts["moe"] == 0
    (line,) = report.pass_record("moe").rejected
    assert reason in line


def test_graph_break_between_router_and_experts():
    """The router's graph ends inside the block (named in its notes and rejected); the experts'
    graph holds the whole loop, with the ids and weights as inputs, and is rewritten."""
    first, second = compile_and_compare(ClassicMoE(break_at=-1), x_in())
    (note,) = first.pass_record("moe").notes
    assert note.startswith("graph ends inside an MoE block: the router's top-k topk")
    (line,) = first.pass_record("moe").rejected
    assert line.startswith("topk: router top-k whose experts are not in this graph")
    assert second.counts["moe"] == 1


def test_graph_break_between_router_and_a_partial_loop():
    """The router in one graph, a loop over 3 of 4 experts in the next: the first graph ends
    inside the block, the second starts inside it, and its loop is refused with its reason."""
    first, second = compile_and_compare(ClassicMoE(break_at=-1, order=[0, 1, 2]), x_in())
    assert first.pass_record("moe").notes[0].startswith("graph ends inside an MoE block")
    assert second.counts["moe"] == 0
    (note,) = second.pass_record("moe").notes
    assert note.startswith("graph starts inside an MoE block") and "graph input" in note
    (line,) = second.pass_record("moe").rejected
    assert "the loop covers experts 0..2 of a one-hot over 4 classes" in line


def test_a_classifier_top_k_is_not_a_router():
    """A top-k over a linear's scores that the graph only returns (top-5 labels) is no MoE
    router: nothing is said about it."""

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.head(x).topk(5, dim=-1)

    (report,) = compile_and_compare(Classifier(), x_in())
    assert not report.pass_record("moe").rejected and not report.pass_record("moe").notes


def test_gpt_oss_alpha_as_a_tensor_input_is_refused():
    """torch.compile(dynamic=True) turns GPT-OSS's alpha (a Python float) into a tensor input:
    the op takes it as a constant, so the block is refused with that reason."""
    pytest.importorskip("transformers")
    model = build("gpt_oss", 1, "grouped_mm")
    compiled = torch.compile(model, backend="attnopt", dynamic=True, options={"inner": "eager"})
    x = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    (report,) = attnopt.reports()
    (line,) = report.pass_record("moe").rejected
    assert "alpha or limit is a tensor input" in line and report.counts["moe"] == 0
