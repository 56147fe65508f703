"""attnopt::paged_attention — the split-KV Triton kernel over a block table and the CPU path —
against `reference.paged_attention` in float64. Block tables are random permutations of the
pool's blocks (non-contiguous, shuffled), their entries past each sequence's end hold an
out-of-range id that must never be read, and lengths are ragged: 1, multiples of the block size,
one past a multiple. Without a GPU the kernel runs under TRITON_INTERPRET=1, so shapes are tiny
and chunks short, to reach several chunks per sequence. Masks are the model's own, one column
per slot of the block table: left padding, sliding windows, random per-head masks."""

import math

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


def capacity(args):
    return args["block_table"].shape[1] * args["k_pool"].shape[1]


def query_positions(args):
    """[B, 1, Lq, 1]: query i of sequence b is its token seq_lens[b] - Lq + i."""
    lq = args["q"].shape[2]
    return (args["seq_lens"].long()[:, None] - lq + torch.arange(lq, device=DEVICE))[
        :, None, :, None]


def masked(args, keep, fill=None):
    """args with the mask `keep` (True = attend, broadcasting to [B, Hq, Lq, capacity]): as
    is, or given `fill`, additive in q's dtype (0 where kept, `fill` elsewhere; "min" stands
    for the dtype's finfo.min, the fill transformers uses)."""
    if fill is not None:
        dtype = args["q"].dtype
        keep = torch.zeros(keep.shape, dtype=dtype, device=DEVICE).masked_fill(
            ~keep, torch.finfo(dtype).min if fill == "min" else fill)
    return dict(args, mask=keep)


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


FILLS = {"bool": None, "-inf": -math.inf, "finfo.min": "min"}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("fill", FILLS.values(), ids=FILLS.keys())
@pytest.mark.parametrize("lq", [1, 3])
def test_left_padding(dtype, fill, lq):
    # Batched generation from left-padded prompts: the first pad[b] cached tokens of sequence b
    # are padding, masked for every head and query ([B, 1, 1, capacity]); the rows still see a
    # key, so a finfo.min fill gives what -inf gives. Pads reach past a chunk of 16 keys.
    args = paged([5, 16, 17, 40], lq=lq, d=32, dtype=dtype)
    pad = torch.tensor([2, 0, 9, 21], device=DEVICE)[:, None, None, None]
    keep = torch.arange(capacity(args), device=DEVICE) >= pad
    check(masked(args, keep, fill), split_len=16, block_n=16)


@pytest.mark.parametrize("fill", FILLS.values(), ids=FILLS.keys())
@pytest.mark.parametrize("lq", [1, 3])
def test_sliding_window(fill, lq):
    # Query at position t sees keys t - 4 < j <= t ([B, 1, Lq, capacity], causal on top): the
    # earlier chunks hold no key of the window, so each row merges -inf chunks with real ones.
    args = paged([1, 9, 20, 33], lq=lq, d=32)
    keep = torch.arange(capacity(args), device=DEVICE) > query_positions(args) - 4
    check(masked(args, keep, fill), split_len=16, block_n=16)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 1), (1, 4, 1), (3, 1, 3), (3, 4, 3)],
                         ids=str)
