"""attnopt::moe's expert forms (`reference.ExpertForm`): per-expert biases on gate/up and down,
the activation family (SiLU, GELU, GPT-OSS's clamped SwiGLU with its alpha and limit), gate/up
interleaved or in halves, and the routing weight on the expert's input (Llama-4) — in the
reference, the CPU path, the Triton kernel (interpreter on CPU), int4 experts, the backward and
the ONNX translation (ONNX Runtime).

The ground truth here is written from the models' own code, pair by pair in float64
(`per_pair`), not from `reference.moe`; GPT-OSS's clamped SwiGLU is transformers' own
`GptOssExperts._apply_gate`."""

import math

import pytest
import torch

from attnopt.backends import int4, moe_cpu, reference
from attnopt.backends.reference import ExpertForm
from attnopt.backends.triton import moe as kernel
from tests.conftest import DEVICE

T, H, I, E, K = 9, 40, 24, 5, 2  # noqa: E741  H, I not multiples of the 16-wide test tiles
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}

FORMS = {
    # name: (form, biases on gate/up, bias on down)
    "gpt_oss": (ExpertForm("swiglu_oai", interleaved=True), True, True),
    "swiglu_oai_halves_tight_limit": (ExpertForm("swiglu_oai", alpha=1.1, limit=0.4), True,
                                      False),
    "gpt_oss_tight_limit": (ExpertForm("swiglu_oai", True, alpha=1.1, limit=0.4), True, True),
    "silu_down_bias_only": (ExpertForm("silu"), False, True),
    "gelu_interleaved_gate_up_bias": (ExpertForm("gelu", interleaved=True), True, False),
    "llama4_weight_on_input": (ExpertForm("silu", weight_on_input=True), False, False),
    "gelu_tanh_on_input_biased": (ExpertForm("gelu_tanh", weight_on_input=True), True, True),
}


def problem(form_name, dtype=torch.float32, seed=0, t=T):
    form, gate_up_bias, down_bias = FORMS[form_name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g) * 2  # values past a tight limit: the clamps matter
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)
    w_down = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(t)])  # E-1 unused
    ids[0] = 0  # ... and token 0 picks expert 0 in both slots: it counts twice
    weights = torch.rand(t, K, generator=g)
    b_gate_up = torch.randn(E, 2 * I, generator=g) if gate_up_bias else None
    b_down = torch.randn(E, H, generator=g) if down_bias else None
    tensors = [x.to(dtype), ids, weights, w_gate_up.to(dtype), w_down.to(dtype), b_gate_up,
               b_down]
    return form, [None if v is None else v.to(DEVICE) for v in tensors]


def gpt_oss_gate(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    stand_in = type("Gate", (), {"alpha": alpha, "limit": limit})()
    return GptOssExperts._apply_gate(stand_in, gate_up)


def per_pair(form, x, ids, weights, w_gate_up, w_down, b_gate_up, b_down):
    """out[t] = Σ_j (w x[t] -> expert -> or expert -> · w), one (token, slot) pair at a time in
    float64, the expert written as the models write theirs."""
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e, w = int(ids[t, j]), weights[t, j].double()
            a = x[t].double() * (w if form.weight_on_input else 1)
            gate_up = w_gate_up[e].double() @ a
            if b_gate_up is not None:
                gate_up = gate_up + b_gate_up[e].double()
            if form.activation == "swiglu_oai":
                if not form.interleaved:  # transformers' gate reads even/odd columns
                    gate_up = torch.stack([gate_up[:I], gate_up[I:]], -1).flatten()
                h = gpt_oss_gate(gate_up, form.alpha, form.limit)
            else:
                gate, up = (gate_up[0::2], gate_up[1::2]) if form.interleaved else \
                    (gate_up[:I], gate_up[I:])
                h = reference.moe_activation(gate, form.activation) * up
            y = w_down[e].double() @ h
            if b_down is not None:
                y = y + b_down[e].double()
            out[t] += y if form.weight_on_input else w * y
    return out


def run(path, form, *args):
    if path == "triton":
        return kernel.fused_moe(*args[:5], form, *args[5:])
    if path == "cpu":
        return moe_cpu.moe(*args[:5], form, *args[5:])
    return reference.moe(*args[:5], form, *args[5:])


CASES = [(name, torch.float32) for name in FORMS] + [
    ("gpt_oss", torch.bfloat16), ("llama4_weight_on_input", torch.bfloat16)]


@pytest.mark.parametrize("path", ["reference", "cpu", "triton"])
@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_every_form_on_every_path(name, dtype, path):
    form, args = problem(name, dtype)
    got = run(path, form, *args)
    assert got.dtype == dtype and got.shape == args[0].shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), per_pair(form, *args), rtol=TOL[dtype],
                               atol=TOL[dtype])


