"""The variants of attnopt::attention and paged_attention (`reference.ScoreMods`: softcap,
additive biases, ALiBi slopes, sliding window, sinks) on every path — the Triton prefill,
split-KV decode and paged kernels (under TRITON_INTERPRET=1 without a GPU) and the CPU paths —
against `reference.attention` in float64, each variant alone and all of them together, GQA,
causal and not, window edges, sinks on rows that see no key; then the reference itself
against the eager spellings the models write, and the op's gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.backends import ops, reference
from attnopt.backends.reference import ScoreMods
from attnopt.backends.triton import attention as kernel
from attnopt.backends.triton import paged_attention as paged_kernel
from tests.backends.test_paged_attention import capacity, paged
from tests.conftest import DEVICE

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
PATHS = {"prefill": 20, "decode": 5}  # Lq: > 16 prefill, <= 16 split-KV decode
DTYPES = list(TOL)
SMALL = dict(block_m=16, block_n=16, decode_split=3)


def randn(*shape, dtype=torch.float32, seed=None):
    g = None if seed is None else torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, device=DEVICE, generator=g).to(dtype)


def qkv(b=2, hq=4, hkv=2, lq=20, lk=40, d=32, dtype=torch.float32):
    return (randn(b, hq, lq, d, dtype=dtype) * 2, randn(b, hkv, lk, d, dtype=dtype) * 2,
            randn(b, hkv, lk, d, dtype=dtype))


def in_float64(mods: ScoreMods) -> ScoreMods:
    def wide(t):
        return None if t is None else t.double()

    return ScoreMods(mods.softcap, tuple(map(wide, mods.biases)), wide(mods.alibi_slopes),
                     mods.window_left, mods.window_right, wide(mods.sinks))


def expected(q, k, v, mask, is_causal, mods, scale=0.3):
    mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    return reference.attention(q.double(), k.double(), v.double(), mask, is_causal, scale,
                               in_float64(mods))


def check(q, k, v, mask=None, is_causal=False, mods=reference.PLAIN, cpu=True, **kw):
    """The Triton kernel (and the CPU path) against the float64 reference; the kernel's
    output."""
    want = expected(q, k, v, mask, is_causal, mods)
    tol = TOL[q.dtype]
    got = kernel.attention(q, k, v, mask, is_causal, 0.3, mods, **kw)
    assert got.dtype == q.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if cpu:
        torch.testing.assert_close(ops._attention_cpu(q, k, v, mask, is_causal, 0.3,
                                                      mods).double(), want, rtol=tol, atol=tol)
    return got


def slopes(h):
    """ALiBi's geometric slopes 2^(-8 i / H)."""
    return torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)], device=DEVICE)