def test_mask_broadcasts(shape):
    # A random bool mask and a random additive one (scores shifted by N(0, 1), 20% -inf),
    # broadcast over what is 1 in [B, Hq, Lq]; non-causal, so every key of a row is a candidate.
    args = paged([7, 16, 30], lq=3, d=32)
    size = (*shape, capacity(args))
    check(masked(args, torch.rand(size, device=DEVICE) < 0.6), is_causal=False, split_len=16,
          block_n=16)
    bias = torch.randn(size, device=DEVICE).masked_fill(torch.rand(size, device=DEVICE) < 0.2,
                                                        -math.inf)
    check(dict(args, mask=bias), is_causal=False, split_len=16, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fill", FILLS.values(), ids=FILLS.keys())
def test_int8_pools_with_a_mask(dtype, fill):
    # Per-head masks over dequantized K/V; the newest key stays visible for every row.
    args = paged([4, 16, 25], lq=2, d=32, dtype=dtype, int8=True)
    cols = torch.arange(capacity(args), device=DEVICE)
    keep = (torch.rand(3, 4, 1, capacity(args), device=DEVICE) < 0.5) | (
        cols == query_positions(args))
    check(masked(args, keep, fill), split_len=16, block_n=16)


@pytest.mark.parametrize("fill", [None, -math.inf], ids=["bool", "-inf"])
def test_rows_masked_everywhere_give_zero(fill):
    # Query row 0 of sequence 0 and every row of head 1 of sequence 2 keep no key: they give 0,
    # not NaN, in the kernel (each of their chunks stores l = 0) and on the CPU path.
    args = paged([6, 20, 35], lq=2, d=32)
    keep = torch.ones(3, 4, 2, capacity(args), dtype=torch.bool, device=DEVICE)
    keep[0, :, 0] = False
    keep[2, 1] = False
    args = masked(args, keep, fill)
    got = check(args, split_len=16, block_n=16)
    cpu = ops.paged_attention(scale=0.3, **args)
    for out in (got, cpu):
        assert (out[0, :, 0] == 0).all() and (out[2, 1] == 0).all()
        assert out[0, :, 1].abs().amax() > 0 and out[2, 0].abs().amax() > 0


def test_finfo_min_everywhere_averages_v_as_eager():
    # A row whose every key is masked by finfo(float32).min (transformers' padding mask, a
    # fully padded query row) averages V over its keys in eager, every score being -3.4e38;
    # the kernel keeps additive-mask scores in natural units so that it does too, across
    # chunks (split_len 16 over 20 keys: the chunks weigh by their key counts).
    args = paged([6, 20], lq=1, d=32)
    keep = torch.ones(2, 4, 1, capacity(args), dtype=torch.bool, device=DEVICE)
    keep[1, 2] = False
    args = masked(args, keep, "min")
    got = kernel.paged_attention(scale=0.3, split_len=16, block_n=16, **args)
    torch.testing.assert_close(got.double(), expected(args, True), rtol=2e-5, atol=2e-5)


def test_op_dispatch_and_fake():
    args = paged([3, 11], d=32)
    keep = torch.rand(2, 1, 2, capacity(args), device=DEVICE) < 0.7
    with_masks = (args, masked(args, keep), masked(args, keep, -math.inf))
    for a in with_masks:
        want = expected(a, True)
        for impl in ("reference", "auto", "triton"):
            got = torch.ops.attnopt.paged_attention(scale=0.3, impl=impl, **a)
            torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
        with torch._subclasses.FakeTensorMode() as mode:
            fake = {k: mode.from_tensor(v) for k, v in a.items()}
            out = torch.ops.attnopt.paged_attention(scale=0.3, **fake)
        assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    # Schema, fake implementation and tracing, on the CPU path, int8 pools and masks too.
    quant = paged([3, 11], d=32, int8=True)
    for a in (*with_masks, quant, masked(quant, keep, -math.inf)):
        positional = [a[k] for k in ("q", "k_pool", "v_pool", "block_table", "seq_lens")]
        optional = {k: a[k] for k in ("k_scale", "v_scale", "mask") if k in a}
        torch.library.opcheck(torch.ops.attnopt.paged_attention.default, (*positional, 0.3),
                              optional)


def test_bad_arguments_are_refused():
    args = paged([3], d=32)
    with pytest.raises(ValueError, match="int8"):
        ops.paged_attention(scale=0.3, **dict(args, k_pool=args["k_pool"].to(torch.int8)))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        ops.paged_attention(scale=0.3, **dict(args, q=args["q"][:, :3]))
    with pytest.raises(ValueError, match="seq_lens"):
        ops.paged_attention(scale=0.3, **dict(args, seq_lens=args["seq_lens"].float()))
    # The mask's last dim is the table's capacity (16 here), not the sequence's length (3).
    keep = torch.ones(1, 1, 1, capacity(args), dtype=torch.bool, device=DEVICE)
    for bad in (keep[..., :3], keep[..., :-1]):
        with pytest.raises(ValueError, match=r"capacity, not the longest sequence\), got "
                                             rf"\(1, 1, 1, {bad.shape[-1]}\)"):
            ops.paged_attention(scale=0.3, **masked(args, bad))
    for bad in (keep[0], keep.expand(2, 1, 1, -1), keep.expand(1, 3, 1, -1), keep.int()):
        with pytest.raises(ValueError, match="mask must"):
            kernel.paged_attention(scale=0.3, **masked(args, bad))


@pytest.mark.skipif(DEVICE != "cuda", reason="full sizes need a GPU")
@pytest.mark.parametrize("int8", [False, True])
def test_full_size_on_gpu(int8):
    check(paged([1, 1000, 4096, 2049], hq=32, hkv=8, lq=1, d=128, block_size=16,
                dtype=torch.float16, int8=int8))


@pytest.mark.parametrize("lq", [1, 3])
def test_output_in_the_heads_last_layout(lq):
    # layout="blhd": a transposed view of a contiguous [B, Lq, Hq, Dv], as the graph reads it.
    args = paged([50, 17], lq=lq)
    got = kernel.paged_attention(scale=0.3, is_causal=True, **args, layout="blhd",
                                 split_len=16, block_n=16)
    assert got.transpose(1, 2).is_contiguous()
    want = expected(args, True)
    torch.testing.assert_close(got.double(), want, rtol=TOL[got.dtype], atol=TOL[got.dtype])
