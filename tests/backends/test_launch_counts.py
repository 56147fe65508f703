"""What one call costs the device, counted with `launches.count_launches` (a hook on every Triton
launch and a dispatch mode on every ATen op): kernel launches, allocations, host syncs. Counted
in the steady state (after a first call, which may tune or allocate the W4A16 arrival
counters), under the interpreter here and the same way on a GPU.

Every kernel is held to its documented counts: W4A16 (`w4a16.LAUNCHES`: one launch per decode
step), the split-KV attention kernels (`attention.LAUNCHES["decode"]` and
`paged_attention.LAUNCHES`: the split and the merge, with the partials in a workspace kept
between calls, so the output is the only allocation) and MoE (`moe.LAUNCHES`: four per call,
`moe.DECODE_LAUNCHES`: three for one token, two allocations).
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


def _moe_problem(t=3, h=32, i=48, e=4, k=2, dtype=torch.float16):
    x = torch.randn(t, h, device=DEVICE, dtype=dtype)
    ids = torch.randint(0, e, (t, k), device=DEVICE)
    w = torch.rand(t, k, device=DEVICE)
    gate_up = torch.randn(e, 2 * i, h, device=DEVICE, dtype=dtype)
    down = torch.randn(e, h, i, device=DEVICE, dtype=dtype)
    return x, ids, w, gate_up, down


MOE_KERNELS = ["_align_kernel", "_gate_up_kernel", "_down_kernel", "_sum_kernel"]
MOE_DECODE_KERNELS = MOE_KERNELS[1:]  # one token goes by pair: no align step


def test_moe_launches_per_call():
    # Align (one program: no zeroed counts), gate/up, down (in 2 K chunks here), sum; the
    # output and one workspace are the only allocations.
    seen = steady(moe.fused_moe, *_moe_problem())
    assert seen.triton == MOE_KERNELS and len(MOE_KERNELS) == moe.LAUNCHES
    assert (seen.aten, seen.syncs, seen.allocations) == ([], [], 2)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_moe_decode_step_launches(k):
    seen = steady(moe.fused_moe, *_moe_problem(t=1, k=k, e=8))
    assert seen.triton == MOE_DECODE_KERNELS and len(MOE_DECODE_KERNELS) == moe.DECODE_LAUNCHES
    assert (seen.aten, seen.syncs, seen.allocations) == ([], [], 2)


@pytest.mark.parametrize(("t", "kernels"), [(3, MOE_KERNELS), (1, MOE_DECODE_KERNELS)])
def test_moe_int4_launches_through_the_op(t, kernels):
    x, ids, w, gate_up, down = _moe_problem(t=t, dtype=torch.bfloat16)
    packed = [[int4.quantize_rtn(m, 32, dtype=x.dtype) for m in weight] for weight in (gate_up,
                                                                                    down)]
    flat = [torch.stack([getattr(p, f) for p in ps]) for ps in packed
            for f in ("qweight", "scales", "zeros")]
    seen = steady(torch.ops.attnopt.moe_w4a16, x, ids, w, *flat, 32, "silu", "triton")
    assert seen.triton == kernels
    assert (seen.aten, seen.syncs, seen.allocations) == ([], [], 2)


def test_moe_token_chunks_share_one_workspace(monkeypatch):
    # 9 tokens x 2 in passes of at most 4 pairs: 5 chunks (4 of 2 tokens, the last of 1 token,
    # which goes by pair), and still one workspace, sized for the largest chunk.
    monkeypatch.setattr(moe, "MAX_PAIRS", 4)
    seen = steady(moe.fused_moe, *_moe_problem(t=9))
    assert seen.triton == MOE_KERNELS * 4 + MOE_DECODE_KERNELS
    assert (seen.aten, seen.syncs, seen.allocations) == ([], [], 2)
