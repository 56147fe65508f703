"""Near misses of attention: each is rewritten and exact, or refused with its reason.

A softmax whose max and sum reduce over different dims, a softmax over the queries, K
broadcast over the batch, V with other heads than K, K transposed over other dims, a +inf or
finite fill, a float64 softmax: each changes the math of `softmax(q kᵀ s + mask) v` and must
be refused by name (the softmax pass may still fuse the softmax alone, exactly)."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.adversarial.helpers import run

B, H, L, D = 2, 4, 6, 4


def qkv(*shape_k, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(*(shape_k or (B, H, L, D)), generator=g)
    v = torch.randn(*(shape_k or (B, H, L, D)), generator=g)
    return q, k, v


class Decomposed(torch.nn.Module):
    """exp(s - max over max_dims) / sum over sum_dims, then @ v."""

    def __init__(self, max_dims, sum_dims, keepdim: bool = True):
        super().__init__()
        self.max_dims, self.sum_dims, self.keepdim = max_dims, sum_dims, keepdim

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) * 0.5
        e = torch.exp(s - s.amax(self.max_dims, keepdim=True))
        return e / e.sum(self.sum_dims, keepdim=True) @ v


@pytest.mark.parametrize(("max_dims", "sum_dims"), [(-1, -2), ((-1, -2), -1), (-1, (-1, -2)),
                                                    (-2, -2)])
def test_softmax_reductions_over_other_dims_are_refused(max_dims, sum_dims):
    r = run(Decomposed(max_dims, sum_dims), *qkv())
    r.assert_equal()
    assert r.count("attention") == 0
    assert r.refused("not a softmax over one dim") or r.refused("not over the keys")


def test_softmax_over_the_queries_is_refused():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v

    r = run(M(), *qkv())
    r.assert_equal()
    assert r.count("attention") == 0 and r.refused("softmax over dim -2, not over the keys")


class Plain(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v


def test_k_and_v_broadcast_over_the_batch():
    # The written-out rule refuses K/V of batch 1 (a kernel would index them per sequence);
    # the batched rule reads matmul's stride-0 expand as the K/V it is: exact either way.
    r = run(Plain(), *qkv(1, H, L, D))
    r.assert_equal()
    assert r.count("attention") == 1 or r.refused("broadcast over the batch")


def test_v_with_other_heads_than_k():
    q, _, v = qkv()
    k = torch.randn(B, 1, L, D)  # one key head broadcast over the query heads, V per head
    r = run(Plain(), q, k, v)
    r.assert_equal()
    assert r.count("attention") == 1 or r.refused("other heads or length than k")


def test_one_kv_head_broadcast_by_matmul_is_mqa():
    q, _, _ = qkv()
    k, v = torch.randn(B, 1, L, D), torch.randn(B, 1, L, D)
    r = run(Plain(), q, k, v)
    r.assert_equal()
    assert r.count("attention") == 1


def test_k_transposed_over_other_dims():
    class M(torch.nn.Module):  # [B, H, L, D] with H = L = D: transpose(1, 3) is shape-correct
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(1, 3), dim=-1) @ v

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    r = run(M(), q, k, v)
    r.assert_equal()
    assert r.count("attention") == 1 or r.refused("not transposed over its last two dims")


@pytest.mark.parametrize("fill", [math.inf, -1e4, 0.0])
def test_fills_other_than_minus_inf_are_refused(fill):
    class M(torch.nn.Module):
        def forward(self, q, k, v, drop):
            s = (q @ k.transpose(-1, -2)).masked_fill(drop, fill)
            return torch.softmax(s, dim=-1) @ v

    drop = torch.zeros(1, 1, L, L, dtype=torch.bool)
    drop[..., 0, :] = True  # row 0 masked everywhere
    drop[..., 1:, -1] = True
    r = run(M(), *qkv(), drop)
    r.assert_equal()
    assert r.count("attention") == 0 and r.refused(f"mask fill {fill} is not -inf")


def test_float64_softmax_of_float32_scores():
    # softmax(dtype=float64) upcasts the scores first: the attention op computes in fp32, so
    # attention is refused; the softmax of the fp64 scores is fused and computed in fp64.
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            p = torch.softmax(q @ k.transpose(-1, -2), dim=-1, dtype=torch.float64)
            return (p @ v.double()).float()

    r = run(M(), *qkv())
    r.assert_equal(rtol=1e-12, atol=1e-12)
    assert r.count("attention") == 0


def test_q_read_through_a_transpose_is_attention():
    class M(torch.nn.Module):  # q stored [B, H, D, L]
        def forward(self, qt, k, v):
            return torch.softmax(qt.transpose(-1, -2) @ k.transpose(-1, -2), dim=-1) @ v

    q, k, v = qkv()
    r = run(M(), q.transpose(-1, -2).contiguous(), k, v)
    r.assert_equal()
    assert r.count("attention") == 1


# --- the causal shortcut: a constant mask becomes is_causal only where that is exact ---------


class ConstantCausal(torch.nn.Module):
    def __init__(self, fill: float):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v):
        lq, lk = q.shape[2], k.shape[2]
        keep = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        mask = torch.zeros(lq, lk).masked_fill(~keep, self.fill)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -math.inf],
                         ids=["finfo.min", "-inf"])
@pytest.mark.parametrize(("lq", "lk"), [(6, 4), (4, 6), (5, 5)])
def test_constant_causal_mask_becomes_the_flag_only_when_exact(fill, lq, lk):
    # With Lq > Lk the first rows keep no key: a finite fill averages V there (eager), which
    # the causal flag (0 there) does not; -inf gives 0 either way.
    q = torch.randn(1, 2, lq, 8)
    k, v = torch.randn(1, 2, lk, 8), torch.randn(1, 2, lk, 8)
    r = run(ConstantCausal(fill), q, k, v)
    r.assert_equal()
    assert r.count("attention") == 1
    flag = "None, True" in r.reports[0].diff()
    assert flag == (lq <= lk or fill == -math.inf)
