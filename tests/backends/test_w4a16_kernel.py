"""The W4A16 Triton kernels (`backends/triton/w4a16.py`) against the int4 weight's float64
product. Without a GPU they run under TRITON_INTERPRET=1 with one small config per kernel
(BLOCK_M 16, BLOCK_N 32, BLOCK_K 32, two K chunks), so the shapes below reach every tail: K = 200
is not a multiple of any group size (padded to 224 or 256), N = 37 leaves a ragged column tile,
M = 70 a ragged row tile and a ragged last GROUP_M swizzle group, and groups of 64 and 128 take
several K tiles each."""

import math

import pytest
import torch

from attnopt.backends import int4, reference
from attnopt.backends.triton import w4a16 as kernel
from tests.conftest import DEVICE

# The kernels accumulate exactly-representable products in fp32 and round once to x's dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# A row count per path, inside the range the automatic dispatch gives that path on CPU.
M_OF = {"gemv": 3, "splitk": 17, "tiled": 70, "dequant": 5}
K, N = 200, 37


def weight(n=N, k=K, g=64, dtype=torch.float16, seed=0):
    """A random [n, k] weight (rows of unit norm, so outputs are O(1)) and its int4 packing."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(DEVICE)
    return w, int4.quantize_rtn(w, g, dtype=dtype)


def activations(m, k=K, dtype=torch.float16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(device=DEVICE, dtype=dtype)


def expected(x, p, bias=None):
    """x @ dequantize(W)ᵀ + bias in float64 (`reference.w4a16_linear` computes it in fp32)."""
    w = int4.dequantize(p.qweight, p.scales, p.zeros, p.group_size, x.shape[-1], torch.float64)
    out = x.double() @ w.T
    return out if bias is None else out + bias.double()


def check(x, p, bias=None, **kw):
    """Run the kernel, compare with the float64 product, and return the output."""
    got = kernel.w4a16_matmul(x, p.qweight, p.scales, p.zeros, p.group_size, bias, **kw)
    assert got.dtype == x.dtype and got.is_contiguous()
    assert got.shape == (x.shape[0], p.out_features)
    tol = TOL[x.dtype]
    torch.testing.assert_close(got.double(), expected(x, p, bias), rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path", kernel.PATHS)
def test_paths_dtypes_group_sizes(path, dtype, g):
    # K = 200 is padded to a multiple of g; bias in fp32 whatever x's dtype.
    _, p = weight(g=g, dtype=torch.float16 if dtype == torch.float32 else dtype)
    check(activations(M_OF[path], dtype=dtype), p, torch.randn(N, device=DEVICE), path=path)


@pytest.mark.parametrize("m", [1, 3, 16, 17, 70])
@pytest.mark.parametrize("has_bias", [False, True])
def test_automatic_dispatch(m, has_bias):
    # M picks the path (gemv up to 16 rows, splitk up to 64, tiled beyond; dequant only on CUDA
    # from DEQUANT_MIN_M), and the result is bit for bit that path's.
    path = kernel.choose_path(m, torch.device(DEVICE))
    assert path == ("gemv" if m <= 16 else "splitk" if m <= 64 else "tiled")
    _, p = weight(g=64, dtype=torch.bfloat16)
    x = activations(m, dtype=torch.bfloat16)
    bias = torch.randn(N, device=DEVICE, dtype=torch.bfloat16) if has_bias else None
    auto = check(x, p, bias)
    forced = kernel.w4a16_matmul(x, p.qweight, p.scales, p.zeros, 64, bias, path=path)
    assert torch.equal(auto, forced)


def test_dispatch_thresholds():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [kernel.choose_path(m, cuda) for m in (1, 16, 17, 64, 65, 1023, 1024)] == \
        ["gemv", "gemv", "splitk", "splitk", "tiled", "tiled", "dequant"]
    assert kernel.choose_path(4096, cpu) == "tiled"  # "dequant" by default only on CUDA


@pytest.mark.parametrize("path", kernel.PATHS)
@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_x(path, layout):
    _, p = weight(g=32)
    m = M_OF[path]
    # Every other column of a wider tensor, stride (2K, 2); or column-major, stride (1, M).
    x = activations(m, 2 * K)[:, ::2] if layout == "strided" else activations(K, m).T
    assert not x.is_contiguous()
    check(x, p, path=path)


@pytest.mark.parametrize("path", ["gemv", "splitk"])
@pytest.mark.parametrize("split_k", [1, 3, 100])
def test_split_counts(path, split_k):
    # 1: the first kernel writes the output itself; 3: chunks of 3, 3 and 1 groups of 32 (the
    # last one ragged: K = 200 ends 24 codes into it); 100 > 7 groups: one group per chunk.
    _, p = weight(g=32)
    check(activations(M_OF[path]), p, torch.randn(N, device=DEVICE), path=path, split_k=split_k)


@pytest.mark.parametrize("path", kernel.PATHS)
def test_one_row_one_column_block_and_k_equal_to_padding(path):
    # N = 1 and K = Kp = 128 (no padding): the other corners of the masks.
    _, p = weight(n=1, k=128, g=128)
    check(activations(M_OF[path], k=128), p, path=path)


@pytest.mark.parametrize(("x_dtype", "bias_dtype"),
                         [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32),
                          (torch.float16, torch.float16)])
@pytest.mark.parametrize("path", ["splitk", "dequant"])
def test_bias_dtypes(x_dtype, bias_dtype, path):
    _, p = weight(g=64, dtype=x_dtype)
    check(activations(M_OF[path], dtype=x_dtype), p,
          torch.randn(N, device=DEVICE, dtype=bias_dtype), path=path)


@pytest.mark.parametrize("path", kernel.PATHS)
def test_quantized_product_is_close_to_the_float_one(path):
    # The quantization itself is sane: round-to-nearest int4 in groups of 128 of a Gaussian
    # weight errs by ~10% (relative Frobenius) on the product.
    w, p = weight(g=128, dtype=torch.bfloat16)
    x = activations(M_OF[path], dtype=torch.bfloat16)
    got = kernel.w4a16_matmul(x, p.qweight, p.scales, p.zeros, 128, path=path).double()
    dense = x.double() @ w.double().T
    assert (got - dense).norm() / dense.norm() < 0.15


def test_empty_and_bad_arguments():
    _, p = weight(g=32)
    args = (p.qweight, p.scales, p.zeros, 32)
    assert kernel.w4a16_matmul(activations(0), *args).shape == (0, N)
    with pytest.raises(ValueError, match=r"gemv.*splitk.*tiled.*dequant"):
        kernel.w4a16_matmul(activations(3), *args, path="fast")
    with pytest.raises(ValueError, match="Kp=224"):
        kernel.w4a16_matmul(activations(3, k=256), *args)
    with pytest.raises(ValueError, match="group_size"):
        kernel.w4a16_matmul(activations(3), p.qweight, p.scales, p.zeros, 48)
    with pytest.raises(TypeError, match="int8"):
        kernel.w4a16_matmul(activations(3).to(torch.int8), *args)


def test_through_the_op_with_3d_x():
    # attnopt::w4a16_linear flattens x [B, S, K] to rows and restores the leading dims.
    _, p = weight(g=64, dtype=torch.bfloat16)
    x = activations(2 * 5, dtype=torch.bfloat16).view(2, 5, K)
    bias = torch.randn(N, device=DEVICE, dtype=torch.bfloat16)
    got = torch.ops.attnopt.w4a16_linear(x, p.qweight, p.scales, p.zeros, bias, 64, "triton")
    assert got.shape == (2, 5, N) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected(x.view(-1, K), p, bias).view(2, 5, N),
                               rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
    ref = reference.w4a16_linear(x, p.qweight, p.scales, p.zeros, bias, 64)
    torch.testing.assert_close(got, ref, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_autotune_spaces_fit_every_group_size(g, arch, dtype):
    # Checked here without a GPU: for each arch, group size, activation dtype and row bucket
    # the pruned CUDA search space is non-empty, its K tiles divide the group, fp32 keeps only
    # the small tiles, and its row tiles are no taller than the bucket (or than the shortest
    # that fits, e.g. "tiled" forced onto few rows). Whether they compile well is the compile
    # audit's job (test_gpu_audit.py).
    x = torch.empty(1, 1, dtype=dtype)
    for spaces in (kernel.GEMV_CONFIGS, kernel.SPLITK_CONFIGS, kernel.TILED_CONFIGS):
        configs = [c for c in spaces[arch] if c.kwargs["BLOCK_K"] <= g]
        if dtype == torch.float32:
            configs = [c for c in configs if kernel._fits_fp32(c)]
        shortest = min(c.kwargs["BLOCK_M"] for c in configs)
        for m_bucket in (1, 16, 64, 1024):
            kept = kernel.prune_configs(spaces[arch], {"group_size": g, "m_bucket": m_bucket,
                                                       "x": x})
            assert kept
            assert all(g % c.kwargs["BLOCK_K"] == 0 for c in kept)
            assert all(c.kwargs["BLOCK_M"] <= max(shortest, m_bucket) for c in kept)
            if dtype == torch.float32:
                assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in kept)


def test_cuda_split_heuristic():
    # Llama-3-8B down projection at decode on a 132-SM H100: 64 column tiles of 64 → 9 chunks
    # (4 programs per SM), each a whole number of groups; short K is never split below 256.
    assert kernel.default_splits(132, 64, 14336) == 9
    assert kernel.k_per_split(14336, 128, 9) % 128 == 0
    assert kernel.default_splits(132, 64, 300) == 1
    assert kernel.default_splits(132, 1000, 4096) == 1
    assert kernel.k_per_split(200, 64, 100) == 64  # more chunks than groups: one group each
