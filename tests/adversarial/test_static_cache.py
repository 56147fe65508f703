"""A static KV cache written by hand (index_copy into [B, Hkv, max_len, D] buffers) and read
through a mask the kv_cache pass cannot know: the rewrite reads each sequence up to the last key
its mask lets some query see, so it is exact whatever the mask says."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.adversarial.helpers import run

MAX_LEN, PAST, NEW = 16, 5, 3
MIN = torch.finfo(torch.float32).min


class HandCache(torch.nn.Module):
    def __init__(self, mask_kind: str):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("k", torch.randn(2, 2, MAX_LEN, 8, generator=g))
        self.register_buffer("v", torch.randn(2, 2, MAX_LEN, 8, generator=g))
        self.mask_kind = mask_kind

    def forward(self, q, k_new, v_new, past):
        positions = past + torch.arange(k_new.shape[2])
        self.k.index_copy_(2, positions, k_new)
        self.v.index_copy_(2, positions, v_new)
        cols = torch.arange(MAX_LEN)
        causal = cols[None, :] <= positions[:, None]  # [NEW, MAX_LEN]
        if self.mask_kind == "everything":  # every slot, the stale ones past the tokens too
            mask = torch.ones(1, 1, NEW, MAX_LEN, dtype=torch.bool)
        elif self.mask_kind == "causal":
            mask = causal[None, None]
        elif self.mask_kind == "window":  # a sliding window of 3 keys
            mask = (causal & (cols[None, :] > positions[:, None] - 3))[None, None]
        else:  # additive, finfo.min; sequence 1's first query sees nothing (a padded row)
            keep = causal[None, None].repeat(2, 1, 1, 1)
            keep[1, :, 0] = False
            mask = torch.zeros(keep.shape).masked_fill(~keep, MIN)
            if self.mask_kind == "additive -inf":
                mask = mask.masked_fill(~keep, -math.inf)
        return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask,
                                              enable_gqa=True)


@pytest.mark.parametrize("mask_kind", ["everything", "causal", "window", "additive finfo.min",
                                       "additive -inf"])
@pytest.mark.parametrize("kernels", ["auto", "triton"])
def test_hand_written_static_cache_is_exact_whatever_its_mask(mask_kind, kernels):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, NEW, 8, generator=g)
    k_new, v_new = torch.randn(2, 2, NEW, 8, generator=g), torch.randn(2, 2, NEW, 8, generator=g)
    eager, compiled = HandCache(mask_kind), HandCache(mask_kind)
    want = eager(q, k_new, v_new, torch.tensor(PAST))
    r = run(compiled, q, k_new, v_new, torch.tensor(PAST), kernels=kernels)
    r.want = want  # the eager run inside `run` wrote into the second module's buffers first
    assert r.count("kv_cache") == 1
    r.assert_equal()
