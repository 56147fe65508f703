"""The Triton attention kernels (prefill and split-KV decode) against `reference.attention` in
float64. Without a GPU they run under TRITON_INTERPRET=1, so shapes are tiny and block sizes are
forced small to reach every path: ragged tails, causal block skipping, several decode chunks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.backends import reference
from attnopt.backends.triton import attention as kernel
from tests.conftest import DEVICE

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)
# Lq <= 16 takes the decode path, longer queries the prefill kernel.
PATHS = {"prefill": 37, "decode": 5}


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def qkv(b, hq, hkv, lq, lk, d, dv=None, dtype=torch.float32):
    return randn(b, hq, lq, d, dtype=dtype), randn(b, hkv, lk, d, dtype=dtype), \
        randn(b, hkv, lk, dv or d, dtype=dtype)


def check(q, k, v, mask=None, is_causal=False, scale=None, **kw):
    """Run the kernel, compare with the float64 reference, and return the output."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    expected = reference.attention(q.double(), k.double(), v.double(), mask, is_causal, scale)
    got = kernel.attention(q, k, v, mask, is_causal, scale, **kw)
    assert got.dtype == q.dtype and got.is_contiguous()
    assert got.shape == (*q.shape[:3], v.shape[-1])
    tol = TOL[q.dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 64, 80, 128])
@pytest.mark.parametrize("is_causal", [False, True])
def test_prefill_dtypes_and_head_dims(dtype, d, is_causal):
    # 45 rows and keys: one full and one ragged 32-block each.
    check(*qkv(1, 2, 1, 45, 45, d, dtype=dtype), is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 80, 128])
def test_decode_dtypes_and_head_dims(dtype, d):
    check(*qkv(1, 4, 2, 3, 45, d, dtype=dtype), is_causal=True, decode_split=3, block_n=8)


@pytest.mark.parametrize(("lq", "lk", "block_m", "block_n"),
                         [(20, 70, 16, 16), (17, 100, 16, 32), (33, 40, 32, 16)])
def test_causal_chunked_prefill(lq, lk, block_m, block_n):
    # Bottom-right causal with Lq < Lk: the chunk of queries sees the whole past; the later
    # key blocks of early query blocks are skipped.
    check(*qkv(1, 2, 2, lq, lk, 64), is_causal=True, block_m=block_m, block_n=block_n)


def test_value_head_dim_differs_and_explicit_scale():
    check(*qkv(2, 2, 1, 30, 41, 96, dv=48), scale=0.3, block_m=16, block_n=16)
    check(*qkv(2, 2, 1, 4, 41, 112, dv=32), scale=0.3, decode_split=2, block_n=16)


def make_mask(kind, b, hq, lq, lk, dtype):
    if kind == "bool [B,1,1,Lk]":
        mask = torch.rand(b, 1, 1, lk, device=DEVICE) > 0.3
        mask[..., 0] = True
    elif kind == "bool [B,1,Lq,Lk]":
        mask = torch.rand(b, 1, lq, lk, device=DEVICE) > 0.3
    else:  # additive, per head, with some -inf entries
        mask = randn(b, hq, lq, lk)
        mask[torch.rand(b, hq, lq, lk, device=DEVICE) > 0.8] = -math.inf
        mask = mask.to(dtype)
    return mask


