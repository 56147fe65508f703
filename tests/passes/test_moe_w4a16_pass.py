"""quantize="w4a16" on MoE models: the moe pass makes `attnopt::moe`, then the quantize pass turns
its frozen expert weights into int4 and the call into `attnopt::moe_w4a16`.

Judged against the float model whose weights are replaced by what their int4 codes decode to
(tight: the compiled graph must compute exactly that, up to the bf16 activations of ATen's int4
CPU kernel) and against the float model itself (loose: the quantization error), and the Triton
kernel against the reference implementation."""

import copy

import pytest
import torch

import attnopt
from attnopt.backends import int4
from tests.passes.test_moe_pass import LAYERS, ClassicMoE, build, ids

pytest.importorskip("transformers")
OPTIONS = {"inner": "eager", "quantize": "w4a16", "group_size": 32}
# The Mixtral linears other than lm_head (q, k, v, o and the router, per layer) and the experts,
# as the quantize pass names them.
LINEARS = 5 * LAYERS


def dequantized_copy(model: torch.nn.Module, group_size: int, skip=("lm_head", "embed"),
                     dims=(2, 3)):
    """The float model with every weight the pass quantizes (2-D linear weights, 3-D stacked
    expert weights; `dims` picks which) replaced by what its int4 codes decode to."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() in dims and not any(s in name for s in skip):
                rows = p.reshape(-1, p.shape[-1])
                packed = int4.quantize_rtn(rows, group_size, p.dtype)
                p.copy_(packed.dequantize(torch.float32).view(p.shape))
    return ref


def compiled(model, *inputs, **options):
    attnopt.clear_reports()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="attnopt", options={**OPTIONS, **options})(*inputs)
    return out, attnopt.reports()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def after(reports, op: str) -> int:
    return sum(f"attnopt.{op}(" in line for r in reports for line in r.passes[-1].after)


def test_mixtral_experts_become_int4():
    model, x = build("mixtral", "grouped_mm"), ids()
    out, reports = compiled(model, x)
    assert sum(r.counts["moe"] for r in reports) == LAYERS  # still counted as MoE blocks
    assert sum(r.counts["w4a16_linear"] for r in reports) == LINEARS  # linears only
    assert after(reports, "moe_w4a16") == LAYERS and after(reports, "moe") == 0
    notes = [n for r in reports for n in r.pass_record("quantize").notes if "[moe:" in n]
    assert sorted(n.split(" [")[0] for n in notes) == [
        f"model.layers.{i}.mlp.experts" for i in range(LAYERS)]
    assert all(0 < float(n.rsplit(" ", 1)[1]) < 0.15 for n in notes)  # measured 0.081
    with torch.no_grad():
        exact, eager = dequantized_copy(model, 32)(x).logits, model(x).logits
    # Against the float model: int4 RTN of random weights, router included (measured 0.103-
    # 0.115). Against the dequantized model: the CPU kernels' bf16 activations (measured 0.010,
    # most of it one token whose routing they moved; 1.8e-7 with kernels="reference").
    assert rel_err(out.logits, eager) < 0.2
    assert rel_err(out.logits, exact) < 3e-2


def test_triton_kernel_matches_reference_and_int4_weights():
    # Only the experts are quantized (the skip globs name every linear) and only the moe and
    # quantize passes run, so that the interpreter runs nothing but the MoE kernel; one token.
    model, x = build("mixtral", "batched_mm"), ids()[:1, :1]
    options = dict(passes=["moe", "quantize"], skip=["*_proj", "gate", "lm_head"])
    got, reports = compiled(model, x, kernels="triton", **options)
    assert after(reports, "moe_w4a16") == LAYERS
    assert sum(r.counts["w4a16_linear"] for r in reports) == 0
    want, _ = compiled(model, x, kernels="reference", **options)
    with torch.no_grad():
        exact = dequantized_copy(model, 32, dims=(3,))(x).logits
    # fp32 throughout: both exact to the int4 weights up to fp32 rounding (measured ~3e-7).
    assert rel_err(got.logits, want.logits) < 1e-5
    assert rel_err(want.logits, exact) < 1e-5


@pytest.mark.parametrize("skip", [(), ("experts",)])
def test_module_list_experts_are_named_and_quantized(skip):
    """The classic loop's stacked weights are named after the ModuleList that held them."""
    model, x = ClassicMoE(h=64, i=48).eval(), torch.randn(2, 5, 64)
    out, (report,) = compiled(model, x, skip=["gate", *skip])
    assert report.counts["moe"] == 1
    if skip:
        assert after([report], "moe") == 1
        assert any(r.endswith(": experts is left in float: it matches skip glob 'experts'")
                   for r in report.pass_record("quantize").rejected)
        return
    assert after([report], "moe_w4a16") == 1
    (note,) = report.pass_record("quantize").notes
    assert note.startswith("experts [moe: 4 experts, gate_up 96x64, down 64x48]")
    with torch.no_grad():
        exact = dequantized_copy(model, 32, skip=("gate",))(x)
    assert rel_err(out, exact) < 1e-2


@pytest.mark.parametrize("name", ["gpt_oss", "llama4"])
def test_expert_forms_keep_their_form_in_int4(name):
    """GPT-OSS (biases, interleaved clamped SwiGLU) and Llama-4 (the weight on the input) store
    their experts [E, H, N]: the op reads transposed views, quantized along H. Only the experts
    are quantized here; against the model whose expert weights are what their codes decode to,
    with kernels="reference" (fp32 throughout: exact up to fp32 rounding)."""
    from tests.moe_models import build as build_model

    model, x = build_model(name, 1, "grouped_mm"), ids()
    skip = ["*attn*", "*router*", "*shared_expert*", "lm_head"]
    out, (report,) = compiled(model, x, kernels="reference", skip=skip)
    assert after([report], "moe_w4a16") == 1 and after([report], "moe") == 0
    assert report.counts["w4a16_linear"] == 0
    line = next(li for li in report.passes[-1].after if "attnopt.moe_w4a16(" in li)
    assert ("interleaved=True" in line and "b_gate_up=" in line) if name == "gpt_oss" \
        else "weight_on_input=True" in line
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in (ref.get_submodule("model.layers.0.feed_forward.experts"
                                    if name == "llama4" else "model.layers.0.mlp.experts")
                  .parameters()):
            if p.dim() == 3:  # [E, K, N] as stored: quantized as the op's [E, N, K]
                op = p.transpose(1, 2)
                packed = int4.quantize_rtn(op.reshape(-1, op.shape[-1]), 32, p.dtype)
                p.copy_(packed.dequantize(torch.float32).view(op.shape).transpose(1, 2))
        exact, eager = ref(x).logits, model(x).logits
    assert rel_err(out.logits, exact) < 1e-5
    assert rel_err(out.logits, eager) < 0.2
