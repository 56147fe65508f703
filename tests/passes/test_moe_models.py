"""The moe pass on the MoE architectures of issue 15, compiled as a user compiles them (no Dynamo
flags: whole-block capture is the backend's): every MoE layer becomes one `attnopt::moe` in one
graph and the logits equal eager's — transformers' Qwen3-MoE in each experts implementation,
Mixtral's eager experts, GPT-OSS (biases, interleaved gate/up, clamped SwiGLU), Llama-4's dense
bmm experts, DBRX, JetMoE; the CPU path everywhere, the Triton kernel (interpreter) on the new
forms; greedy generation with a PagedKVCache equal to eager for GPT-OSS and Qwen3-MoE.
Switch Transformers is the one refused, each layer named with its reason."""

import pytest
import torch

import attnopt
from attnopt.cache import PagedKVCache
from attnopt.compat import with_cache
from attnopt.testing import assert_matches_eager
from tests.moe_models import VOCAB, build

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

CASES = {
    # name: (model, experts implementation, MoE layers)
    "qwen3_moe_eager": ("qwen3_moe", "eager", 1),
    "qwen3_moe_grouped_mm": ("qwen3_moe", "grouped_mm", 1),
    "qwen3_moe_batched_mm": ("qwen3_moe", "batched_mm", 1),
    "mixtral_eager": ("mixtral", "eager", 1),
    "gpt_oss_eager": ("gpt_oss", "eager", 1),
    "gpt_oss_grouped_mm": ("gpt_oss", "grouped_mm", 2),
    "gpt_oss_batched_mm": ("gpt_oss", "batched_mm", 1),
    "llama4": ("llama4", "eager", 2),
    "dbrx": ("dbrx", "eager", 1),
    "jetmoe": ("jetmoe", "eager", 1),
}
# What each form leaves in the graph if its experts stay (GPT-OSS's attention keeps bmms of its
# own, DBRX splits its fused qkv).
EXPERT_OPS = ("grouped_mm", "aten.index_add(", "aten.nonzero(", "_local_scalar_dense")
# JetMoE's mixture-of-attention heads are routed experts too, but attention ones: refused.
REFUSED = {"jetmoe": "not a gated expert: mixture-of-attention experts"}