@pytest.mark.parametrize("kind", ["bool [B,1,1,Lk]", "bool [B,1,Lq,Lk]", "float [B,Hq,Lq,Lk]"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("is_causal", [False, True])
def test_masks(kind, path, is_causal):
    lq, lk = PATHS[path], 50
    dtype = torch.float16 if kind.startswith("float") else torch.float32
    q, k, v = qkv(2, 4, 2, lq, lk, 32, dtype=dtype)
    mask = make_mask(kind, 2, 4, lq, lk, dtype)
    check(q, k, v, mask, is_causal, block_m=16, block_n=16, decode_split=3)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("float_mask", [False, True])
def test_fully_masked_rows_give_zero(path, float_mask):
    lq, lk = PATHS[path], 40
    q, k, v = qkv(1, 2, 1, lq, lk, 64)
    keep = torch.rand(1, 2, lq, lk, device=DEVICE) > 0.5
    keep[:, 0, 1] = False  # head 0, query row 1: nothing to attend
    keep[:, 1, 2, :20] = False  # head 1, row 2: the first chunks/blocks see only masked keys
    keep[:, 1, 2, 20:] = True
    mask = keep if not float_mask else torch.zeros(keep.shape, device=DEVICE).masked_fill(
        ~keep, -math.inf)
    got = check(q, k, v, mask, block_m=16, block_n=8, decode_split=4)
    assert not got.isnan().any()
    assert (got[0, 0, 1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", list(PATHS))
def test_rows_masked_everywhere_by_a_finite_fill_average_v(path, dtype):
    # transformers' padding masks fill with finfo(dtype).min, a finite value: a query row whose
    # every key is so masked (a fully padded row) averages V over those keys in eager, all its
    # scores being the same -3.4e38. A row masked only in its first chunks/blocks still sees the
    # rest, and a row masked everywhere but at -inf gives 0. The decode path merges 4 chunks:
    # they must weigh by their key counts (10 each here, 9 and 10 with the ragged tail).
    lq, lk = PATHS[path], 39
    q, k, v = qkv(2, 2, 1, lq, lk, 32, dtype=dtype)
    mask = torch.zeros(2, 2, lq, lk, device=DEVICE, dtype=dtype)
    mask[0] = torch.finfo(dtype).min  # sequence 0: every row masked everywhere
    mask[1, 0, :, :20] = torch.finfo(dtype).min  # head 0: the first keys only
    mask[1, 1, 1] = -math.inf  # head 1, row 1: nothing to attend at all
    got = check(q, k, v, mask, block_m=16, block_n=8, decode_split=4)
    if dtype != torch.float16:  # fp16's min (-65504) does not swamp fp32 scores: no uniform
        uniform = v.double().mean(2, keepdim=True).expand(2, 2, lq, -1)
        torch.testing.assert_close(got[0].double(), uniform[0], rtol=TOL[dtype],
                                   atol=TOL[dtype])
    assert (got[1, 1, 1] == 0).all()


@pytest.mark.parametrize("path", list(PATHS))
def test_causal_with_more_queries_than_keys(path):
    # Bottom-right: query i sees keys j <= i + Lk - Lq, so the first Lq - Lk rows see nothing.
    lq = PATHS[path]
    got = check(*qkv(1, 2, 1, lq, lq - 3, 32), is_causal=True, block_m=16, block_n=16)
    assert (got[:, :, :3] == 0).all()


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("path", list(PATHS))
def test_gqa_and_mqa(hq, hkv, path):
    check(*qkv(2, hq, hkv, PATHS[path], 29, 32), is_causal=True, block_m=16, block_n=16,
          decode_split=2)


@pytest.mark.parametrize("lq", [1, 2, 7, 16])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_query_lengths_and_splits(lq, splits):
    # Keys 0..9 masked for every row: with 8 chunks of 5 keys the first two see only masked keys.
    q, k, v = qkv(1, 4, 2, lq, 40, 64)
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool, device=DEVICE)
    mask[..., :10] = False
    check(q, k, v, mask, is_causal=True, decode_split=splits, block_n=8)


def test_decode_more_splits_than_keys_and_several_row_blocks():
    # MQA with 8 heads x 5 rows = 40 rows per KV head: three 16-row blocks; 12 chunks of 1 key
    # for 10 keys leave two chunks empty.
    check(*qkv(1, 8, 1, 5, 10, 32), decode_split=12, block_m=16, block_n=16)


@pytest.mark.parametrize("path", list(PATHS))
def test_non_contiguous_inputs(path):
    # The layout projections produce: [B, L, H, D] transposed to [B, H, L, D].
    lq = PATHS[path]
    q = randn(2, lq, 4, 64).transpose(1, 2)
    k = randn(2, 33, 2, 64).transpose(1, 2)
    v = randn(2, 2, 64, 33).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check(q, k, v, is_causal=True, block_m=16, block_n=16, decode_split=2)


@st.composite
def cases(draw):
    hkv = draw(st.integers(1, 2))
    return dict(
        b=draw(st.integers(1, 2)), hkv=hkv, hq=hkv * draw(st.sampled_from([1, 2, 4])),
        lq=draw(st.integers(1, 40)), lk=draw(st.integers(1, 70)),
        d=draw(st.sampled_from([32, 48, 64, 80, 96])), dv=draw(st.sampled_from([None, 32])),
        dtype=draw(st.sampled_from(DTYPES)), is_causal=draw(st.booleans()),
        mask=draw(st.sampled_from([None, "bool [B,1,Lq,Lk]", "float [B,Hq,Lq,Lk]"])),
        block=draw(st.sampled_from([None, 16])), splits=draw(st.sampled_from([None, 1, 3, 5])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=15, deadline=None)
@given(cases())
def test_random_shapes(c):
    torch.manual_seed(c["seed"])
    q, k, v = qkv(c["b"], c["hq"], c["hkv"], c["lq"], c["lk"], c["d"], c["dv"], c["dtype"])
    mask = c["mask"] and make_mask(c["mask"], c["b"], c["hq"], c["lq"], c["lk"], c["dtype"])
    check(q, k, v, mask, c["is_causal"], block_m=c["block"], block_n=c["block"],
          decode_split=c["splits"])


@pytest.mark.skipif(DEVICE != "cuda", reason="full sizes need a GPU")
@pytest.mark.parametrize(("hq", "hkv", "lq", "lk"), [(16, 16, 2048, 2048), (32, 8, 1, 4096)])
def test_full_size_on_gpu(hq, hkv, lq, lk):
    check(*qkv(2, hq, hkv, lq, lk, 128, dtype=torch.float16), is_causal=True)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_attention_with_past_attends_over_the_concatenation(impl):
    """attention_with_past's paths (attention's, after the concatenation) against its reference;
    opcheck runs the fake implementation against the real one."""
    q, k, v = qkv(2, 4, 2, 3, 3, 16)
    _, past_k, past_v = qkv(2, 4, 2, 3, 5, 16)
    mask = make_mask("bool [B,1,Lq,Lk]", 2, 4, 3, 8, torch.float32)
    args = (q, k, v, past_k, past_v, mask, True, 0.25)
    got = torch.ops.attnopt.attention_with_past(*args, impl=impl)
    want = reference.attention_with_past(*args)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=TOL[torch.float32], atol=TOL[torch.float32])
    torch.library.opcheck(torch.ops.attnopt.attention_with_past.default, args)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", reference.OUT_LAYOUTS)
def test_output_written_in_the_layout_asked(path, layout):
    # "blhd": the output is a transposed view of a contiguous [B, Lq, Hq, Dv], which the
    # heads-merging reshape after attention reads without a copy.
    q, k, v = qkv(2, 4, 2, PATHS[path], 45, 32, 48)
    got = kernel.attention(q, k, v, None, True, 32 ** -0.5, layout=layout, block_m=16,
                           block_n=16, decode_split=3)
    expected = reference.attention(q.double(), k.double(), v.double(), None, True, 32 ** -0.5)
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=2e-5)
    assert got.stride() == reference.new_attention_out(q, 48, layout).stride()
    assert (layout == "blhd") == got.transpose(1, 2).is_contiguous()


def test_unknown_layout_is_refused():
    q, k, v = qkv(1, 2, 2, 5, 9, 16)
    with pytest.raises(ValueError, match="layout must be one of"):
        kernel.attention(q, k, v, None, False, 0.25, layout="bhdl")


# --- the prefill pruner (what the compile audit checks compiles, decided per call) -------------

GPUS = {"sm80": ((8, 0), 163 * 1024), "sm90": ((9, 0), 227 * 1024)}


def pruned(monkeypatch, arch, d, dtype=torch.bfloat16, mask=None, biases=0, lq=2048):
    capability, smem = GPUS[arch]
    monkeypatch.setattr(kernel.tuning, "device_info",
                        lambda device: kernel.tuning.DeviceInfo("gpu", capability, 100, smem))
    q = torch.empty(1, dtype=dtype, device="meta")
    args = dict(q=q, mask=q if mask is None else torch.empty(1, dtype=mask, device="meta"),
                HAS_MASK=mask is not None, biases=(q,) * max(1, biases), NUM_BIASES=biases,
                bias_bytes=biases * q.element_size(),
                BLOCK_D=d, BLOCK_DV=d, lq_bucket=kernel.tuning.bucket(lq))
    kept = kernel.prune_prefill(kernel.PREFILL_CONFIGS[arch], args)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept]


@pytest.mark.parametrize("arch", GPUS)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("mask", "biases"), [(None, 0), (torch.bool, 0), (torch.float32, 1)])
def test_pruner_keeps_a_config_within_the_estimates(monkeypatch, arch, d, dtype, mask, biases):
    kept = pruned(monkeypatch, arch, d, dtype, mask, biases)
    assert kept and set(kept) <= {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
                                  for c in kernel.PREFILL_CONFIGS[arch]}


