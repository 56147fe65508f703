"""What one call costs the device, counted with `launches.count_launches` (a hook on every Triton
launch and a dispatch mode on every ATen op): kernel launches, allocations, host syncs. Counted
in the steady state (after a first call, which may tune or allocate the W4A16 arrival
counters), under the interpreter here and the same way on a GPU.

W4A16 and the split-KV attention kernels are held to their documented counts (`w4a16.LAUNCHES`:
one launch per decode step; `attention.LAUNCHES["decode"]` and `paged_attention.LAUNCHES`: the
split and the merge, with the partials in a workspace kept between calls, so the output is the
only allocation). For MoE the counts are today's, documented in benchmarks/RESULTS.md as upper
bounds: lowering them is its kernels' owners' work, and then these bounds go down.
"""

import pytest
import torch

from attnopt.backends import int4
from attnopt.backends.triton import attention, moe, paged_attention, workspace
from attnopt.backends.triton import w4a16 as kernel
from attnopt.backends.triton.launches import count_launches
from tests.conftest import DEVICE

M_OF = {"gemv": 1, "splitk": 17, "tiled": 70, "dequant": 5}


def steady(fn, *args, **kwargs):
    fn(*args, **kwargs)
    with count_launches() as seen:
        fn(*args, **kwargs)
    return seen


def packed(n=48, k=256, g=64, dtype=torch.bfloat16):
    return int4.quantize_rtn(torch.randn(n, k, device=DEVICE), g, dtype=dtype)


@pytest.mark.parametrize("path", kernel.PATHS)
def test_w4a16_launches_per_path(path):
    p = packed()
    x = torch.randn(M_OF[path], 256, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(48, device=DEVICE, dtype=torch.bfloat16)
    seen = steady(kernel.w4a16_matmul, x, p.qweight, p.scales, p.zeros, 64, bias, path=path)
    assert seen.total == kernel.LAUNCHES[path], seen
    assert seen.syncs == []
    # "gemv"/"splitk" run split into 2 K chunks here: still one launch, with the fp32 partials
    # (and the output) the only allocations; "dequant" adds the 16-bit W and cuBLAS's GEMM.
    expected_allocations = {"gemv": 2, "splitk": 2, "tiled": 1, "dequant": 2}[path]
    assert seen.allocations == expected_allocations, seen
    if path != "dequant":
        assert seen.aten == []


def test_w4a16_decode_step_through_the_op():
    # A decode step's linear: x [B, 1, K] through attnopt::w4a16_linear, as a rewritten
    # graph calls it. One launch, no sync, and the counters stay zeroed for the next step.
    p = packed()
    x = torch.randn(2, 1, 256, device=DEVICE, dtype=torch.bfloat16)
    op = torch.ops.attnopt.w4a16_linear
    seen = steady(op, x, p.qweight, p.scales, p.zeros, None, 64, "triton")
    assert (seen.total, seen.triton, seen.syncs) == (1, ["_splitk_kernel"], [])
    counters = next(iter(kernel._counters.values()))
    assert not counters.any()


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_attention_decode_launches(layout):
    q = torch.randn(1, 8, 1, 64, device=DEVICE, dtype=torch.float16)
    k = torch.randn(1, 2, 300, 64, device=DEVICE, dtype=torch.float16)
    seen = steady(attention.attention, q, k, k, None, True, 0.125, layout=layout)
    # Split-KV: the split kernel and a merge kernel; the partials are the workspace's.
    assert seen.triton == ["_decode_split_kernel", "_decode_merge_kernel"]
    assert len(seen.triton) == attention.LAUNCHES["decode"]
    assert (seen.total, seen.allocations, seen.syncs) == (2, 1, [])


def test_attention_prefill_launches():
    q = torch.randn(1, 4, 40, 32, device=DEVICE, dtype=torch.float16)
    seen = steady(attention.attention, q, q, q, None, True, 0.125)
    assert seen.triton == ["_attn_fwd"] and len(seen.triton) == attention.LAUNCHES["prefill"]
    assert (seen.total, seen.allocations, seen.syncs) == (1, 1, [])


def test_a_larger_decode_grows_the_workspace_once():
    workspace.release()
    q = torch.randn(1, 8, 1, 64, device=DEVICE, dtype=torch.float16)
    small = torch.randn(1, 2, 300, 64, device=DEVICE, dtype=torch.float16)
    steady(attention.attention, q, small, small, None, True, 0.125, decode_split=2)
    big = torch.randn(1, 2, 900, 64, device=DEVICE, dtype=torch.float16)
    with count_launches() as first:
        attention.attention(q, big, big, None, True, 0.125, decode_split=16)
    assert first.allocations == 2  # the output and the grown workspace
    seen = steady(attention.attention, q, small, small, None, True, 0.125, decode_split=2)
    assert seen.allocations == 1


def test_paged_decode_launches():
    q = torch.randn(2, 8, 1, 64, device=DEVICE, dtype=torch.float16)
    pool = torch.randn(8, 16, 2, 64, device=DEVICE, dtype=torch.float16)
    table = torch.arange(8, device=DEVICE, dtype=torch.int32).view(2, 4)
    lens = torch.tensor([50, 17], device=DEVICE, dtype=torch.int32)
    seen = steady(paged_attention.paged_attention, q, pool, pool, table, lens, 0.125)
    assert seen.triton == ["_paged_split_kernel", "_paged_merge_kernel"]
    assert len(seen.triton) == paged_attention.LAUNCHES
    assert (seen.total, seen.allocations, seen.syncs) == (2, 1, [])


def test_moe_counts_today():
    t, h, i, e, k = 3, 32, 48, 4, 2
    x = torch.randn(t, h, device=DEVICE, dtype=torch.float16)
    ids = torch.randint(0, e, (t, k), device=DEVICE)
    w = torch.rand(t, k, device=DEVICE)
    gate_up = torch.randn(e, 2 * i, h, device=DEVICE, dtype=torch.float16)
    down = torch.randn(e, h, i, device=DEVICE, dtype=torch.float16)
    seen = steady(moe.fused_moe, x, ids, w, gate_up, down)
    # Align (zeroed counts, count, offsets, scatter), gate/up, down, sum: 7 launches.
    assert seen.triton == ["_count_kernel", "_offsets_kernel", "_scatter_kernel",
                           "_gate_up_kernel", "_down_kernel", "_sum_kernel"]
    assert seen.aten == ["aten::zeros"]
    assert (seen.total, seen.syncs) == (7, [])
    assert seen.allocations == 9
