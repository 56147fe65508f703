"""What a rewritten attention computes on awkward values, on every path (the CPU path, the
reference, the Triton kernels under the interpreter, and Inductor around them): rows masked
everywhere by a finite fill, NaN and inf in the inputs, a float32 bias over 16-bit scores."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.adversarial.helpers import run

PATHS = [{"kernels": "auto"}, {"kernels": "reference"}, {"kernels": "triton"},
         {"kernels": "auto", "inner": "inductor"}]
IDS = ["cpu", "reference", "triton", "inductor"]


class Additive(torch.nn.Module):
    """transformers' eager attention: scores · scale + an additive mask, softmax in fp32."""

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-1, -2) * 0.3 + mask
        return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Sdpa(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)


class MaskedFill(torch.nn.Module):
    def forward(self, q, k, v, keep):
        s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~keep, -math.inf)
        return torch.softmax(s, dim=-1) @ v


def padded_mask(lq: int, lk: int, dtype=torch.float32) -> torch.Tensor:
    """A left-padded batch's mask as transformers builds it: finfo.min on the padding keys and
    above the diagonal, [2, 1, Lq, Lk]. Sequence 1's first 5 positions are padding, so its
    first query rows see no key at all."""
    keep = torch.ones(2, 1, lq, lk, dtype=torch.bool).tril(lk - lq)
    keep[1, ..., :5] = False
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


@pytest.mark.parametrize("path", PATHS, ids=IDS)
@pytest.mark.parametrize("module", [Additive(), Sdpa()], ids=["additive", "sdpa"])
@pytest.mark.parametrize(("lq", "lk"), [(20, 20), (1, 40)], ids=["prefill", "decode"])
def test_rows_masked_everywhere_by_a_finite_fill(path, module, lq, lk):
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(2, 4, lq, 16, generator=g)
    k, v = torch.randn(2, 2, lk, 16, generator=g), torch.randn(2, 2, lk, 16, generator=g)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    mask = padded_mask(lq, lk) if lq > 1 else padded_mask(lq, lk).flip(-1)
    if lq == 1:  # decode: sequence 0's only query sees nothing
        mask[0] = torch.finfo(torch.float32).min
    r = run(module, q, k, v, mask, **path)
    assert r.count("attention") == 1
    r.assert_equal(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("path", PATHS, ids=IDS)
@pytest.mark.parametrize("where", ["query", "masked key", "masked key inf", "value"])
def test_nan_and_inf_as_eager_gives_them(path, where):
    # masked_fill drops the masked scores: NaN or inf in a key there changes nothing; NaN in a
    # query makes its row NaN; NaN in a value reaches every row that reads it (0 · NaN).
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    keep = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    if where == "query":
        q[0, 1, 2, 3] = math.nan
    elif where == "masked key":
        k[0, 0, 5, 1] = math.nan  # key 5: only the last query sees it
    elif where == "masked key inf":
        k[0, 0, 4, :] = math.inf
    else:
        v[0, 1, 3, 0] = math.nan
    r = run(MaskedFill(), q, k, v, keep, **path)
    assert r.count("attention") == 1
    r.assert_equal()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS[:3], ids=IDS[:3])
def test_a_float32_bias_over_16_bit_scores_keeps_its_precision(dtype, path):
    # Scores upcast to fp32 before a large fp32 bias (ALiBi over a long row, relative
    # positions): eager adds it in fp32. Rounding the bias to 16 bits first moves the logits
    # by up to a percent of the bias; attnopt must stay as close to the fp64 truth as eager.
    class Biased(torch.nn.Module):
        def forward(self, q, k, v, bias):
            s = (q @ k.transpose(-1, -2)).float() * 0.25 + bias
            return torch.softmax(s, dim=-1).to(q.dtype) @ v

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 64, 32, generator=g).to(dtype) for _ in range(3))
    bias = torch.randn(1, 2, 64, 64, generator=g) * 40 - torch.arange(64.0) * 1.37
    truth = Biased()(q.double(), k.double(), v.double(), bias.double())
    r = run(Biased(), q, k, v, bias, **path)
    assert r.count("attention") == 1
    eager_error = (r.want.double() - truth).abs().max().item()
    attnopt_error = (r.got.double() - truth).abs().max().item()
    assert attnopt_error <= 1.25 * eager_error, (attnopt_error, eager_error)
