"""Int4Linear models through torch.compile(backend="attnopt"): their parameters are frozen into
constants, outputs match eager, and the Q/K/V siblings become one int4 GEMM — with or without
quantize="w4a16", since the model is int4 already (issue 18)."""

import pytest
import torch

from attnopt import quantize_model
from attnopt.testing import assert_matches_eager
from tests.quantization.toy import activations, attention

FUSING = {"inner": "eager", "quantize": "w4a16"}


def quantized(method: str) -> torch.nn.Module:
    model = attention()
    calibration = [(activations(seed=s),) for s in range(2)] if method == "awq" else None
    quantize_model(model, group_size=32, method=method, calibration=calibration)
    return model


def compile_and_check(model, options):
    """Compile under no_grad and assert it matches eager (fp32 tolerance)."""
    with torch.no_grad():
        reports = assert_matches_eager(model, (activations(seed=5),), options=options)
    assert len(reports) == 1 and not any(p.error for p in reports[0].passes)
    return reports[0]


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_matches_eager_without_fusion(method):
    report = compile_and_check(quantized(method), {"inner": "eager",
                                                   "passes": ["attention", "softmax"]})
    assert report.counts["linear_fusion"] == 0
    assert report.counts["attention"] == 1  # the float part is still rewritten


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_int4_model_fuses_without_the_quantize_option(method):
    """An int4 model compiled as usual (no quantize option) gets its siblings fused; the float
    linears of a float model are neither quantized nor fused."""
    report = compile_and_check(quantized(method), {"inner": "eager"})
    assert report.counts["linear_fusion"] == 1 and report.counts["w4a16_linear"] == 4
    fused = [line for line in report.passes[-1].after if "attnopt.w4a16_linear(" in line]
    assert len(fused) == 2 and "float32[2, 40, 192]" in fused[0]  # q|k|v, then o
    float_report = compile_and_check(attention(), {"inner": "eager"})
    assert float_report.counts["linear_fusion"] == 0
    assert not any("w4a16" in line for line in float_report.passes[-1].after)


def test_rtn_siblings_fuse():
    report = compile_and_check(quantized("rtn"), FUSING)
    assert report.counts["linear_fusion"] == 1
    assert report.counts["w4a16_linear"] == 4  # the 4 that arrived in int4; none left in float
    fused = [line for line in report.passes[-1].after if "attnopt.w4a16_linear(" in line]
    assert len(fused) == 2 and "float32[2, 40, 192]" in fused[0]  # q|k|v, then o


def test_awq_siblings_fuse():
    """Each sibling multiplies x by the one shared scale (three mul nodes, same operands):
    linear_fusion keys inputs structurally, so they still fuse, and the extra muls die."""
    model = quantized("awq")
    assert model.q.input_scale is model.k.input_scale  # one shared graph input all the same
    report = compile_and_check(model, FUSING)
    assert report.counts["linear_fusion"] == 1