VARIANTS = {
    "softcap": lambda b, h, lq, lk: ScoreMods(softcap=5.0),
    "bias per head": lambda b, h, lq, lk: ScoreMods(biases=(randn(1, h, lq, lk),)),
    "two biases, broadcast": lambda b, h, lq, lk: ScoreMods(
        biases=(randn(1, h, lq, lk), randn(b, 1, 1, lk))),
    "alibi": lambda b, h, lq, lk: ScoreMods(alibi_slopes=slopes(h)),
    "window": lambda b, h, lq, lk: ScoreMods(window_left=7),
    "two-sided window": lambda b, h, lq, lk: ScoreMods(window_left=3, window_right=5),
    "sinks": lambda b, h, lq, lk: ScoreMods(sinks=randn(h)),
    "everything": lambda b, h, lq, lk: ScoreMods(
        softcap=4.0, biases=(randn(b, h, lq, lk),), alibi_slopes=slopes(h), window_left=9,
        sinks=randn(h) + 2),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant(variant, path):
    # Each variant in one of the dtypes (in turn), all of them together in every dtype below.
    lq, lk = PATHS[path], 40
    dtype = DTYPES[list(VARIANTS).index(variant) % len(DTYPES)]
    q, k, v = qkv(b=1, lq=lq, lk=lk, dtype=dtype)
    mods = VARIANTS[variant](1, 4, lq, lk)
    for is_causal in (False, True):
        check(q, k, v, None, is_causal, mods, **SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", list(PATHS))
def test_every_variant_at_once_in_each_dtype(path, dtype):
    lq, lk = PATHS[path], 40
    q, k, v = qkv(b=1, lq=lq, lk=lk, dtype=dtype)
    check(q, k, v, None, True, VARIANTS["everything"](1, 4, lq, lk), **SMALL)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_variants_with_a_mask(path, mask_kind):
    lq, lk = PATHS[path], 40
    q, k, v = qkv(lq=lq, lk=lk)
    keep = torch.rand(2, 1, lq, lk, device=DEVICE) > 0.3
    mask = keep if mask_kind == "bool" else randn(2, 1, lq, lk).masked_fill(~keep, -math.inf)
    check(q, k, v, mask, True, VARIANTS["everything"](2, 4, lq, lk), **SMALL)
    check(q, k, v, mask, False, ScoreMods(biases=(randn(1, 4, lq, lk),), softcap=3.0), **SMALL)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("left", "right", "is_causal"), [
    (0, -1, True), (1, 0, False), (0, 0, False), (39, -1, True), (40, 3, False), (-1, 2, True)])
def test_window_edges(path, left, right, is_causal):
    # A window of one key (the diagonal), of two, as wide as the keys (no effect) and wider,
    # right of the diagonal under the causal flag (which wins); blocks wholly outside the band
    # are skipped.
    q, k, v = qkv(b=1, lq=PATHS[path], lk=40)
    check(q, k, v, None, is_causal, ScoreMods(window_left=left, window_right=right), **SMALL)


@pytest.mark.parametrize("path", list(PATHS))
def test_window_skips_blocks_yet_matches_at_long_range(path):
    # 300 keys, a window of 20: every key block but the band's is skipped (prefill) or not
    # split at all (decode: the band is 20 + Lq keys).
    lq = PATHS[path]
    q, k, v = qkv(b=1, hq=2, hkv=1, lq=lq, lk=300)
    check(q, k, v, None, True, ScoreMods(window_left=19), block_m=16, block_n=16,
          decode_split=2)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fill", ["bool", "-inf", "finfo.min"])
def test_sinks_on_rows_that_see_no_key(path, fill):
    # A row whose keys are all dropped gives 0 with a sink too (its whole weight is the
    # sink's); a row masked everywhere by finfo.min also gives 0, as GPT-OSS's eager
    # cat-softmax-slice gives it (the sink's e^0 swamps e^(-3.4e38)); other rows are normal.
    lq, lk = PATHS[path], 40
    q, k, v = qkv(lq=lq, lk=lk)
    keep = torch.rand(2, 4, lq, lk, device=DEVICE) > 0.4
    keep[0, 1, 2] = False
    keep[1, :, 0] = False
    mask = keep if fill == "bool" else torch.zeros(keep.shape, device=DEVICE).masked_fill(
        ~keep, -math.inf if fill == "-inf" else torch.finfo(torch.float32).min)
    mods = ScoreMods(sinks=randn(4))
    got = check(q, k, v, mask, False, mods, block_m=16, block_n=8, decode_split=4)
    assert (got[0, 1, 2] == 0).all() and (got[1, :, 0] == 0).all()
    assert not got.isnan().any()


def test_sink_of_minus_infinity_is_no_sink():
    q, k, v = qkv(lq=5)
    sinks = torch.full((4,), -math.inf, device=DEVICE)
    got = check(q, k, v, None, True, ScoreMods(sinks=sinks), **SMALL)
    torch.testing.assert_close(got, kernel.attention(q, k, v, None, True, 0.3, **SMALL))


# --- paged -----------------------------------------------------------------------------------


def check_paged(args, is_causal, mods, **kw):
    a = dict(args, q=args["q"].double(), k_pool=args["k_pool"].double(),
             v_pool=args["v_pool"].double())
    if a.get("mask") is not None and a["mask"].is_floating_point():
        a["mask"] = a["mask"].double()
    want = reference.paged_attention(scale=0.3, is_causal=is_causal, mods=in_float64(mods),
                                     **a)
    tol = TOL[args["q"].dtype]
    got = paged_kernel.paged_attention(scale=0.3, is_causal=is_causal, mods=mods, **args, **kw)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    cpu = ops._paged_attention_cpu(scale=0.3, is_causal=is_causal, mods=mods,
                                   **{n: args.get(n) for n in (
                                       "q", "k_pool", "v_pool", "block_table", "seq_lens",
                                       "k_scale", "v_scale", "mask")})
    torch.testing.assert_close(cpu.double(), want, rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_paged_each_variant(variant):
    # Ragged lengths: 1 token, two blocks and one, 40 (three chunks of 16); dtypes in turn.
    dtype = DTYPES[list(VARIANTS).index(variant) % len(DTYPES)]
    args = paged([1, 17, 40], lq=2, d=32, dtype=dtype)
    mods = VARIANTS[variant](3, 4, 2, capacity(args))
    for is_causal in (False, True):
        check_paged(args, is_causal, mods, split_len=16, block_n=16)


@pytest.mark.parametrize("fill", [None, "min"], ids=["bool", "finfo.min"])
def test_paged_window_and_sinks_with_left_padding(fill):
    # Gemma-2 / GPT-OSS decoding: left padding in the mask, a window that starts past the
    # first chunks (their chunks are skipped, the merge starts at the band), a sink per head.
    args = paged([5, 16, 40], lq=1, d=32)
    pad = torch.tensor([2, 0, 9], device=DEVICE)[:, None, None, None]
    keep = torch.arange(capacity(args), device=DEVICE) >= pad
    mask = keep if fill is None else torch.zeros(keep.shape, device=DEVICE).masked_fill(
        ~keep, torch.finfo(torch.float32).min)
    mods = ScoreMods(softcap=6.0, window_left=11, sinks=randn(4))
    check_paged(dict(args, mask=mask), True, mods, split_len=16, block_n=16)


def test_paged_int8_with_variants():
    args = paged([9, 30], lq=2, d=32, int8=True)
    mods = ScoreMods(softcap=5.0, alibi_slopes=slopes(4), window_left=12, sinks=randn(4))
    want = reference.paged_attention(scale=0.3, is_causal=True, mods=mods, **args)
    got = paged_kernel.paged_attention(scale=0.3, mods=mods, split_len=16, block_n=16, **args)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


# --- random combinations ------------------------------------------------------------------


@st.composite
def cases(draw):
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    return dict(
        b=draw(st.integers(1, 2)), hkv=hkv, hq=hq, lq=draw(st.integers(1, 40)),
        lk=draw(st.integers(1, 60)), dtype=draw(st.sampled_from(list(TOL))),
        is_causal=draw(st.booleans()), softcap=draw(st.sampled_from([0.0, 2.0, 30.0])),
        biases=draw(st.integers(0, 2)), alibi=draw(st.booleans()),
        left=draw(st.sampled_from([-1, 0, 3, 20])), right=draw(st.sampled_from([-1, 0, 4])),
        sinks=draw(st.booleans()), mask=draw(st.sampled_from([None, "bool", "float"])),
        seed=draw(st.integers(0, 2**16)))


@settings(max_examples=10, deadline=None)
@given(cases())
def test_random_combinations(c):
    torch.manual_seed(c["seed"])
    b, hq, lq, lk = c["b"], c["hq"], c["lq"], c["lk"]
    q, k, v = qkv(b, hq, c["hkv"], lq, lk, 32, c["dtype"])
    shapes = [(1, hq, lq, lk), (b, 1, 1, lk)]
    mods = ScoreMods(c["softcap"], tuple(randn(*shapes[i]) for i in range(c["biases"])),
                     slopes(hq) if c["alibi"] else None, c["left"], c["right"],
                     randn(hq) if c["sinks"] else None)
    mask = None
    if c["mask"]:
        keep = torch.rand(b, 1, lq, lk, device=DEVICE) > 0.3
        mask = keep if c["mask"] == "bool" else randn(b, 1, lq, lk).masked_fill(~keep, -math.inf)
    check(q, k, v, mask, c["is_causal"], mods, **SMALL)


# --- the reference against the models' own spellings, and the op's gradients ----------------


def test_reference_is_each_models_eager_math():
    # Gemma 2 (softcap before the mask), T5 (two additive terms, scale 1), GPT-OSS (the sink
    # as a last column, max subtracted, softmax, column dropped), a window as Mistral's mask:
    # the reference reproduces each to fp32 rounding.
    q, k, v = (randn(2, 4, 9, 16, seed=i) for i in range(3))
    s = q @ k.transpose(-1, -2)
    causal = torch.ones(9, 9, dtype=torch.bool, device=DEVICE).tril()
    mask = torch.zeros(9, 9, device=DEVICE).masked_fill(~causal, torch.finfo(torch.float32).min)
    bias, sinks = randn(1, 4, 9, 9, seed=5), randn(4, seed=6)

    gemma = torch.softmax(torch.tanh(s * 0.25 / 8.0) * 8.0 + mask, -1) @ v
    t5 = torch.softmax(s * 1.0 + bias + mask, -1) @ v
    logits = torch.cat([s * 0.25 + mask, sinks.view(1, 4, 1, 1).expand(2, 4, 9, 1)], -1)
    gpt_oss = torch.softmax(logits - logits.max(-1, keepdim=True).values, -1)[..., :-1] @ v
    band = causal & ~torch.ones(9, 9, dtype=torch.bool, device=DEVICE).tril(-4)
    window = torch.softmax((s * 0.25).masked_fill(~band, -math.inf), -1) @ v
    cases = [(gemma, 0.25, ScoreMods(softcap=8.0), mask),
             (t5, 1.0, ScoreMods(biases=(bias,)), mask),
             (gpt_oss, 0.25, ScoreMods(sinks=sinks), mask),
             (window, 0.25, ScoreMods(window_left=3), None)]
    for want, scale, mods, m in cases:
        got = reference.attention(q, k, v, m, m is None, scale, mods)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_reference_alibi_is_slope_times_relative_position():
    q, k, v = (randn(1, 2, 6, 8, seed=i) for i in range(3))
    slope = torch.tensor([0.5, 0.25], device=DEVICE)
    rel = (torch.arange(6, device=DEVICE)[None, :] - torch.arange(6, device=DEVICE)[:, None])
    want = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + slope.view(2, 1, 1) * rel, -1) @ v
    got = reference.attention(q, k, v, None, False, 0.3, ScoreMods(alibi_slopes=slope))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_gradients_of_every_float_input():
    q, k, v = (randn(1, 2, 4, 4, dtype=torch.float64, seed=i).requires_grad_()
               for i in range(3))
    bias = randn(1, 2, 1, 4, dtype=torch.float64, seed=3).requires_grad_()
    slope = (slopes(2).double() + 0.1).requires_grad_()
    sinks = randn(2, dtype=torch.float64, seed=4).requires_grad_()
    torch.autograd.gradcheck(
        lambda q, k, v, bias, slope, sinks: torch.ops.attnopt.attention(
            q, k[:, :1], v[:, :1], None, True, 0.3, "auto", 3.0, [bias], slope, 2, -1, sinks),
        (q, k, v, bias, slope, sinks))


def test_op_schema_fake_and_dispatch():
    q, k, v = qkv(lq=5, lk=12)
    mods_args = (4.0, [randn(1, 4, 5, 12)], slopes(4), 6, -1, randn(4))
    want = reference.attention(q, k, v, None, True, 0.3, ScoreMods.of(*mods_args))
    for impl in ("reference", "auto", "triton"):
        got = torch.ops.attnopt.attention(q, k, v, None, True, 0.3, impl, *mods_args)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    torch.library.opcheck(torch.ops.attnopt.attention.default,
                          (q, k, v, None, True, 0.3, "auto", *mods_args))
    args = paged([3, 11], d=32)
    torch.library.opcheck(torch.ops.attnopt.paged_attention.default, (
        args["q"], args["k_pool"], args["v_pool"], args["block_table"], args["seq_lens"], 0.3,
        True, "auto", None, None, None, 2.0, [randn(1, 4, 1, capacity(args))], None, 4, -1,
        randn(4)))


def test_op_writes_the_layout_asked_on_every_path():
    # layout="blhd" (what the passes ask for where SDPA's output was [B, L, H, D] in memory):
    # the same values, a transposed view of a contiguous [B, L, H, D]; the fake agrees, and
    # gradients flow through the layout argument.
    q, k, v = qkv(lq=5, lk=12)
    mods_args = (4.0, [randn(1, 4, 5, 12)], slopes(4), 6, -1, randn(4))
    want = reference.attention(q, k, v, None, True, 0.3, ScoreMods.of(*mods_args))
    for impl in ("reference", "auto", "triton"):
        got = torch.ops.attnopt.attention(q, k, v, None, True, 0.3, impl, *mods_args,
                                          layout="blhd")
        assert got.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    torch.library.opcheck(torch.ops.attnopt.attention.default,
                          (q, k, v, None, True, 0.3, "auto", *mods_args), {"layout": "blhd"})
    with pytest.raises(ValueError, match="layout must be one of"):
        torch.ops.attnopt.attention(q, k, v, None, True, 0.3, "reference", layout="lbhd")
    args = paged([3, 11], lq=2, d=32)
    paged_args = (args["q"], args["k_pool"], args["v_pool"], args["block_table"],
                  args["seq_lens"], 0.3)
    want = torch.ops.attnopt.paged_attention(*paged_args, impl="reference")
    for impl in ("reference", "auto", "triton"):
        got = torch.ops.attnopt.paged_attention(*paged_args, impl=impl, layout="blhd")
        assert got.transpose(1, 2).is_contiguous()
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    torch.library.opcheck(torch.ops.attnopt.paged_attention.default, paged_args,
                          {"layout": "blhd"})


@pytest.mark.parametrize(("mods", "message"), [
    (ScoreMods(softcap=-1.0), "softcap must be 0"),
    (ScoreMods(window_left=-2), "window_left and window_right"),
    (ScoreMods(biases=(torch.zeros(3, 1, 1, 1),)), r"biases\[0\] must be a floating tensor"),
    (ScoreMods(biases=(torch.zeros(1, 1, 1, 8, dtype=torch.bool),)), "biases"),
    (ScoreMods(sinks=torch.zeros(3)), r"sinks must be a floating \[Hq=4\]"),
    (ScoreMods(alibi_slopes=torch.zeros(4, 1)), "alibi_slopes must be"),
])
def test_bad_variants_are_refused(mods, message):
    q, k, v = qkv(lq=3, lk=8)
    with pytest.raises(ValueError, match=message):
        reference.attention(q.cpu(), k.cpu(), v.cpu(), None, False, 0.3, mods)