@pytest.mark.parametrize("name", list(FORMS))
def test_every_form_for_one_token(name):
    # One token goes by pair (no align step), and this one picks expert 0 in both slots.
    form, args = problem(name, t=1)
    got = kernel.fused_moe(*args[:5], form, *args[5:])
    torch.testing.assert_close(got.double(), per_pair(form, *args), rtol=1e-5, atol=1e-5)


def test_clamps_are_active():
    """The clamped SwiGLU with a tight limit differs from the unclamped one on these inputs, so
    the test above checks the clamps, and the op's alpha is the one passed."""
    form, args = problem("swiglu_oai_halves_tight_limit")
    loose = form._replace(limit=1e9)
    assert not torch.allclose(run("cpu", form, *args), run("cpu", loose, *args))
    assert not torch.allclose(run("cpu", form, *args),
                              run("cpu", form._replace(alpha=1.702), *args))


@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_transposed_weight_views_are_read_in_place(path):
    """GPT-OSS and Llama-4 store experts as [E, H, 2I] and [E, I, H]: the pass hands the op
    transposed views (no copy); both paths read them through their strides."""
    form, args = problem("gpt_oss")
    w_gate_up, w_down = args[3], args[4]
    views = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w_gate_up, w_down)]
    assert not views[0].is_contiguous()
    got = run(path, form, *args[:3], *views, *args[5:])
    torch.testing.assert_close(got, run("reference", form, *args))


def test_the_op_dispatches_its_form_arguments():
    form, args = problem("gpt_oss")
    x, ids, weights, w_gate_up, w_down, b_gate_up, b_down = args
    for impl in ("auto", "reference"):
        got = torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down, "swiglu_oai", impl,
                                    b_gate_up, b_down, True, form.alpha, form.limit, False)
        torch.testing.assert_close(got.double(), per_pair(form, *args), rtol=1e-5, atol=1e-5)


def test_opcheck_with_biases_and_a_form():
    _, (x, ids, weights, w_gate_up, w_down, b_gate_up, b_down) = problem("gpt_oss", t=4)
    args = (x.requires_grad_(), ids, weights.requires_grad_(), w_gate_up, w_down, "swiglu_oai",
            "auto", b_gate_up.requires_grad_(), b_down.requires_grad_(), True, 1.702, 7.0,
            False)
    torch.library.opcheck(torch.ops.attnopt.moe.default, args)


@pytest.mark.parametrize("name", ["gpt_oss", "swiglu_oai_halves_tight_limit",
                                  "gelu_tanh_on_input_biased", "llama4_weight_on_input"])
