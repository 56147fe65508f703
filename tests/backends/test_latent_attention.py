"""attnopt::latent_attention and paged_latent_attention — DeepSeek's MLA decoded from its latent.

First the math: the absorbed form (q_nope · W_UK as a latent query, attention over the latent
that is its own value, then · W_UVᵀ) equals the expanded form (every head's K and V made from
the latent through kv_b_proj, then `reference.attention`) in float64 to 1e-12, with every mask
the attention op knows, rows that see no key included. Then the kernels: the split-KV Triton
kernel (under TRITON_INTERPRET=1 without a GPU, so shapes are tiny and chunks short) and the CPU
path against the float64 reference, in fp32/fp16/bf16, 16 and 128 query heads, ragged lengths
over shuffled blocks whose unused table entries would fault if read, int8 pools, masks."""

import math

import pytest
import torch

from attnopt.backends import ops, reference
from attnopt.backends.triton import latent_attention as kernel
from attnopt.cache import quantize_int8
from tests.conftest import DEVICE

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
UNUSED = 1 << 30  # table entries past a sequence's end: reading one would fault
RANK, ROPE, NOPE, VALUE = 32, 8, 16, 12
SCALE = 0.3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- the absorbed form is MLA -------------------------------------------------------------------


def expanded(q, c, k_rot, weight, mask, is_causal):
    """transformers' DeepSeek attention: K = [c · W_UKᵀ | k_rot] and V = c · W_UVᵀ per head
    (kv_b_proj over every token, split head-major), then plain attention."""
    b, heads, _, _ = q.shape
    kv = (c[:, 0] @ weight.T).view(b, -1, heads, NOPE + VALUE).transpose(1, 2)
    k = torch.cat((kv[..., :NOPE], k_rot.expand(-1, heads, -1, -1)), -1)
    return reference.attention(q, k, kv[..., NOPE:], mask, is_causal, SCALE)


def absorbed(q, c, k_rot, weight, mask, is_causal):
    """What the mla pass emits: W_UK folded into the query, W_UV applied after attention."""
    w = weight.view(q.shape[1], NOPE + VALUE, RANK)
    q_lat = q[..., :NOPE] @ w[:, :NOPE]
    out = reference.latent_attention(q_lat, q[..., NOPE:], c, k_rot, mask, is_causal, SCALE)
    return out @ w[:, NOPE:].transpose(1, 2)


def masks(b, heads, lq, lk):
    """The masks attention takes, each with a row that sees no key or a row masked
    everywhere where that is what it tests."""
    pad = torch.arange(lk) >= torch.tensor([0, 3])[:b, None]  # left padding of 3 on row 1
    pad = pad[:, None, None].expand(b, 1, lq, lk)
    blind = pad.clone()
    blind[0, 0, 0] = False  # query 0 of sequence 0 sees no key
    additive = torch.zeros(b, 1, lq, lk, dtype=torch.float64).masked_fill(
        ~pad, torch.finfo(torch.float64).min)
    finite_everywhere = additive.clone()
    finite_everywhere[0, 0, 0] = torch.finfo(torch.float64).min  # averages V, as eager does
    per_head = torch.rand(b, heads, lq, lk) > 0.4
    return {"none": (None, False), "causal": (None, True), "padding": (pad, False),
            "padding+causal": (pad, True), "blind row": (blind, False),
            "additive": (additive, True), "finite fill everywhere": (finite_everywhere, False),
            "minus inf": (additive.masked_fill(~pad, -math.inf), False),
            "per head": (per_head, False)}


@pytest.mark.parametrize("kind", list(masks(2, 4, 3, 9)))
@pytest.mark.parametrize(("heads", "lq"), [(4, 1), (16, 3)])
def test_absorbed_form_is_the_expanded_form(kind, heads, lq):
    b, lk = 2, 9
    mask, is_causal = masks(b, heads, lq, lk)[kind]
    q = torch.randn(b, heads, lq, NOPE + ROPE, dtype=torch.float64)
    c = torch.randn(b, 1, lk, RANK, dtype=torch.float64)
    k_rot = torch.randn(b, 1, lk, ROPE, dtype=torch.float64)
    weight = torch.randn(heads * (NOPE + VALUE), RANK, dtype=torch.float64) / RANK**0.5
    want = expanded(q, c, k_rot, weight, mask, is_causal)
    got = absorbed(q, c, k_rot, weight, mask, is_causal)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if kind == "blind row":
        assert got[0, :, 0].abs().max() == 0  # a row that sees no key gives 0 in both forms


