"""The attention kernels' interior/edge split of the key loop, attacked on random small shapes:
lengths that are not multiples of the tile, Lq > Lk and Lq < Lk under bottom-right causal,
window edges mid-tile and on tile boundaries, window_left = 0, sinks, fully masked rows (by a
boolean mask and by transformers' finfo.min fill), GQA, head dims that are not powers of two.
Every path (the Triton kernels under the interpreter, prefill and split-KV decode, with small
tiles; the CPU path; the reference) is compared with the reference computed in float64."""

from __future__ import annotations

import dataclasses
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.backends import reference
from attnopt.backends.triton import attention as kernel

op = torch.ops.attnopt.attention.default


@st.composite
def cases(draw):
    b, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    lq, lk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    d = draw(st.sampled_from([16, 40, 64, 80, 96]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    q = torch.randn(b, hkv * group, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    mask = None
    kind = draw(st.sampled_from(["none", "bool", "additive"]))
    if kind != "none":
        keep = torch.rand(b, 1, lq, lk, generator=g) > 0.3
        keep[:, :, draw(st.integers(0, lq - 1))] = False  # a row that keeps no key
        mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(
            ~keep, torch.finfo(torch.float32).min)
    sinks = torch.randn(hkv * group, generator=g) if draw(st.booleans()) else None
    # A band edge anywhere: mid-tile, on a tile boundary (multiples of 16), or none.
    edge = st.sampled_from([-1, 0, 1, 15, 16, 17, 31, 32]) | st.integers(-1, 45)
    biases = ()
    if draw(st.booleans()):  # a bias over heads and keys, -inf on some keys
        bias = torch.randn(1, hkv * group, 1, lk, generator=g)
        biases = (bias.masked_fill(torch.rand(bias.shape, generator=g) < 0.2, -math.inf),)
    slopes = torch.rand(hkv * group, generator=g) if draw(st.booleans()) else None
    mods = reference.ScoreMods(softcap=draw(st.sampled_from([0.0, 0.0, 2.5])), biases=biases,
                               alibi_slopes=slopes, window_left=draw(edge),
                               window_right=draw(edge), sinks=sinks)
    return q, k, v, mask, draw(st.booleans()), mods, draw(st.sampled_from(["bhld", "blhd"]))


def expected(q, k, v, mask, is_causal, mods):
    """The reference in float64: the exact value up to fp64 rounding."""
    wide = dataclasses.replace(
        mods, biases=tuple(b.double() for b in mods.biases),
        **{f: None if getattr(mods, f) is None else getattr(mods, f).double()
           for f in ("alibi_slopes", "sinks")})
    return reference.attention(q.double(), k.double(), v.double(),
                               mask if mask is None or mask.dtype == torch.bool else mask.double(),
                               is_causal, q.shape[-1] ** -0.5, wide)


def check(got, want, layout):
    assert got.dtype == torch.float32
    assert got.is_contiguous() if layout == "bhld" else got.transpose(1, 2).is_contiguous()
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)


# Tolerances by the arithmetic: fp16/bf16 round q, k, v and P before the products.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@settings(max_examples=40, deadline=None)
@given(cases(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_triton_tiles_in_16_bits(case, dtype):
    q, k, v, mask, is_causal, mods, layout = case
    q, k, v = (t.to(dtype) for t in (q, k, v))
    got = kernel.attention(q, k, v, mask, is_causal, q.shape[-1] ** -0.5, mods, layout=layout,
                           block_m=16, block_n=16, decode_split=2)
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.double(), expected(q, k, v, mask, is_causal, mods),
                               rtol=TOL[dtype], atol=TOL[dtype])


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from([16, 32]), st.sampled_from([16, 32]), st.integers(1, 3))
def test_triton_tiles_equal_float64(case, block_m, block_n, splits):
    q, k, v, mask, is_causal, mods, layout = case
    got = kernel.attention(q, k, v, mask, is_causal, q.shape[-1] ** -0.5, mods, layout=layout,
                           block_m=block_m, block_n=block_n, decode_split=splits)
    check(got, expected(q, k, v, mask, is_causal, mods), layout)


@settings(max_examples=60, deadline=None)
@given(cases(), st.sampled_from(["auto", "reference"]))
def test_cpu_and_reference_paths_equal_float64(case, impl):
    q, k, v, mask, is_causal, mods, layout = case
    got = op(q, k, v, mask, is_causal, q.shape[-1] ** -0.5, impl, softcap=mods.softcap,
             biases=list(mods.biases), alibi_slopes=mods.alibi_slopes,
             window_left=mods.window_left, window_right=mods.window_right, sinks=mods.sinks,
             layout=layout)
    check(got, expected(q, k, v, mask, is_causal, mods), layout)


# --- prefill tuning: a key tuned once serves only calls the pruner treats alike -----------------

def _prefill_launch(monkeypatch, q, k, v, mods) -> dict:
    """The named arguments `attention` launches the tuned prefill kernel with (not run)."""
    seen = {}

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(zip(kernel._attn_fwd.arg_names, args, strict=False), **kwargs)
            return launch

    monkeypatch.setattr(kernel, "_attn_fwd_tuned", Launcher())
    kernel.attention(q, k, v, None, False, 0.3, mods)
    return seen


def _tuning_key(named: dict) -> tuple:
    """The key Triton's Autotuner.run builds: the key arguments, then every tensor's dtype."""
    return (*(named[k] for k in kernel.PREFILL_KEY),
            *(str(a.dtype) for a in named.values() if hasattr(a, "dtype")))


def test_prefill_key_separates_calls_the_pruner_separates(monkeypatch):
    """fp32 attention at head dim 32 with one additive bias: an fp16 bias leaves the pruner the
    128x128 tile on sm_90, an fp32 bias (twice the shared memory per tile) does not. Before the
    biases' bytes were in the key, both calls had one key, so the config tuned for the first was
    launched for the second, past the shared memory the pruner allows it."""
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    calls = [_prefill_launch(monkeypatch, q, k, v, reference.ScoreMods(
        biases=(torch.randn(1, 2, 256, 256).to(dtype),))) for dtype in (torch.float16,
                                                                      torch.float32)]
    pruned = [kernel.prune_prefill(kernel.PREFILL_CONFIGS["sm90"], named) for named in calls]
    assert pruned[0] != pruned[1]
    assert _tuning_key(calls[0]) != _tuning_key(calls[1])