def ids(batch=2, length=7, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_every_moe_layer_rewritten_in_one_graph(case):
    name, impl, layers = CASES[case]
    with torch.no_grad():
        (report,) = assert_matches_eager(build(name, layers, impl), (ids(),),
                                         options={"inner": "eager"}, rtol=1e-5, atol=1e-5)
    moe = report.pass_record("moe")
    assert report.counts["moe"] == layers and not moe.notes
    assert [why for why in moe.rejected if REFUSED.get(name, "?") not in why] == []
    after = report.passes[-1].after
    assert sum("attnopt.moe(" in line for line in after) == layers
    if name != "jetmoe":  # its attention experts keep an index_add
        assert not [line for line in after if any(op in line for op in EXPERT_OPS)]
    if name == "llama4":
        assert not [line for line in after if "aten.bmm(" in line and "64]" in line]


@pytest.mark.parametrize("case", ["gpt_oss_grouped_mm", "llama4"])
def test_triton_kernel_under_the_interpreter(case):
    """The fused kernel (biased clamped SwiGLU on interleaved weights read through a transposed
    view; the weight on the input; sorted runs) in the compiled model."""
    name, impl, _ = CASES[case]
    with torch.no_grad():
        (report,) = assert_matches_eager(build(name, 1, impl), (ids(1, 5),),
                                         options={"inner": "eager", "kernels": "triton"},
                                         rtol=1e-5, atol=1e-5)
    assert report.counts["moe"] == 1
    assert any("attnopt.moe(" in line and "impl='triton'" in line
               for line in report.passes[-1].after)


def test_gpt_oss_bfloat16():
    model = build("gpt_oss", 1, "grouped_mm").to(torch.bfloat16)
    with torch.no_grad():
        (report,) = assert_matches_eager(model, (ids(),), options={"inner": "eager"},
                                         rtol=3e-2, atol=3e-2)
    assert report.counts["moe"] == 1


def test_switch_transformers_is_refused_layer_by_layer():
    """Switch routes top-1 with an expert capacity (tokens over it get no expert) to experts
    that are not gated (act(W_in x) -> W_out), and loops over the experts hit in a forward of
    its own: no attnopt::moe form. Every MoE layer's graph names its router and says the graph
    ends inside the block."""
    model = build("switch", 2)  # the encoder
    with torch.no_grad():
        reports = assert_matches_eager(model, (ids(),), options={"inner": "eager"},
                                       rtol=1e-5, atol=1e-5)
    assert sum(r.counts["moe"] for r in reports) == 0
    notes = [n for r in reports for n in r.pass_record("moe").notes]
    rejected = [line for r in reports for line in r.pass_record("moe").rejected]
    assert len([n for n in notes if n.startswith("graph ends inside an MoE block")]) == 2
    assert len([line for line in rejected if line.startswith("argmax: router")]) == 2


# --- greedy generation with the paged KV cache ---------------------------------------------


@pytest.mark.parametrize(("name", "impl"), [("gpt_oss", "eager"), ("qwen3_moe", "grouped_mm")])
def test_paged_cache_greedy_tokens_equal_eager(name, impl):
    model = build(name, 1, impl)
    g = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 6), generator=g),
              "attention_mask": torch.ones(2, 6, dtype=torch.long)}

    def generate(cache=None):
        return model.generate(**inputs, max_new_tokens=4, do_sample=False,
                              disable_compile=True, **with_cache(model, cache))

    want = generate()
    model.forward = torch.compile(model.forward, backend="attnopt", options={"inner": "eager"})
    cache = PagedKVCache(model.config, max_tokens=64, block_size=4, max_seq_len=32)
    assert torch.equal(generate(cache), want)
    reports = attnopt.reports()
    assert len(reports) == 2  # prefill and decode
    assert all(r.counts["moe"] == 1 and not r.pass_record("moe").rejected for r in reports)


def test_gpt_oss_exported_to_onnx_matches_eager(tmp_path):
    """The offline path: torch.export with dynamic batch and sequence, the moe pass, the ONNX
    translation of GPT-OSS's experts (biases, interleaved gate/up, clamped SwiGLU), run in ONNX
    Runtime on the export's shape and another."""
    ort = pytest.importorskip("onnxruntime")
    from attnopt import export_onnx

    model, path = build("gpt_oss", 1, "grouped_mm"), tmp_path / "gpt_oss.onnx"
    rewritten = export_onnx(model, path, (ids(),), {"use_cache": False})
    assert rewritten.report.counts["moe"] == 1
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x in (ids(), ids(3, 4, seed=1)):
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x, use_cache=False).logits, rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("name", ["llama4", "einsum", "jetmoe"])
def test_under_dynamic_shapes(name):
    """torch.compile(dynamic=True): one graph serves every token count (the dense forms'
    output is reshaped to x's symbolic sizes; JetMoE's gates are sliced whole first)."""
    from tests.moe_models import EinsumMoE

    model = EinsumMoE().eval() if name == "einsum" else build(name, 1)
    compiled = torch.compile(model, backend="attnopt", dynamic=True, options={"inner": "eager"})
    with torch.no_grad():
        for batch, length in ((2, 7), (3, 5)):
            x = torch.randn(batch, length, 32) if name == "einsum" else ids(batch, length)
            got, want = compiled(x), model(x)
            if name != "einsum":
                got, want = got.logits, want.logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    (report,) = attnopt.reports()
    assert report.counts["moe"] == 1 and not report.pass_record("moe").error
    assert [why for why in report.pass_record("moe").rejected
            if REFUSED.get(name, "?") not in why] == []
