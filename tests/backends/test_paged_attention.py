"""attnopt::paged_attention — the split-KV Triton kernel over a block table and the CPU path —
against `reference.paged_attention` in float64. Block tables are random permutations of the
pool's blocks (non-contiguous, shuffled), their entries past each sequence's end hold an
out-of-range id that must never be read, and lengths are ragged: 1, multiples of the block size,
one past a multiple. Without a GPU the kernel runs under TRITON_INTERPRET=1, so shapes are tiny
and chunks short, to reach several chunks per sequence."""

import pytest
import torch

from attnopt.backends import ops, reference
from attnopt.backends.triton import paged_attention as kernel
from attnopt.cache import quantize_int8
from tests.conftest import DEVICE

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
UNUSED = 1 << 30  # table entries past a sequence's end: reading one would fault


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def paged(lens, hq=4, hkv=2, lq=2, d=64, dv=None, block_size=8, dtype=torch.float32,
          int8=False, spare_blocks=3):
    """q and a paged cache holding sequences of `lens` tokens in shuffled blocks: a dict of the
    op's tensor arguments."""
    nb = [-(-n // block_size) for n in lens]
    num_blocks = sum(nb) + spare_blocks
    width = max(nb) + 1
    q = torch.randn(len(lens), hq, lq, d, device=DEVICE).to(dtype)
    k = torch.randn(num_blocks, block_size, hkv, d, device=DEVICE)
    v = torch.randn(num_blocks, block_size, hkv, dv or d, device=DEVICE)
    table = torch.full((len(lens), width), UNUSED, dtype=torch.int32)
    ids = torch.randperm(num_blocks)
    for b, n in enumerate(nb):
        table[b, :n], ids = ids[:n], ids[n:]
    args = dict(q=q, block_table=table.to(DEVICE),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE))
    if int8:
        (args["k_pool"], args["k_scale"]), (args["v_pool"], args["v_scale"]) = \
            quantize_int8(k), quantize_int8(v)
    else:
        args["k_pool"], args["v_pool"] = k.to(dtype), v.to(dtype)
    return args


def expected(args, is_causal):
    a = dict(args, q=args["q"].double())
    if a["k_pool"].dtype != torch.int8:
        a["k_pool"], a["v_pool"] = a["k_pool"].double(), a["v_pool"].double()
    return reference.paged_attention(scale=0.3, is_causal=is_causal, **a)


def check(args, is_causal=True, cpu=True, **kw):
    """The kernel (and the CPU path) against the float64 reference; returns the kernel's
    output."""
    want = expected(args, is_causal)
    q = args["q"]
    tol = TOL[q.dtype]
    got = kernel.paged_attention(scale=0.3, is_causal=is_causal, **args, **kw)
    assert got.dtype == q.dtype and got.is_contiguous() and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if cpu:
        torch.testing.assert_close(ops.paged_attention(scale=0.3, is_causal=is_causal,
                                                       **args).double(),
                                   want, rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("d", [64, 80, 128])
def test_dtypes_and_head_dims(dtype, d):
    # 1 token; exactly two blocks; two blocks and one token. Four 16-key chunks per sequence.
    check(paged([1, 16, 17], d=d, dtype=dtype), split_len=16, block_n=16)


@pytest.mark.parametrize(("hq", "hkv", "lq"), [(2, 2, 1), (4, 2, 2), (8, 2, 3), (4, 1, 4),
                                               (8, 1, 4)])
def test_gqa_mqa_and_query_lengths(hq, hkv, lq):
    # (8, 1, 4): MQA with 32 (head, row) pairs per KV head, two 16-row blocks.
    check(paged([5, 24, 13], hq=hq, hkv=hkv, lq=lq, d=32), block_m=16, split_len=16,
          block_n=16)


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_block_sizes_and_causality(block_size, is_causal):
    # Tiles of 16 keys span 16 blocks of 1, parts of blocks of 5 (not a power of two), or one
    # block of 16.
    check(paged([3, 2 * block_size, 40], lq=3, d=32, block_size=block_size),
          is_causal=is_causal, split_len=16, block_n=16)


def test_fewer_keys_than_queries_and_empty_sequences():
    # Bottom-right causal: with 2 keys and 4 queries, rows 0 and 1 see nothing and give 0; a
    # sequence of length 0 gives 0 everywhere (non-causal too).
    args = paged([2, 0, 9], lq=4, d=32)
    got = check(args, block_n=16)
    assert (got[0, :, :2] == 0).all() and (got[1] == 0).all()
    assert (check(args, is_causal=False, block_n=16)[1] == 0).all()


def test_many_chunks_merge_in_several_tiles():
    # 300 keys in 16-key chunks: 19 chunks, more than the merge's 16 per tile.
    check(paged([300, 7], hq=2, hkv=1, lq=1, d=32, block_size=16), split_len=16, block_n=16,
          cpu=False)


@pytest.mark.parametrize("dtype", list(TOL))
def test_int8_pools(dtype):
    # K/V dequantized in registers: agrees with the reference of the dequantized pools to the
    # usual tolerance of q's dtype.
    check(paged([1, 16, 21], hq=4, hkv=2, lq=2, d=64, dtype=dtype, int8=True), split_len=16,
          block_n=16)


def test_int8_close_to_the_unquantized_cache():
    # The quantization error itself: per (token, head) scales keep the output within 2% of
    # the fp32 result (max error / max |output|; about 1% observed) for Gaussian K/V.
    args = paged([30, 12], d=64)
    quant = dict(args)
    (quant["k_pool"], quant["k_scale"]), (quant["v_pool"], quant["v_scale"]) = \
        quantize_int8(args["k_pool"]), quantize_int8(args["v_pool"])
    full = ops.paged_attention(scale=0.3, **args)
    err = (ops.paged_attention(scale=0.3, **quant) - full).abs().max() / full.abs().max()
    assert err < 0.02


def test_strided_q_and_head_major_pool_and_value_dim():
    # q as the projections lay it out ([B, L, H, D] transposed); pools stored head-major
    # [blocks, Hkv, block_size, D] and read through a transposed view; Dv != D.
    args = paged([6, 19], lq=3, d=48, dv=32)
    args["q"] = args["q"].transpose(1, 2).contiguous().transpose(1, 2)
    for name in ("k_pool", "v_pool"):
        args[name] = args[name].transpose(1, 2).contiguous().transpose(1, 2)
        assert not args[name].is_contiguous()
    check(args, split_len=16, block_n=16)


def test_op_dispatch_and_fake():
    args = paged([3, 11], d=32)
    want = expected(args, True)
    for impl in ("reference", "auto", "triton"):
        got = torch.ops.attnopt.paged_attention(scale=0.3, impl=impl, **args)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in args.items()}
        out = torch.ops.attnopt.paged_attention(scale=0.3, **fake)
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    # Schema, fake implementation and tracing, on the CPU path, int8 pools too.
    quant = paged([3, 11], d=32, int8=True)
    for a in (args, quant):
        positional = [a[k] for k in ("q", "k_pool", "v_pool", "block_table", "seq_lens")]
        scales = {k: a[k] for k in ("k_scale", "v_scale") if k in a}
        torch.library.opcheck(torch.ops.attnopt.paged_attention.default, (*positional, 0.3),
                              scales)


def test_bad_arguments_are_refused():
    args = paged([3], d=32)
    with pytest.raises(ValueError, match="int8"):
        ops.paged_attention(scale=0.3, **dict(args, k_pool=args["k_pool"].to(torch.int8)))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        ops.paged_attention(scale=0.3, **dict(args, q=args["q"][:, :3]))
    with pytest.raises(ValueError, match="seq_lens"):
        ops.paged_attention(scale=0.3, **dict(args, seq_lens=args["seq_lens"].float()))


@pytest.mark.skipif(DEVICE != "cuda", reason="full sizes need a GPU")
@pytest.mark.parametrize("int8", [False, True])
def test_full_size_on_gpu(int8):
    check(paged([1, 1000, 4096, 2049], hq=32, hkv=8, lq=1, d=128, block_size=16,
                dtype=torch.float16, int8=int8))
