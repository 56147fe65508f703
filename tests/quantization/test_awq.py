"""AWQ's scale search (awq.py) on a layer whose inputs have a few large channels, the streaming
statistics it reads, and `quantize_model(method="awq")` grouping the linears that share an
input."""

import pytest
import torch
from torch import nn

from attnopt import quantize_model
from attnopt.backends import int4
from attnopt.quantization.awq import InputStats, channel_scale, search_scale
from attnopt.quantization.modules import Int4Linear, quantize_weight
from tests.quantization.toy import OUTLIERS, activations, attention

K, N = 256, 128


def outlier_inputs(rows: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed))
    x[:, [*OUTLIERS, 100]] *= 20
    return x


def relative_output_error(w, x, group_size, input_scale=None) -> float:
    w_hat = quantize_weight(w, group_size, input_scale).dequantize(torch.float32)
    x_in = x if input_scale is None else x * input_scale
    return ((x @ w.T - x_in @ w_hat.T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_beats_rtn_with_outlier_channels(group_size):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) / 16
    stats = InputStats()
    stats.add(outlier_inputs(1024, seed=1))
    result = search_scale([w], stats, group_size, torch.float32)
    assert result.alpha > 0 and result.input_scale.shape == (K,)
    # Measured: AWQ's output error is ~0.6x RTN's on these inputs, for every group size.
    assert result.awq_errors[0] < 0.75 * result.rtn_errors[0]
    # The reported RTN error is plain quantize_rtn's, and the gain holds on unseen rows.
    assert result.rtn_errors[0] == pytest.approx(
        relative_output_error(w, stats.rows, group_size), rel=1e-4)
    held_out = outlier_inputs(1024, seed=2)
    assert relative_output_error(w, held_out, group_size, result.input_scale) < \
        0.75 * relative_output_error(w, held_out, group_size)


def test_alpha_zero_is_rtn():
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    stats = InputStats()
    stats.add(outlier_inputs(300, seed=1))
    result = search_scale([w], stats, 64, torch.float32, alphas=(0.0,))
    assert result.alpha == 0 and result.input_scale is None
    assert result.awq_errors == result.rtn_errors
    assert torch.equal(channel_scale(stats.mean_abs, 0.0), torch.ones(K))
    assert torch.equal(quantize_weight(w, 64).qweight, int4.quantize_rtn(w, 64).qweight)


def test_channel_scale_is_normalised_and_finite():
    mean_abs = torch.tensor([0.0, 1e-9, 0.5, 2.0, 8.0])  # a dead channel must not give inf
    s = channel_scale(mean_abs, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert (s.max() * s.min()).item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(s.argsort()[2:], torch.tensor([2, 3, 4]))


def test_input_stats_mean_and_row_sample():
    x = outlier_inputs(1000, seed=3)
    stats = InputStats(max_rows=100)
    for chunk in x.view(4, 10, 25, K):  # [batch, seq, K] chunks, as hooks see them
        stats.add(chunk)
    torch.testing.assert_close(stats.mean_abs, x.abs().mean(0))
    assert stats.count == 1000 and stats.rows.shape == (100, K)
    # A sample without replacement of real rows, drawn from every chunk.
    matches = (stats.rows[:, None, :] == x[None]).all(-1)
    assert (matches.sum(1) == 1).all()
    assert len(set(matches.float().argmax(1).div(250, rounding_mode="floor").tolist())) == 4


def test_siblings_share_one_input_scale():
    model = attention()
    summary = quantize_model(model, group_size=32, method="awq",
                             calibration=[(activations(seed=s),) for s in range(3)])
    q, k, v, o = model.q, model.k, model.v, model.o
    assert all(isinstance(m, Int4Linear) for m in (q, k, v, o))
    assert q.input_scale is not None and q.input_scale is k.input_scale is v.input_scale
    assert o.input_scale is not q.input_scale
    layers = {layer.name: layer for layer in summary.layers}
    assert layers["q"].alpha == layers["k"].alpha == layers["v"].alpha > 0
    for layer in summary.layers:  # never worse than RTN on the calibration rows
        assert layer.awq_output_error <= layer.rtn_output_error
    header, *rows = summary.table()
    assert header == ("layer", "shape", "weight err", "RTN out err", "AWQ out err", "alpha")
    assert [r[0] for r in rows] == ["q", "k", "v", "o"] and rows[0][1] == "64x64"


class FirstOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.used(x)


def test_layers_the_calibration_never_reaches_get_rtn():
    model = FirstOnly()
    summary = quantize_model(model, group_size=32, method="awq",
                             calibration=[(activations(seed=0),)])
    assert isinstance(model.unused, Int4Linear) and model.unused.input_scale is None
    assert summary.layers[1].note == "not called during calibration: plain RTN"
    assert summary.layers[1].alpha is None and summary.table()[2][-1] == summary.layers[1].note


def test_awq_without_calibration_and_other_bad_arguments():
    with pytest.raises(ValueError, match="method='awq' needs calibration data: pass calibration"):
        quantize_model(attention(), method="awq")
    with pytest.raises(ValueError, match="calibration data yielded no inputs"):
        quantize_model(attention(), method="awq", calibration=[])
    with pytest.raises(ValueError, match=r"method must be one of \('rtn', 'awq', 'gptq'"):
        quantize_model(attention(), method="hqq")
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_model(attention(), group_size=100)
    with pytest.raises(TypeError, match="a calibration input must be a dict"):
        quantize_model(attention(), method="awq", calibration=["text"])
