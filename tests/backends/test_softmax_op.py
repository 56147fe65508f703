"""attnopt::softmax: the Triton kernel (under TRITON_INTERPRET=1 without a GPU) and the CPU path
against torch.softmax and a float64 reference, over random shapes, dtypes and masks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.backends import reference
from attnopt.backends.triton import softmax as triton_softmax
from tests.conftest import DEVICE

TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NEG_INF = float("-inf")


def attnopt_softmax(x, dim=-1, scale=1.0, bias=None, mask=None, fill=NEG_INF, **kw):
    return torch.ops.attnopt.softmax(x, dim, scale, bias, mask, fill, **kw)


@st.composite
def cases(draw):
    rank = draw(st.integers(1, 5))
    shape = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    shape[-1] = draw(st.integers(1, 200))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    dim = draw(st.integers(-rank, rank - 1))
    broadcast = [1 if draw(st.booleans()) else n for n in shape]
    return dict(
        shape=shape, dtype=dtype, dim=dim,
        scale=draw(st.sampled_from([1.0, 0.125, 2.5])),
        bias=broadcast if draw(st.booleans()) else None,
        mask=broadcast if draw(st.booleans()) else None,
        keep_mask=draw(st.booleans()), safe=draw(st.booleans()),
        fill=draw(st.sampled_from([NEG_INF, -1e4])),
        block=draw(st.sampled_from([None, 16, 64])),
        seed=draw(st.integers(0, 2**16)),
    )


def make_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["shape"], generator=g).to(c["dtype"])
    bias = torch.randn(c["bias"], generator=g).to(c["dtype"]) if c["bias"] else None
    mask = torch.rand(c["mask"], generator=g) > 0.7 if c["mask"] else None
    on_device = lambda t: None if t is None else t.to(DEVICE)
    return on_device(x), on_device(bias), on_device(mask)


@settings(max_examples=40, deadline=None)
@given(cases())
def test_triton_kernel_matches_float64_reference(c):
    x, bias, mask = make_inputs(c)
    args = (c["dim"], c["scale"], bias, mask, c["fill"], c["keep_mask"], c["safe"])
    expected = reference.softmax(x.double(), *args, dtype=torch.float64)
    got = triton_softmax.softmax(x, *args, dtype=c["dtype"], block_n=c["block"])
    assert got.dtype == c["dtype"] and got.shape == x.shape and got.is_contiguous()
    torch.testing.assert_close(got.double(), expected, rtol=TOL[c["dtype"]] * 4,
                               atol=TOL[c["dtype"]], equal_nan=True)


@pytest.mark.parametrize("impl", ["auto", "reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_matches_torch_softmax(impl, dtype):
    x = torch.randn(2, 3, 17, 70, device=DEVICE).to(dtype)
    expected = torch.softmax(x.float(), -1).to(dtype)
    got = attnopt_softmax(x, impl=impl)
    torch.testing.assert_close(got, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("block", [None, 8])
def test_fully_masked_rows_match_eager_exactly(impl, block):
    x = torch.randn(3, 20, device=DEVICE)
    mask = torch.zeros(3, 20, dtype=torch.bool, device=DEVICE)
    mask[1] = True  # row 1 fully masked
    mask[2, :15] = True  # row 2: the first blocks fully masked, later ones not
    eager = torch.softmax(x.masked_fill(mask, NEG_INF), -1)
    eager_safe = torch.ops.aten._safe_softmax(x.masked_fill(mask, NEG_INF), -1)
    if impl == "triton" and block:
        args = (-1, 1.0, None, mask, NEG_INF, False)
        got = triton_softmax.softmax(x, *args, False, torch.float32, block_n=block)
        got_safe = triton_softmax.softmax(x, *args, True, torch.float32, block_n=block)
    else:
        got = attnopt_softmax(x, mask=mask, impl=impl)
        got_safe = attnopt_softmax(x, mask=mask, safe=True, impl=impl)
    assert torch.isnan(got[1]).all() and torch.isnan(eager[1]).all()
    torch.testing.assert_close(got, eager, equal_nan=True)
    assert (got_safe[1] == 0).all()
    torch.testing.assert_close(got_safe, eager_safe)


def test_finite_fill_gives_uniform_rows_like_eager():
    x = torch.randn(2, 9, device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    fill = torch.finfo(torch.float32).min
    got = attnopt_softmax(x, mask=mask, fill=fill, impl="triton")
    torch.testing.assert_close(got, torch.full_like(x, 1 / 9))


def test_keep_mask_is_where_semantics():
    x = torch.randn(4, 10, device=DEVICE)
    keep = torch.rand(4, 10, device=DEVICE) > 0.3
    keep[:, 0] = True
    eager = torch.softmax(torch.where(keep, x, NEG_INF), -1)
    torch.testing.assert_close(attnopt_softmax(x, mask=keep, keep_mask=True, impl="triton"), eager)


def test_half_input_fp32_output():
    x = torch.randn(5, 33, device=DEVICE, dtype=torch.float16)
    got = attnopt_softmax(x, dtype=torch.float32, impl="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.softmax(x.float(), -1), rtol=1e-6, atol=1e-6)


def test_empty_and_zero_dim():
    assert attnopt_softmax(torch.randn(0, 4, device=DEVICE), impl="triton").shape == (0, 4)
    assert attnopt_softmax(torch.tensor(3.0), dim=0).item() == 1.0


def test_gradients_match_eager():
    x = torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 11, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 1, 11) > 0.8
    torch.autograd.gradcheck(
        lambda x, b: attnopt_softmax(x, scale=0.7, bias=b, mask=mask, impl="reference"),
        (x, bias))


def test_fake_impl_reports_dtype_and_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, dtype=torch.float16)
        y = attnopt_softmax(x, dtype=torch.float32)
    assert y.shape == (2, 8) and y.dtype == torch.float32


def test_triton_refused_on_cpu_without_interpreter(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CUDA present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attnopt_softmax(torch.randn(2, 3), impl="triton")


@pytest.mark.skipif(DEVICE != "cuda", reason="full-size rows only on a GPU")
@pytest.mark.parametrize("n", [4096, 8192, 32768, 100_003])
def test_long_rows_on_gpu(n):
    x = torch.randn(64, n, device="cuda", dtype=torch.float16) * 4
    got = attnopt_softmax(x, scale=1 / math.sqrt(n), impl="triton")
    torch.testing.assert_close(got.float(), torch.softmax(x.float() / math.sqrt(n), -1),
                               rtol=1e-2, atol=1e-3)