# --- the kernels --------------------------------------------------------------------------------


def paged(lens, heads=16, lq=1, rank=RANK, rope=ROPE, block_size=8, dtype=torch.float32,
          int8=False, spare_blocks=3):
    """Queries and a paged latent cache holding sequences of `lens` tokens in shuffled blocks:
    the op's tensor arguments."""
    nb = [-(-n // block_size) for n in lens]
    num_blocks = sum(nb) + spare_blocks
    table = torch.full((len(lens), max(nb) + 1), UNUSED, dtype=torch.int32)
    ids = torch.randperm(num_blocks)
    for b, n in enumerate(nb):
        table[b, :n], ids = ids[:n], ids[n:]
    c = torch.randn(num_blocks, block_size, 1, rank, device=DEVICE)
    k_rot = torch.randn(num_blocks, block_size, 1, rope, device=DEVICE)
    args = dict(q_lat=torch.randn(len(lens), heads, lq, rank, device=DEVICE).to(dtype),
                q_rot=torch.randn(len(lens), heads, lq, rope, device=DEVICE).to(dtype),
                block_table=table.to(DEVICE),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE))
    if int8:
        (args["ckv_pool"], args["ckv_scale"]), (args["krot_pool"], args["krot_scale"]) = \
            quantize_int8(c), quantize_int8(k_rot)
    else:
        args["ckv_pool"], args["krot_pool"] = c.to(dtype), k_rot.to(dtype)
    return args


def expected(args, is_causal):
    a = {k: v.double() if v.is_floating_point() and not k.endswith("scale") else v
         for k, v in args.items()}
    return reference.paged_latent_attention(scale=SCALE, is_causal=is_causal, **a)


def check(args, is_causal=True, cpu=True, **tiles):
    """The kernel (and the CPU path) against the float64 reference."""
    want = expected(args, is_causal)
    tol = TOL[args["q_lat"].dtype]
    got = kernel.paged_latent_attention(scale=SCALE, is_causal=is_causal, **args, **tiles)
    assert got.dtype == args["q_lat"].dtype and got.is_contiguous() and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if cpu:
        torch.testing.assert_close(ops.paged_latent_attention(scale=SCALE, is_causal=is_causal,
                                                              **args).double(),
                                   want, rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("heads", [16, 128])
def test_dtypes_and_head_counts(dtype, heads):
    # 1 token; exactly two blocks; two blocks and one token: ragged, in 16-key chunks. 128 heads
    # of one query make two blocks of 64 rows per chunk.
    check(paged([1, 16, 17], heads=heads, dtype=dtype), split_len=16, block_n=16)


@pytest.mark.parametrize(("block_size", "lq", "is_causal"), [(1, 2, True), (5, 3, True),
                                                             (16, 1, False), (8, 4, False)])
def test_block_sizes_query_lengths_and_causality(block_size, lq, is_causal):
    # Tiles of 16 keys over blocks of 1, of 5 (not a power of two) or whole; speculative
    # decoding's few queries per sequence, bottom-right causal against each length. With
    # block_m=16 the 64 (head, query) rows of lq = 4 take four programs per chunk.
    check(paged([3, 2 * block_size + 1, 40], heads=16, lq=lq, block_size=block_size),
          is_causal=is_causal, split_len=16, block_n=16, block_m=16)


@pytest.mark.parametrize("fill", [None, "min", -math.inf])
def test_the_models_mask(fill):
    # Left padding hides the first keys of sequence 1; query 0 of head 3 of sequence 0 sees no
    # key (0, or V averaged for a finite fill); per-head random keys elsewhere. One column per
    # slot of the block table.
    args = paged([12, 30], heads=16, lq=2)
    width = args["block_table"].shape[1] * args["ckv_pool"].shape[1]
    keep = torch.rand(2, 16, 2, width, device=DEVICE) > 0.3
    keep[1, :, :, :5] = False
    keep[0, 3, 0] = False
    if fill is not None:
        keep = torch.zeros(keep.shape, device=DEVICE).masked_fill(
            ~keep, torch.finfo(torch.float32).min if fill == "min" else fill)
    got = check(dict(args, mask=keep), is_causal=True, split_len=16, block_n=16)
    if fill != "min":
        assert got[0, 3, 0].abs().max() == 0


def test_int8_pools_are_dequantized_in_registers():
    check(paged([7, 25], heads=16, lq=2, int8=True), split_len=16, block_n=16)


def test_an_empty_sequence_and_a_table_wider_than_the_lengths():
    # seq_lens 0 gives 0; a table far wider than the lengths launches chunks that exit at once.
    args = paged([0, 9], heads=16, spare_blocks=40)
    args["block_table"] = torch.cat([args["block_table"], torch.full(
        (2, 20), UNUSED, dtype=torch.int32, device=DEVICE)], 1)
    got = check(args, split_len=16, block_n=16)
    assert got[0].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("lq", "is_causal", "mask"), [(1, False, None), (3, True, "pad"),
                                                       (3, False, "2d")])
def test_contiguous_latent(dtype, lq, is_causal, mask):
    # A DynamicCache's or a static buffer's latent, [B, 1, Lk, R], read as one block per
    # sequence; masks of the attention op's broadcasting shapes (here [B, 1, Lq, Lk], [Lq, Lk]).
    b, heads, lk = 2, 16, 21
    q_lat, q_rot = (torch.randn(b, heads, lq, d, device=DEVICE).to(dtype) for d in (RANK, ROPE))
    c, k_rot = (torch.randn(b, 1, lk, d, device=DEVICE).to(dtype) for d in (RANK, ROPE))
    if mask == "pad":
        mask = (torch.arange(lk, device=DEVICE) >= torch.tensor([[0], [4]], device=DEVICE))[
            :, None, None].expand(b, 1, lq, lk)
    elif mask == "2d":
        mask = torch.rand(lq, lk, device=DEVICE) > 0.3
    args = (q_lat, q_rot, c, k_rot, mask, is_causal, SCALE)
    want = reference.latent_attention(*(a.double() for a in args[:4]), *args[4:])
    tol = TOL[dtype]
    got = kernel.latent_attention(*args, split_len=16, block_n=16)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(ops.latent_attention(*args).double(), want, rtol=tol, atol=tol)


def test_cpu_paths_keep_the_references_non_finite_semantics():
    # NaN in a stale block past a length is never read; NaN in one query gives that row NaN
    # (SDPA's CPU kernel would give 0), as `reference.attention` does.
    args = paged([5, 11], heads=4)
    args["ckv_pool"][args["block_table"][0, 0], 6:] = float("nan")  # past sequence 0's 5
    assert not ops.paged_latent_attention(scale=SCALE, **args).isnan().any()
    args["q_lat"][1, 2, 0, 0] = float("nan")
    got = ops.paged_latent_attention(scale=SCALE, **args)
    assert got[1, 2].isnan().all() and not got[0].isnan().any()
    torch.testing.assert_close(got, reference.paged_latent_attention(scale=SCALE, **args),
                               equal_nan=True)


def test_ops_schemas_and_fake_implementations():
    args = paged([3, 9], heads=4, lq=2)
    torch.library.opcheck(torch.ops.attnopt.paged_latent_attention.default, (
        args["q_lat"], args["q_rot"], args["ckv_pool"], args["krot_pool"], args["block_table"],
        args["seq_lens"], SCALE))
    b, lk = 2, 6
    contiguous = (args["q_lat"], args["q_rot"], torch.randn(b, 1, lk, RANK, device=DEVICE),
                  torch.randn(b, 1, lk, ROPE, device=DEVICE), None, True, SCALE)
    torch.library.opcheck(torch.ops.attnopt.latent_attention.default, contiguous)


@pytest.mark.parametrize(("change", "message"), [
    ({"q_rot": torch.randn(2, 4, 1, ROPE)}, "q_lat .* and q_rot"),
    ({"ckv_pool": torch.randn(8, 8, 2, RANK)}, "one latent head"),
    ({"krot_pool": torch.randn(8, 8, 1, ROPE + 1)}, "krot_pool must be"),
    ({"ckv_pool": torch.randn(8, 8, 1, RANK, dtype=torch.float64)}, "same blocks and dtype"),
])
def test_bad_operands_are_refused_with_what_to_fix(change, message):
    args = {**paged([3, 9], heads=4, lq=2, spare_blocks=6), **change}
    with pytest.raises(ValueError, match=message):
        ops.paged_latent_attention(scale=SCALE, **args)
