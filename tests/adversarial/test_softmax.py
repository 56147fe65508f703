"""The softmax pass on awkward values and near misses, on every path: rewritten and equal to
eager (NaN where eager has NaN), or refused with its reason."""

import math

import pytest
import torch

from tests.adversarial.helpers import run

PATHS = [{"kernels": "auto"}, {"kernels": "reference"}, {"kernels": "triton"},
         {"kernels": "auto", "inner": "inductor"}]
IDS = ["cpu", "reference", "triton", "inductor"]


class Masked(torch.nn.Module):
    def __init__(self, fill: float, dim: int = -1, keep_form: bool = False):
        super().__init__()
        self.fill, self.dim, self.keep_form = fill, dim, keep_form

    def forward(self, x, drop):
        s = x * 0.7 + 0.1
        if self.keep_form:  # where(keep, s, fill): the mask marks what stays
            s = torch.where(~drop, s, torch.tensor(self.fill, dtype=s.dtype))
        else:
            s = s.masked_fill(drop, self.fill)
        return torch.softmax(s, dim=self.dim)


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 7, generator=g).to(dtype)
    drop = torch.rand(2, 1, 6, 7, generator=g) < 0.3
    drop[0, 0, 2] = True  # a row masked everywhere
    return x, drop


@pytest.mark.parametrize("path", PATHS, ids=IDS)
@pytest.mark.parametrize("fill", [-math.inf, -1e4, 0.0, -3.0], ids=str)
@pytest.mark.parametrize("keep_form", [False, True], ids=["masked_fill", "where"])
def test_fills_and_rows_masked_everywhere(path, fill, keep_form):
    # -inf: the fully masked row is NaN, as eager's softmax gives it; a finite fill averages.
    r = run(Masked(fill, keep_form=keep_form), *inputs(), **path)
    assert r.count("softmax") == 1
    r.assert_equal()


@pytest.mark.parametrize("path", PATHS[:3], ids=IDS[:3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_float32_min_fill_in_16_bit_scores(path, dtype):
    # where(keep, s, finfo(float32).min): the fill is stored in the scores' dtype, -inf in fp16
    # (the fully masked row is NaN in eager) and a finite value in bf16 (the row averages).
    r = run(Masked(torch.finfo(torch.float32).min, keep_form=True), *inputs(dtype), **path)
    assert r.count("softmax") == 1
    r.assert_equal(rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_nan_and_inf_in_the_scores(path):
    x, drop = inputs()
    x[1, 2, 3, 4] = math.nan
    x[0, 1, 1, 0] = math.inf  # exp(inf - inf): NaN, as in eager
    x[1, 0, 5, :] = -math.inf  # a row of -inf scores without a mask: NaN
    r = run(Masked(-1e9), x, drop, **path)
    assert r.count("softmax") == 1
    r.assert_equal()


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_every_softmax_dim(dim):
    r = run(Masked(-math.inf, dim=dim), *inputs(), kernels="triton")
    assert r.count("softmax") == 1
    r.assert_equal()


def test_a_mask_larger_than_the_scores_stays_outside_the_op():
    class Grow(torch.nn.Module):  # the mask broadcasts the scores up: [6, 7] -> [2, 6, 7]
        def forward(self, x, drop):
            return torch.softmax(x.masked_fill(drop, -math.inf), -1)

    x, drop = torch.randn(6, 7), torch.rand(2, 6, 7) < 0.2
    r = run(Grow(), x, drop)
    r.assert_equal()  # the op takes the softmax of the masked_fill's [2, 6, 7] result
    assert r.count("softmax") == 1
    assert any("aten.masked_fill.Scalar" in line for line in r.reports[0].passes[-1].after)


def test_safe_softmax_rows_masked_everywhere_give_zero():
    class Safe(torch.nn.Module):
        def forward(self, x, drop):
            return torch.ops.aten._safe_softmax(x.masked_fill(drop, -math.inf), -1)

    r = run(Safe(), *inputs(), kernels="triton")
    assert r.count("softmax") == 1
    r.assert_equal()
    assert (r.got[0, :, 2] == 0).all()