def test_gradients_match_autograd_through_the_reference(name):
    """The written-out backward (`reference.moe_backward`) against autograd through
    `reference.moe`, in float64, for every input that takes a gradient (biases included)."""
    form, args = problem(name, t=5)
    x, ids, weights, w_gate_up, w_down, b_gate_up, b_down = (
        a.double() if a is not None and a.is_floating_point() else a for a in args)
    leaves = [a.requires_grad_() for a in (x, weights, w_gate_up, w_down, b_gate_up, b_down)
              if a is not None]
    out = torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down, form.activation, "auto",
                                b_gate_up, b_down, form.interleaved, form.alpha, form.limit,
                                form.weight_on_input)
    got = torch.autograd.grad(out.square().sum(), leaves)
    ref = reference.moe(x, ids, weights, w_gate_up, w_down, form, b_gate_up, b_down)
    for g, w in zip(got, torch.autograd.grad(ref.square().sum(), leaves), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("path", ["cpu", "triton"])
@pytest.mark.parametrize("name", ["gpt_oss", "llama4_weight_on_input"])
def test_int4_experts_keep_the_form(name, path):
    """moe_w4a16 with a form and float biases: the float op on the dequantized weights."""
    from attnopt.passes.quantize import quantize_experts

    form, (x, ids, weights, w_gate_up, w_down, b_gate_up, b_down) = problem(name)
    packed = [quantize_experts(w, 32, x.dtype) for w in (w_gate_up, w_down)]
    flat = [getattr(p, k) for p in packed for k in ("qweight", "scales", "zeros")]
    dequantized = [torch.stack([int4.dequantize(p.qweight[e], p.scales[e], p.zeros[e], 32, n,
                                                torch.float32) for e in range(E)])
                   for p, n in zip(packed, (H, I), strict=True)]
    want = per_pair(form, x, ids, weights, *dequantized, b_gate_up, b_down)
    op = kernel.fused_moe_w4a16 if path == "triton" else moe_cpu.moe_w4a16
    got = op(x, ids, weights, *flat, 32, form, b_gate_up, b_down)
    # ATen's int4 CPU kernel rounds x (here up to ~8) and the intermediate to bf16.
    tol = 1e-5 if path == "triton" else 5e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(reference.moe_w4a16(x, ids, weights, *flat, 32, form, b_gate_up,
                                                   b_down).double(), want, rtol=1e-5, atol=1e-5)


def test_bad_biases_and_limits_are_clear_errors():
    form, (x, ids, weights, w_gate_up, w_down, b_gate_up, b_down) = problem("gpt_oss")
    with pytest.raises(ValueError, match=r"b_gate_up must be a floating \[E, N\] = \[5, 48\]"):
        moe_cpu.moe(x, ids, weights, w_gate_up, w_down, form, b_gate_up[:, :-1], b_down)
    with pytest.raises(ValueError, match=r"b_down must be a floating \[E, N\] = \[5, 40\]"):
        kernel.fused_moe(x, ids, weights, w_gate_up, w_down, form, b_gate_up, b_down[:1])
    with pytest.raises(ValueError, match="swiglu_oai needs a positive limit"):
        reference.moe(x, ids, weights, w_gate_up, w_down, form._replace(limit=0.0))


# --- ONNX -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt_oss_tight_limit", "gelu_tanh_on_input_biased"])
def test_onnx_translation_in_onnx_runtime(name):
    """The translation, exported with the token count dynamic and run in ONNX Runtime on 9, 17
    and 1 tokens against `per_pair`: interleaved gate/up, both biases and active clamps; the
    weight on the input. (The fp16 rounding of the translation is test_onnx.py's.)"""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from tests.backends.test_onnx import export
    from tests.backends.test_onnx import run as run_onnx

    dtype, tol = torch.float32, 1e-5
    form, (x, _, _, w_gate_up, w_down, b_gate_up, b_down) = problem(name, dtype)

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for key, t in (("w_gate_up", w_gate_up), ("w_down", w_down),
                           ("b_gate_up", b_gate_up), ("b_down", b_down)):
                self.register_buffer(key, t)

        def forward(self, x, ids, weights):
            return torch.ops.attnopt.moe(x, ids, weights, self.w_gate_up, self.w_down,
                                         form.activation, "auto", self.b_gate_up, self.b_down,
                                         form.interleaved, form.alpha, form.limit,
                                         form.weight_on_input)

    tokens = {0: torch.export.Dim.AUTO}
    _, example = problem(name, dtype, seed=1)
    _, session = export(Experts(), example[:3], dynamic=(tokens, tokens, tokens))
    for t in (9, 17, 1):
        _, (x, ids, weights, *_) = problem(name, dtype, seed=t, t=t)
        got = run_onnx(session, [x, ids, weights])
        want = reference.moe(x, ids, weights, w_gate_up, w_down, form, b_gate_up, b_down)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(got.double(), per_pair(form, x, ids, weights, w_gate_up,
                                                          w_down, b_gate_up, b_down),
                                   rtol=tol, atol=tol)
