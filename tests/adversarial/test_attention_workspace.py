"""The decode kernels' partials live in a workspace kept between calls (`triton.workspace`): a
call must read only what it wrote. Every call here first fills the kept buffers with NaN, so a
partial read from a previous call (or never written) shows as NaN; calls change batch, heads,
lengths, dtypes, windows and paths (contiguous decode, paged decode) and grow, shrink and grow
again, each compared with the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.backends import reference
from attnopt.backends.triton import attention as kernel
from attnopt.backends.triton import latent_attention as latent_kernel
from attnopt.backends.triton import paged_attention as paged_kernel
from attnopt.backends.triton import workspace

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def poison() -> None:
    for buf in workspace._buffers.values():
        buf.fill_(math.nan)


def mods_of(hq: int, left: int, sinks: bool) -> reference.ScoreMods:
    return reference.ScoreMods(window_left=left, sinks=torch.randn(hq) if sinks else None)


def wide(mods: reference.ScoreMods) -> reference.ScoreMods:
    return reference.ScoreMods(window_left=mods.window_left, window_right=mods.window_right,
                               sinks=None if mods.sinks is None else mods.sinks.double())


def decode_call(b, hq, hkv, lq, lk, d, dtype, left, sinks, splits):
    q = torch.randn(b, hq, lq, d).to(dtype)
    k, v = (torch.randn(b, hkv, lk, d).to(dtype) for _ in range(2))
    mods = mods_of(hq, left, sinks)
    poison()
    got = kernel.attention(q, k, v, None, True, 0.3, mods, block_n=16, decode_split=splits)
    want = reference.attention(q.double(), k.double(), v.double(), None, True, 0.3, wide(mods))
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def paged_call(lens, hq, hkv, lq, d, dtype, left, sinks, block_size=8, mask_kind="none",
               is_causal=True):
    nb = [-(-n // block_size) for n in lens]
    num_blocks, width = sum(nb) + 2, max(nb) + 2
    q = torch.randn(len(lens), hq, lq, d).to(dtype)
    k, v = (torch.randn(num_blocks, block_size, hkv, d).to(dtype) for _ in range(2))
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    ids = torch.randperm(num_blocks)
    for b, n in enumerate(nb):
        table[b, :n], ids = ids[:n], ids[n:]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    mods = mods_of(hq, left, sinks)
    mask = wide_mask = None
    if mask_kind != "none":  # over the table's capacity; row 0 of every sequence keeps nothing
        keep = torch.rand(len(lens), 1, lq, width * block_size) > 0.3
        keep[:, :, 0] = False
        mask = wide_mask = keep
        if mask_kind == "additive":
            mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep,
                                                                    torch.finfo(dtype).min)
            wide_mask = mask.double()
    poison()
    got = paged_kernel.paged_attention(q, k, v, table, seq_lens, 0.3, is_causal, mask=mask,
                                       mods=mods, split_len=16, block_n=16)
    want = reference.paged_attention(q.double(), k.double(), v.double(), table, seq_lens, 0.3,
                                     is_causal, mask=wide_mask, mods=wide(mods))
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def latent_call(b, h, lq, lk, rank, rope, dtype, is_causal):
    q_lat, q_rot = torch.randn(b, h, lq, rank).to(dtype), torch.randn(b, h, lq, rope).to(dtype)
    c_kv, k_rot = torch.randn(b, 1, lk, rank).to(dtype), torch.randn(b, 1, lk, rope).to(dtype)
    poison()
    got = latent_kernel.latent_attention(q_lat, q_rot, c_kv, k_rot, None, is_causal, 0.3,
                                         split_len=16, block_n=16)
    want = reference.latent_attention(q_lat.double(), q_rot.double(), c_kv.double(),
                                      k_rot.double(), None, is_causal, 0.3)
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_grow_shrink_grow_on_every_path():
    workspace.release()
    decode_call(2, 4, 2, 1, 70, 64, torch.float32, -1, False, 3)
    decode_call(1, 2, 1, 3, 9, 16, torch.float16, -1, True, 2)    # smaller: stale tail
    paged_call([40, 3, 0], 4, 2, 2, 32, torch.float32, -1, False)
    decode_call(3, 6, 3, 4, 130, 40, torch.bfloat16, 20, True, 3)  # larger: grows
    paged_call([5], 2, 1, 1, 16, torch.float16, 3, True)
    paged_call([100, 77], 4, 1, 3, 64, torch.float32, 30, False)
    latent_call(2, 4, 1, 50, 32, 16, torch.float32, True)
    decode_call(1, 1, 1, 1, 3, 16, torch.float32, -1, False, 1)   # smallest
    latent_call(3, 2, 2, 90, 64, 16, torch.float16, True)          # larger again
    paged_call([17], 2, 2, 1, 16, torch.bfloat16, -1, True)


call = st.one_of(
    st.tuples(st.just("decode"), st.integers(1, 3), st.sampled_from([(1, 1), (2, 1), (4, 2)]),
              st.integers(1, 16), st.integers(1, 80), st.sampled_from([16, 40, 64]),
              st.sampled_from(list(TOL)), st.integers(-1, 40), st.booleans(),
              st.integers(1, 4)),
    st.tuples(st.just("paged"), st.lists(st.integers(0, 60), min_size=1, max_size=3),
              st.sampled_from([(1, 1), (2, 1), (4, 2)]), st.integers(1, 4),
              st.sampled_from([16, 40]), st.sampled_from(list(TOL)), st.integers(-1, 40),
              st.booleans(), st.sampled_from([4, 8, 16]),
              st.sampled_from(["none", "bool", "additive"]), st.booleans()))


@settings(max_examples=25, deadline=None)
@given(st.lists(call, min_size=2, max_size=5))
def test_random_call_sequences_read_only_their_own_partials(calls):
    for c in calls:
        if c[0] == "decode":
            _, b, (hq, hkv), lq, lk, d, dtype, left, sinks, splits = c
            decode_call(b, hq, hkv, lq, lk, d, dtype, left, sinks, splits)
        else:
            _, lens, (hq, hkv), lq, d, dtype, left, sinks, block_size, mask, causal = c
            paged_call(lens, hq, hkv, lq, d, dtype, left, sinks, block_size, mask, causal)


@pytest.mark.parametrize("first", [1, 3])
def test_two_calls_in_one_graph_share_the_workspace(first):
    """Two attention ops in one compiled graph, the second reading the first's output."""
    from tests.adversarial.helpers import run

    class TwoSteps(torch.nn.Module):
        def forward(self, q, k, v, k2, v2):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return torch.nn.functional.scaled_dot_product_attention(o, k2, v2)

    q = torch.randn(2, 4, first, 16)
    k, v, k2, v2 = (torch.randn(2, 4, n, 16) for n in (33, 33, 5, 5))
    r = run(TwoSteps(), q, k, v, k2, v2, kernels="triton")
    assert r.count("attention") == 2, r.rejected
    r.assert_equal()