def test_pruner_keeps_large_tiles_where_they_fit_and_drops_them_where_not(monkeypatch):
    # A 16-bit, unmasked prompt keeps a 128-row tile at head dims 64 and 128 on both arches,
    # and 128x128 on H100 only; head dim 256 keeps 64x64 (8 warps), never 128 rows.
    for d in (64, 128):
        assert (128, 64, 8) in pruned(monkeypatch, "sm80", d)
        assert (128, 128, 8) in pruned(monkeypatch, "sm90", d)
    assert max(pruned(monkeypatch, "sm80", 256)) == (64, 64, 8)
    assert max(pruned(monkeypatch, "sm90", 256)) == (64, 64, 8)
    # An additive mask's tiles take registers and shared memory: no 128x128 on H100, no
    # 128-row tile at head dim 128 on A100.
    assert (128, 128, 8) not in pruned(monkeypatch, "sm90", 128, mask=torch.bfloat16)
    assert max(pruned(monkeypatch, "sm80", 128, mask=torch.bfloat16))[0] == 64


def test_pruner_fits_the_row_tile_to_a_short_prompt(monkeypatch):
    assert {m for m, _, _ in pruned(monkeypatch, "sm90", 128, lq=40)} == {64}


@pytest.mark.parametrize(("interpreting", "precision", "dtype", "mode"), [
    (True, "tf32", torch.bfloat16, "upcast"),  # numpy has no bf16: the interpreter upcasts
    (True, "tf32", torch.float32, "ieee"),
    (False, "tf32", torch.float32, "tf32"),  # fp32 on TF32 tensor cores only when allowed
    (False, "ieee", torch.float32, "ieee"),
    (False, "tf32", torch.bfloat16, "ieee"),  # 16-bit products are tensor-core ones anyway
])
def test_dot_mode_follows_pytorchs_matmul_precision(monkeypatch, interpreting, precision, dtype,
                                                    mode):
    from attnopt.backends.triton import attention_tiles

    monkeypatch.setattr(attention_tiles, "interpreting", lambda: interpreting)
    before = torch.backends.cuda.matmul.fp32_precision  # a property: set and restored by hand
    torch.backends.cuda.matmul.fp32_precision = precision
    try:
        assert attention_tiles.dot_mode(dtype) == mode
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
