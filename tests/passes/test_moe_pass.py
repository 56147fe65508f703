"""The moe pass on transformers' MoE models, in each experts implementation that Dynamo captures
whole: every MoE block becomes one `attnopt::moe` and the outputs match eager."""

import pytest
import torch

import attnopt
from attnopt.testing import assert_matches_eager

transformers = pytest.importorskip("transformers")
LAYERS = 2
COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def build(name: str, impl: str) -> torch.nn.Module:
    t = transformers
    makers = {
        "mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(
            intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, **COMMON,
            experts_implementation=impl)),
        # Shared expert with a sigmoid gate beside the routed ones; top-k without renormalising.
        "qwen2_moe": lambda: t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(
            intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80,
            num_experts=8, num_experts_per_tok=2, **COMMON, experts_implementation=impl)),
        "olmoe": lambda: t.OlmoeForCausalLM(t.OlmoeConfig(
            intermediate_size=48, num_experts=8, num_experts_per_tok=2, eos_token_id=0,
            pad_token_id=0, **COMMON, experts_implementation=impl)),
    }
    torch.manual_seed(0)
    return makers[name]().eval()


def ids():
    return torch.randint(0, 128, (2, 7))


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
def test_every_moe_block_rewritten_and_matches_eager(name, impl):
    with torch.no_grad():
        reports = assert_matches_eager(build(name, impl), (ids(),), options={"inner": "eager"},
                                       rtol=1e-4, atol=1e-4)
    assert sum(r.counts["moe"] for r in reports) == LAYERS
    assert not [line for r in reports for line in r.passes[-1].after
                if "grouped_mm" in line or "aten.bmm(" in line]


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_bfloat16_and_inductor(impl):
    model = build("mixtral", impl).to(torch.bfloat16)
    with torch.no_grad():
        reports = assert_matches_eager(model, (ids(),), options={"inner": "inductor"},
                                       rtol=3e-2, atol=3e-2)
    assert sum(r.counts["moe"] for r in reports) == LAYERS


def test_one_token_decode_shape():
    with torch.no_grad():
        reports = assert_matches_eager(build("mixtral", "grouped_mm"), (ids()[:1, :1],),
                                       options={"inner": "eager"}, rtol=1e-4, atol=1e-4)
    assert sum(r.counts["moe"] for r in reports) == LAYERS


def test_eager_loop_is_not_one_graph_and_is_left_alone():
    """The `eager` experts loop over the experts that were hit: Dynamo breaks the graph at the
    data-dependent loop, so no graph holds a whole MoE block; nothing is rewritten, and the
    model still matches eager."""
    with torch.no_grad():
        reports = assert_matches_eager(build("mixtral", "eager"), (ids(),),
                                       options={"inner": "eager"}, rtol=1e-4, atol=1e-4)
    assert len(reports) > 1 and sum(r.counts["moe"] for r in reports) == 0


def test_training_graph_keeps_experts():
    model = build("mixtral", "batched_mm").train()
    attnopt.clear_reports()
    out = torch.compile(model, backend="attnopt", options={"inner": "eager"})(ids())
    out.logits.sum().backward()
    report = attnopt.reports()[0]
    assert report.counts["moe"] == 0
    assert report.pass_record("moe").skipped == "weights are not frozen (a training graph)"
