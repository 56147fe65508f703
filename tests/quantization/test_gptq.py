"""GPTQ (quantization/gptq.py): codes in our packed layout, output error on held-out rows below
round-to-nearest's, in both column orders, with AWQ's scale folded in, and through
quantize_model."""

import pytest
import torch

from attnopt import quantize_model
from attnopt.backends import int4
from attnopt.quantization.gptq import quantize_gptq
from attnopt.testing import assert_matches_eager
from tests.quantization.toy import activations, attention


def correlated_rows(rows: int, k: int, seed: int) -> torch.Tensor:
    """Rows with correlated features and a few loud channels, as real activations have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(0)) / k**0.5
    x = torch.randn(rows, k, generator=gen) @ (torch.eye(k) + mix)
    x[:, :3] *= 10
    return x


def output_error(x, w, packed, input_scale=None):
    xs = x if input_scale is None else x * input_scale
    return ((xs @ packed.dequantize(torch.float32).T - x @ w.T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_beats_rtn_on_held_out_rows(act_order, group_size):
    k, n = 160, 48  # K not a multiple of 128: the padding columns too
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    calibration, held_out = correlated_rows(512, k, 2), correlated_rows(256, k, 3)
    packed = quantize_gptq(w, calibration.T @ calibration, group_size, torch.float32,
                           act_order=act_order)
    rtn = int4.quantize_rtn(w, group_size)
    assert packed.qweight.shape == (n, int4.padded(k, group_size) // 2)
    codes = int4.unpack_uint4(packed.qweight)[:, k:]  # padding columns hold the zero point
    zeros = packed.zeros.repeat_interleave(group_size, 1)[:, k:]
    assert torch.equal(codes.float(), zeros)
    gptq_error, rtn_error = output_error(held_out, w, packed), output_error(held_out, w, rtn)
    assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_gptq_with_input_scale_approximates_the_scaled_weight():
    k, n = 128, 32
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4))
    x = correlated_rows(512, k, 5)
    scale = torch.rand(k, generator=torch.Generator().manual_seed(6)) + 0.5
    with_scale = quantize_gptq(w, x.T @ x, 32, torch.float32, input_scale=scale)
    rtn = int4.quantize_rtn(w / scale, 32)
    assert output_error(x, w, with_scale, scale) < 0.8 * output_error(x, w, rtn, scale)


@pytest.mark.parametrize("method", ["gptq", "gptq+awq"])
def test_quantize_model_gptq_compiles_and_beats_rtn(method):
    calibration = [(activations(seed=s),) for s in range(4)]
    model, rtn = attention(), attention()
    quantize_model(rtn, group_size=32)
    summary = quantize_model(model, group_size=32, method=method, calibration=calibration)
    assert all(layer.output_error < layer.rtn_output_error for layer in summary.layers)
    assert summary.table()[0][-2] == f"{method.upper()} out err"
    x = activations(seed=9)
    reference = attention()(x)
    assert (model(x) - reference).norm() < (rtn(x) - reference).norm()
    with torch.no_grad():
        (report,) = assert_matches_eager(model, (x,), options={"inner": "eager"})
    assert report.counts["w4a16_linear"] == 4 and report.counts["linear_fusion"] == 1


def test_gptq_needs_calibration():
    with pytest.raises(ValueError, match="method='gptq' needs calibration data"):
        quantize_model(attention(), method="gptq")
