"""attnopt.load_quantized(directory) on GPTQ, AWQ and compressed-tensors checkpoints of a tiny
Llama (tests/quantization/checkpoints.py writes them): every quantized linear becomes an
Int4Linear whose weight is exactly the checkpoint's (q − z) · s, holding only int4 codes plus
scales and zeros; compiled with attnopt, the model computes what the float model with those
weights computes; bad checkpoints are refused with a message naming what was found."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import attnopt
from attnopt.quantization import Int4Linear
from tests.quantization import checkpoints

transformers = pytest.importorskip("transformers")

GPTQ = [dict(group_size=g, sym=s, desc_act=d) for g in (32, 64, 128, -1) for s in (True, False)
        for d in (False, True) if not (d and g == -1)]
COMPRESSED = [dict(group_size=g, sym=s) for g in (32, 64, 128, -1) for s in (True, False)]


def assert_exact(directory, reference, names):
    """Loaded weights equal the checkpoint's dequantized ones bit for bit; each quantized layer
    holds K/2 bytes of codes per row plus its scales and zeros (and a gather order)."""
    model = attnopt.load_quantized(directory)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, Int4Linear)
        expected = reference.get_submodule(name).weight.float()
        assert torch.equal(layer.effective_weight(), expected), name
        n, k = expected.shape
        groups = layer.scales.shape[1]
        held = sum(p.numel() * p.element_size() for p in layer.parameters())
        order = 8 * k if layer.input_order is not None else 0
        assert held == n * k // 2 + 2 * n * groups * 4 + order
        assert layer.qweight.dtype == torch.uint8
    float_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert float_linears == ["lm_head"]
    return model


@pytest.mark.parametrize("case", GPTQ, ids=lambda c: "g{group_size}-sym{sym}-act{desc_act}"
                         .format(**c))
def test_gptq_exact(tmp_path, case):
    assert_exact(*checkpoints.gptq_checkpoint(tmp_path, layers=1, **case))


def test_gptq_v2_zeros_exact(tmp_path):
    assert_exact(*checkpoints.gptq_checkpoint(tmp_path, group_size=64, sym=False,
                                              desc_act=False, v1=False, layers=1))


@pytest.mark.parametrize("group_size", [64, 128])
def test_awq_exact(tmp_path, group_size):
    assert_exact(*checkpoints.awq_checkpoint(tmp_path, group_size=group_size, layers=1))


@pytest.mark.parametrize("case", COMPRESSED, ids=lambda c: "g{group_size}-sym{sym}".format(**c))
def test_compressed_tensors_exact(tmp_path, case):
    pytest.importorskip("compressed_tensors")
    assert_exact(*checkpoints.compressed_checkpoint(tmp_path, layers=1, **case))


def make(kind, directory):
    if kind == "gptq-act-order":
        return checkpoints.gptq_checkpoint(directory, group_size=32, sym=False, desc_act=True,
                                           layers=1)
    if kind == "awq":
        return checkpoints.awq_checkpoint(directory, group_size=64, layers=1)
    pytest.importorskip("compressed_tensors")
    return checkpoints.compressed_checkpoint(directory, group_size=128, sym=False, layers=1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gptq-act-order", "awq", "compressed-tensors"])
def test_compiled_matches_float_model_and_fuses(tmp_path, kind):
    """torch.compile as usual (no quantize option): every quantized linear is counted, the
    siblings fuse, and on reference kernels the logits equal those of the float model holding
    the checkpoint's dequantized weights to fp32 rounding."""
    directory, reference, names = make(kind, tmp_path)
    model = attnopt.load_quantized(directory)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    attnopt.clear_reports()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attnopt",
                             options={"inner": "eager", "kernels": "reference"})
    with torch.no_grad():
        got = compiled(ids).logits
        expected = reference(ids).logits
    (report,) = attnopt.reports()
    assert report.counts["w4a16_linear"] == len(names)
    # q/k/v and gate/up; act-order siblings read their input in different orders
    assert report.counts["linear_fusion"] == (0 if kind == "gptq-act-order" else 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def cli(capsys, *args):
    """The CLI in this process (no second interpreter to start): (exit status, output)."""
    from attnopt.compiler.cli import main

    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out + out.err


@pytest.mark.slow
def test_cli_export_verifies_and_diff_runs(tmp_path, capsys):
    directory, _, names = checkpoints.gptq_checkpoint(tmp_path / "gptq", group_size=32,
                                                      sym=False, desc_act=True, layers=1)
    status, out = cli(capsys, "export", directory, "-o", tmp_path / "m.onnx", "--verify")
    assert status == 0, out
    assert "verified" in out and f"w4a16_linear={len(names)}" in out
    import onnx

    ops = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    assert ops.count("MatMulNBits") == len(names)
    status, out = cli(capsys, "diff", directory, "--passes", "quantize")
    assert status == 0 and f"w4a16_linear={len(names)}" in out, out


# --- bad checkpoints -------------------------------------------------------------------------


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


Q = "model.layers.0.self_attn.q_proj"
BAD = {
    "3-bit": (lambda d: edit_config(d, bits=3), "has bits=3; attnopt runs 4-bit weights only"),
    "8-bit": (lambda d: edit_config(d, bits=8), "has bits=8"),
    "marlin": (lambda d: edit_config(d, checkpoint_format="marlin"),
               "has checkpoint_format 'marlin'"),
    "unknown method": (lambda d: edit_config(d, quant_method="exl2"),
                       "quant_method 'exl2'; attnopt reads gptq, awq, compressed-tensors"),
    "missing qzeros": (lambda d: edit_tensors(d, lambda s: s.pop(f"{Q}.qzeros")),
                       f"has no tensor '{Q}.qzeros'"),
    "group size disagrees": (lambda d: edit_config(d, group_size=64),
                             "down_proj.qzeros is torch.int32 [8, 16], but for a [128x256] "
                             "linear in groups of 64, it must be torch.int32 [4, 16]"),
    "odd g_idx": (lambda d: edit_tensors(d, lambda s: s[f"{Q}.g_idx"].zero_()),
                  "g_idx does not give each group exactly 32 columns"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoints_are_refused(tmp_path, case):
    directory, _, _ = checkpoints.gptq_checkpoint(tmp_path, group_size=32, sym=False,
                                                  desc_act=False, layers=1)
    damage, message = BAD[case]
    damage(directory)
    with pytest.raises(ValueError) as info:
        attnopt.load_quantized(directory)
    assert message in str(info.value)


def test_cli_refuses_bad_checkpoint_with_exit_2(tmp_path, capsys):
    directory, _, _ = checkpoints.gptq_checkpoint(tmp_path / "bad", group_size=32, sym=False,
                                                  desc_act=False, layers=1)
    edit_config(directory, bits=3)
    status, out = cli(capsys, "export", directory, "-o", tmp_path / "m.onnx")
    assert status == 2 and "Traceback" not in out and "bits=3" in out
    assert not (tmp_path / "m.onnx").exists()


def test_awq_other_versions_and_compressed_8_bit_are_refused(tmp_path):
    directory, _, _ = checkpoints.awq_checkpoint(tmp_path / "awq", group_size=64, layers=1)
    edit_config(directory, version="gemv")
    with pytest.raises(ValueError, match="version 'gemv'; attnopt reads AutoAWQ's 'gemm'"):
        attnopt.load_quantized(directory)
    directory, _, _ = checkpoints.gptq_checkpoint(tmp_path / "ct", group_size=32, sym=True,
                                                  desc_act=False, layers=1)
    edit_config(directory, quant_method="compressed-tensors", format="pack-quantized",
                config_groups={"g": {"targets": ["Linear"], "weights": {
                    "num_bits": 8, "type": "int", "strategy": "group", "group_size": 32}}})
    with pytest.raises(ValueError, match="has 8-bit int weights; attnopt runs 4-bit int"):
        attnopt.load_quantized(directory)
