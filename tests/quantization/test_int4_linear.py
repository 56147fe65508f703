"""Int4Linear computes x·input_scale @ Ŵᵀ + b with Ŵ its dequantized int4 weight, in every dtype
and on both CPU paths of w4a16_linear (the ATen int4 kernel, on bf16 activations, where
out_features is a multiple of 16; dequantize + F.linear in x's dtype otherwise), from an
nn.Linear or from GPT-2's transposed Conv1D."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnopt.backends import int4_cpu
from attnopt.quantization.modules import Int4Linear, source_weight

K, N = 96, 48  # K is no multiple of 64: the packed weight has padding columns
# out_features per path: the ATen kernel takes multiples of 16 only.
OUT = {"kernel": N, "dequant": N - 8}
# The kernel path rounds x to bf16 first; fp32 on the dequantize path is exact up to summation.
TOL = {(torch.float32, "kernel"): 2e-2, (torch.float32, "dequant"): 1e-5,
       (torch.bfloat16, "kernel"): 3e-2, (torch.bfloat16, "dequant"): 3e-2}


def linear(dtype=torch.float32, bias=True, out_features=N) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(K, out_features, bias=bias).to(dtype)


@pytest.mark.parametrize("path", ["kernel", "dequant"])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_linear_on_dequantized_weight(dtype, scaled, path):
    assert (int4_cpu.supported(OUT[path], 64) is None) == (path == "kernel")
    lin = linear(dtype, out_features=OUT[path])
    input_scale = torch.rand(K).add(0.5).to(dtype) if scaled else None
    q = Int4Linear.from_linear(lin, 64, input_scale)
    x = torch.randn(2, 5, K).to(dtype)
    x_in = x.float() * input_scale.float() if scaled else x.float()
    w_hat = q.packed().dequantize(torch.float32)
    expected = F.linear(x_in, w_hat, lin.bias.float())
    got = q(x)
    assert got.dtype == dtype and got.shape == (2, 5, OUT[path])
    tol = TOL[dtype, path]
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    # The effective weight folds input_scale back in: the layer approximates the float one.
    err = (q.effective_weight() - lin.weight.float()).norm() / lin.weight.float().norm()
    assert err < 0.15


def test_without_bias_and_repr():
    q = Int4Linear.from_linear(linear(bias=False), 32)
    assert q.bias is None
    x = torch.randn(3, K)
    torch.testing.assert_close(q(x), F.linear(x, q.effective_weight()), rtol=2e-2, atol=2e-2)
    assert repr(q) == ("Int4Linear(in_features=96, out_features=48, group_size=32, bias=False, "
                       "input_scale=False, input_order=False)")


def test_everything_is_a_frozen_parameter_and_casts_like_a_model():
    # Parameters (not buffers) so the backend freezes them into graph constants.
    q = Int4Linear.from_linear(linear(), 32, torch.ones(K))
    params = dict(q.named_parameters())
    assert set(params) == {"qweight", "scales", "zeros", "bias", "input_scale"}
    assert not any(p.requires_grad for p in params.values())
    assert not list(q.buffers())
    q = q.to(torch.bfloat16)
    assert q.qweight.dtype == torch.uint8 and q.scales.dtype == torch.bfloat16
    assert q.input_scale.dtype == torch.bfloat16


def test_shared_input_scale_parameter_is_used_as_is():
    scale = nn.Parameter(torch.ones(K), requires_grad=False)
    a, b = (Int4Linear.from_linear(linear(), 32, scale) for _ in range(2))
    assert a.input_scale is scale and b.input_scale is scale


def test_empty_module_has_the_packed_shapes():
    q = Int4Linear(K, N, 64, bias=False, input_scale=True, dtype=torch.bfloat16)
    assert q.qweight.shape == (N, 64) and q.scales.shape == (N, 2) and q.zeros.shape == (N, 2)
    assert q.input_scale.shape == (K,) and q.scales.dtype == torch.bfloat16


def test_from_conv1d_transposes_the_weight():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    conv = pytorch_utils.Conv1D(N, K)  # nf=N outputs, nx=K inputs; weight stored [K, N]
    nn.init.normal_(conv.bias)
    w, transposed = source_weight(conv)
    assert transposed and w.shape == (N, K)
    q = Int4Linear.from_linear(conv, 32)
    as_linear = nn.Linear(K, N)
    as_linear.weight.data, as_linear.bias.data = conv.weight.data.T, conv.bias.data
    reference = Int4Linear.from_linear(as_linear, 32)
    assert torch.equal(q.qweight, reference.qweight) and torch.equal(q.scales, reference.scales)
    x = torch.randn(4, K)
    torch.testing.assert_close(q(x), conv(x), rtol=0.1, atol=0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"input_scale must have shape \[96\]"):
        Int4Linear.from_linear(linear(), 32, torch.ones(K + 1))
    with pytest.raises(TypeError, match=r"takes an nn\.Linear or a transformers Conv1D"):
        Int4Linear.from_linear(nn.LayerNorm(K), 32)
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\)"):
        Int4Linear.from_linear(linear(), 256)
