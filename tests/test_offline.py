"""The offline path: torch.export brought to the graph the backend's capture makes, the same
passes over it (same rewrites as torch.compile), a rewritten module that takes new batch sizes
and lengths, and its ONNX export run in ONNX Runtime."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnopt
from attnopt import quantize_model, rewrite_model
from attnopt.models.llama import LlamaConfig, TinyLlama
from tests.quantization.toy import activations, attention

pytestmark = pytest.mark.slow  # torch.export and ONNX export: seconds per test

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama() -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(CONFIG).eval()


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (batch, length),
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantize", [None, "w4a16"])
def test_same_rewrites_as_the_backend(quantize):
    model, ids = tiny_llama(), token_ids(2, 16)
    offline = rewrite_model(model, (ids,), options={"quantize": quantize}).report
    with torch.no_grad():
        torch.compile(model, backend="attnopt",
                      options={"quantize": quantize, "inner": "eager"})(ids)
    (compiled,) = attnopt.reports()
    assert offline.counts == compiled.counts
    assert offline.counts["attention"] == CONFIG.num_layers
    assert offline.counts["w4a16_linear"] == (len(LINEARS) * CONFIG.num_layers if quantize else 0)
    assert not any(p.error for p in offline.passes)
    assert offline not in attnopt.reports()  # the registry is the backend's


def test_rewritten_module_takes_new_shapes_and_matches_eager():
    model = tiny_llama()
    rewritten = rewrite_model(model, (token_ids(2, 16),))
    with torch.no_grad():
        for batch, length in ((3, 9), (2, 40)):
            ids = token_ids(batch, length, seed=batch)
            torch.testing.assert_close(rewritten.module(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_weights_are_flat_constants_named_by_parameter():
    graph = rewrite_model(tiny_llama(), (token_ids(2, 16),)).module.graph
    constants = [n for n in graph.nodes if n.op == "get_attr"]
    assert constants and all("." not in n.target for n in constants)
    names = {n.meta["attnopt_parameter"] for n in constants}
    assert {"layers.0.self_attn.q_proj.weight", "lm_head.weight", "inv_freq"} <= names
    assert not [n for n in graph.nodes
                if n.target is torch.ops.aten._assert_tensor_metadata.default]


def test_skip_globs_and_layer_errors_use_module_names():
    report = rewrite_model(tiny_llama(), (token_ids(2, 16),), options={
        "quantize": "w4a16", "skip": ["lm_head", "layers.0.mlp.*"]}).report
    record = report.pass_record("quantize")
    assert record.rewrites == len(LINEARS) * CONFIG.num_layers - 3
    assert sum("matches skip glob 'layers.0.mlp.*'" in r for r in record.rejected) == 3
    assert any(note.startswith("layers.1.mlp.down_proj [64x128]") for note in record.notes)


def test_report_dir(tmp_path):
    report = rewrite_model(tiny_llama(), (token_ids(2, 8),),
                           options={"report_dir": str(tmp_path)}).report
    assert (tmp_path / f"graph{report.graph_id}.html").exists()
    assert "attnopt.attention(" in report.diff()


def needs_onnx() -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)


def test_export_onnx_at_new_shapes_matches_attnopt_and_eager(tmp_path):
    needs_onnx()
    from attnopt.compiler.verify import compare

    model, path = tiny_llama(), tmp_path / "llama.onnx"
    rewritten = attnopt.export_onnx(model, path, (token_ids(2, 16),))
    result = compare(path, rewritten.output_names, (token_ids(3, 11, seed=3),), {}, model,
                     rewritten.module, check_eager=True)
    assert result.ok, result.differences
    assert [d.max_rel < 1e-5 for d in result.differences] == [True, True]


def test_int4_checkpoint_model_exports_to_matmulnbits(tmp_path):
    """A model quantize_model made (Int4Linear, AWQ input scales): ORT computes what the
    rewritten graph computes; the Q/K/V siblings are one fused MatMulNBits."""
    needs_onnx()
    import onnx

    from attnopt.compiler.verify import compare

    model = attention()
    quantize_model(model, group_size=32, method="awq",
                   calibration=[(activations(seed=s),) for s in range(2)])
    path = tmp_path / "int4.onnx"
    rewritten = attnopt.export_onnx(model, path, (activations(),), options={
        "quantize": "w4a16", "passes": ["attention", "softmax", "linear_fusion"]})
    assert rewritten.report.counts["linear_fusion"] == 1
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("Attention") == 1
    # Eager runs the int4 CPU kernel, which rounds activations to bf16: reported, not checked.
    result = compare(path, rewritten.output_names, (activations(rows=23, batch=3, seed=7),), {},
                     model, rewritten.module, check_eager=False)
    assert result.ok, result.differences


def test_op_without_translation_is_refused(tmp_path):
    needs_onnx()
    class PagedDecode(torch.nn.Module):
        def forward(self, q, k_pool, v_pool, block_table, seq_lens):
            return torch.ops.attnopt.paged_attention(q, k_pool, v_pool, block_table, seq_lens,
                                                     0.5)

    inputs = (torch.randn(1, 2, 1, 8), torch.randn(4, 4, 2, 8), torch.randn(4, 4, 2, 8),
              torch.zeros(1, 4, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"attnopt.paged_attention.default has no ONNX "
                                         r"translation yet; leave out the pass"):
        attnopt.export_onnx(PagedDecode(), tmp_path / "decode.onnx", inputs)
    assert not (tmp_path / "decode.onnx").exists()


def test_transformers_causal_lm_is_rewritten_as_given():
    """A transformers causal LM returns its KV cache (a DynamicCache torch.export cannot
    output) unless use_cache=False: rewrite_model takes the inputs without it, the rewritten
    graph is called with the same inputs and gives eager's logits, and the model's config is
    as it was."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 128, (2, 9))
    rewritten = rewrite_model(llama, kwargs={"input_ids": ids,
                                             "attention_mask": torch.ones_like(ids)})
    assert rewritten.report.counts["attention"] == 2 and llama.config.use_cache is True
    other = torch.randint(0, 128, (3, 5))
    inputs = {"input_ids": other, "attention_mask": torch.ones_like(other)}
    with torch.no_grad():
        torch.testing.assert_close(rewritten.module(**inputs).logits, llama(**inputs).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_transformers", [False, True])
def test_a_batch_of_one_example_keeps_the_batch_dynamic(use_transformers):
    # torch.export specialises a size of 1; the example is exported as two copies of its row,
    # so other batch sizes run (a guard on batch == 1 would fail them).
    if use_transformers:
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2)).eval()
    else:
        model = tiny_llama()
    rewritten = rewrite_model(model, kwargs={"input_ids": token_ids(1, 16)})
    with torch.no_grad():
        for batch, length in ((3, 9), (1, 12)):
            ids = token_ids(batch, length, seed=batch)
            got, want = rewritten.module(input_ids=ids), model(input_ids=ids)
            if use_transformers:
                got, want = got.logits, want.logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_export_onnx_prints_nothing(tmp_path):
    # No "torchvision is not installed" notices from torch.onnx's registry (4 per export), no
    # deprecation warnings from torch's own code: the CLI never showed them, nor does Python.
    needs_onnx()
    script = ("import torch, attnopt\n"
              "from tests.test_offline import tiny_llama, token_ids\n"
              f"attnopt.export_onnx(tiny_llama(), {str(tmp_path / 'llama.onnx')!r}, "
              "(token_ids(2, 8),))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""
