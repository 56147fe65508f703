"""The 3-D batched attention rule at a size-1 row or column axis (a decode step's one query,
a single key): einsum, bmm and baddbmm spellings, masks, q made by unsqueezing a [B·H, D]
tensor, and the near misses (softmax over the wrong dim, swapped batch dims) — each rewritten
and equal to eager, or refused with its reason and left as eager computes it."""

import pytest
import torch

from tests.adversarial.helpers import run

B, H, D = 2, 3, 8


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[-2:])


def einsum(q, k, v, mask):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * 0.3 + mask
    return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)


def bmm(q, k, v, mask):
    s = torch.bmm(flat(q), flat(k).transpose(1, 2)) * 0.3 + flat(mask.expand(*q.shape[:2], -1, -1))
    return torch.bmm(s.softmax(-1), flat(v))


def baddbmm(q, k, v, mask):
    s = torch.baddbmm(flat(mask.expand(*q.shape[:2], -1, -1)), flat(q), flat(k).transpose(1, 2),
                      alpha=0.3)
    return torch.bmm(torch.softmax(s, -1, dtype=torch.float32).to(q.dtype), flat(v))


def bool_masked(q, k, v, keep):
    s = torch.bmm(flat(q), flat(k).transpose(1, 2)) * 0.3
    s = s.masked_fill(~flat(keep.expand(*q.shape[:2], -1, -1)), float("-inf"))
    return torch.bmm(s.softmax(-1), flat(v))


SPELLINGS = [einsum, bmm, baddbmm, bool_masked]


@pytest.mark.parametrize("b, h", [(B, H), (1, H), (1, 1)])  # size-1 batch dims too
@pytest.mark.parametrize("lq, lk", [(1, 7), (5, 1), (1, 1)])
@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_one_query_or_one_key_is_rewritten_and_exact(spelling, lq, lk, kernels, b, h):
    q, k, v = torch.randn(b, h, lq, D), torch.randn(b, h, lk, D), torch.randn(b, h, lk, D)
    if spelling is bool_masked:
        mask = torch.rand(b, 1, lq, lk) > 0.3
        mask[..., -1] = True  # every row keeps a key: eager's plain softmax is NaN otherwise
    else:
        mask = torch.randn(b, 1, lq, lk)
    r = run(_Wrap(spelling), q, k, v, mask, kernels=kernels)
    if spelling is einsum and lk == 1:
        # einsum lowers a contraction over one key to a broadcast multiply, not a bmm: no
        # attention in the graph, and its softmax (over one score) is the softmax pass's.
        assert r.count("attention") == 0 and r.count("softmax") == 1 and not r.rejected
    else:
        assert r.count("attention") == 1, r.rejected
    r.assert_equal()


class _Wrap(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class UnsqueezedQuery(torch.nn.Module):
    """A decode step's query kept as [B·H, D] and unsqueezed to the bmm's [B·H, 1, D]."""

    def forward(self, q2, k3, v3):
        s = torch.bmm(q2.unsqueeze(1), k3.transpose(1, 2)) / D ** 0.5
        return torch.bmm(s.softmax(-1), v3).squeeze(1)


@pytest.mark.parametrize("lk", [1, 9])
def test_query_unsqueezed_from_two_dims(lk):
    r = run(UnsqueezedQuery(), torch.randn(B * H, D), torch.randn(B * H, lk, D),
            torch.randn(B * H, lk, D))
    assert r.count("attention") == 1, r.rejected
    r.assert_equal()


class SwappedBatch(torch.nn.Module):
    """v stored [H, B, Lk, D] and flattened as it is: the bmm pairs batch index b·H + h of q
    with index h'·B + b' of v. With B = H the sizes agree, and the flat index pairing is what
    both compute."""

    def forward(self, q, k, v_hb):
        s = torch.bmm(flat(q), flat(k).transpose(1, 2)).softmax(-1)
        return torch.bmm(s, flat(v_hb))


@pytest.mark.parametrize("lq", [1, 4])
def test_swapped_batch_dims_of_equal_size_pair_by_flat_index(lq):
    n = 3  # B = H
    q, k = torch.randn(n, n, lq, D), torch.randn(n, n, 6, D)
    v_hb = torch.randn(n, n, 6, D)
    r = run(SwappedBatch(), q, k, v_hb)
    r.assert_equal()  # rewritten or not, eager's value


class Wrong(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        s = torch.bmm(flat(q), flat(k).transpose(1, 2))
        if self.kind == "rows":  # softmax over the queries
            p = s.softmax(1)
        elif self.kind == "transposed":  # softmax over the queries, read as the last dim
            p = s.transpose(1, 2).softmax(-1).transpose(1, 2)
        else:  # v with heads and batch swapped (B != H)
            p, v = s.softmax(-1), v.transpose(0, 1)
        return torch.bmm(p, flat(v))


@pytest.mark.parametrize("kind, lq, lk, reason", [
    ("rows", 1, 7, "softmax over dim 1, not over the keys"),
    ("rows", 5, 1, "softmax over dim 1, not over the keys"),
    ("transposed", 5, 1, "not laid out [batch..., q, k]"),
    ("transposed", 5, 7, "not laid out [batch..., q, k]"),
    ("swapped", 1, 7, "q, k and v batch dims differ"),
    ("swapped", 5, 1, "q, k and v batch dims differ"),
])
def test_near_misses_are_refused_with_reasons(kind, lq, lk, reason):
    q, k, v = torch.randn(B, H, lq, D), torch.randn(B, H, lk, D), torch.randn(B, H, lk, D)
    r = run(Wrong(kind), q, k, v)
    assert r.count("attention") == 0 and r.refused(reason), r.rejected
    r.assert_equal()
