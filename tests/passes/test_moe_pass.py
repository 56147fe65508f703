"""The moe pass on transformers' MoE models in their grouped_mm and batched_mm experts
implementations, and on the classic ModuleList loop: every MoE block becomes one `attnopt::moe`
and the outputs match eager, with static token counts and with dynamic ones (torch.compile's
dynamic=True, torch.export's dynamic dims). The other architectures and forms are in
test_moe_models.py, the near misses in test_moe_near_misses.py."""

import pytest
import torch

import attnopt
from attnopt import rewrite_model
from attnopt.testing import assert_matches_eager
from tests.moe_models import ClassicMoE

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


def assert_experts_gone(graph_lines: list[str]) -> None:
    assert not [line for line in graph_lines if "grouped_mm" in line or "aten.bmm(" in line]


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe"])
def test_every_moe_block_rewritten_and_matches_eager(name, impl):
    with torch.no_grad():
        reports = assert_matches_eager(build(name, impl), (ids(),), options={"inner": "eager"},
                                       rtol=1e-4, atol=1e-4)
    assert sum(r.counts["moe"] for r in reports) == LAYERS
    assert_experts_gone([line for r in reports for line in r.passes[-1].after])


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


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
def test_dynamic_token_count_one_graph_matches_eager(name, impl):
    """With dynamic=True the sizes that depend on T (the top-k sum's view, the inverse
    permutation's arange) are SymInts in the graph: compared symbolically, they still match,
    and the one graph serves every token count."""
    model = build(name, impl)
    attnopt.clear_reports()
    compiled = torch.compile(model, backend="attnopt", dynamic=True, options={"inner": "eager"})
    with torch.no_grad():
        for batch, length in ((2, 7), (3, 5)):
            x = torch.randint(0, 128, (batch, length))
            torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
    (report,) = attnopt.reports()
    assert report.counts["moe"] == LAYERS and not report.pass_record("moe").rejected
    assert_experts_gone(report.passes[-1].after)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_exported_with_dynamic_dims_every_block_rewritten(impl):
    """rewrite_model exports batch and sequence as dynamic dims, as `attnopt export` does; the
    rewritten module then runs other shapes. No transformers.grouped_mm_fallback is left (it has
    no ONNX translation)."""
    model = build("mixtral", impl)
    rewritten = rewrite_model(model, (ids(),), {"use_cache": False})
    assert rewritten.report.counts["moe"] == LAYERS
    assert not rewritten.report.pass_record("moe").rejected
    assert_experts_gone(rewritten.report.passes[-1].after)
    with torch.no_grad():
        for batch, length in ((3, 5), (1, 9)):
            x = torch.randint(0, 128, (batch, length))
            torch.testing.assert_close(rewritten.module(x, use_cache=False).logits,
                                       model(x, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_training_graph_keeps_experts():
    model = build("mixtral", "batched_mm").train()
    attnopt.clear_reports()
    out = torch.compile(model, backend="attnopt", options={"inner": "eager"})(ids())
    out.logits.sum().backward()
    report = attnopt.reports()[0]
    assert report.counts["moe"] == 0
    assert report.pass_record("moe").skipped == "weights are not frozen (a training graph)"


# --- the classic form: a ModuleList of expert MLPs and a loop with index_add_ -----------------
# No Dynamo flags: whole-block capture (compiler/whole_block.py) keeps the loop in one graph.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_list_loop_becomes_one_op_with_stacked_weights(dtype):
    model, x = ClassicMoE().to(dtype).eval(), torch.randn(2, 5, 32).to(dtype)
    tol = None if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        (report,) = assert_matches_eager(model, x, options={"inner": "eager"}, rtol=tol, atol=tol)
    assert report.counts["moe"] == 1
    after = report.passes[-1].after
    assert not [line for line in after if "aten.index_add(" in line or "nonzero" in line]
    assert sum("aten.mm(" in line for line in after) == 1  # the router; the experts are gone


def test_module_list_loop_with_dynamic_token_count():
    model = ClassicMoE().eval()
    attnopt.clear_reports()
    with torch.no_grad():
        compiled = torch.compile(model, backend="attnopt", dynamic=True,
                                 options={"inner": "eager"})
        for batch, length in ((2, 5), (3, 4)):
            x = torch.randn(batch, length, 32)
            torch.testing.assert_close(compiled(x), model(x))
    (report,) = attnopt.reports()
    assert report.counts["moe"] == 1
