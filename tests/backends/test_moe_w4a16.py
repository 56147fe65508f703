"""attnopt::moe_w4a16 (routed experts with int4 weights): the Triton kernel
(`triton/moe.py`, INT4 variant) and the CPU path (`moe_cpu.moe_w4a16`) against `reference.moe`
in float64 on the dequantized weights.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (BLOCK_M 16, BLOCK_N = BLOCK_K = 16, the
down GEMM in two K chunks), so groups of 32 to 128 take 2 to 8 K tiles each. H = 40 and I = 24
are multiples of no group size (padded: the padding codes must add nothing), and 2I = 48 is a
multiple of 16 while H = 40 is not, so the CPU path runs ATen's int4 kernel for gate/up and the
dequantize fallback for down; H = 64, I = 20 swaps the two, and H = 37, I = 23 takes the fallback
for both."""

import math

import pytest
import torch

from attnopt.backends import int4, int4_cpu, moe_cpu, reference
from attnopt.backends.triton import moe as kernel
from tests.conftest import DEVICE

# The kernel: fp32 accumulation of exact (q - z) products, 16-bit results rounded twice (the
# intermediate and the output), as attnopt::moe.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# ATen's int4 CPU kernel takes bf16 activations and scales and returns bf16, whatever x's dtype;
# where neither GEMM can use it (N not a multiple of 16) fp32 stays fp32.
CPU_TOL = {torch.float32: 2e-2, torch.float16: 2e-2, torch.bfloat16: 2e-2}
PATHS = ("triton", "cpu")


def quantize_experts(w: torch.Tensor, g: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """qweight, scales, zeros of each expert matrix of w [E, N, K] as `int4.quantize_rtn` packs
    it, stacked over E (per matrix, on purpose: the pass quantizes the [E·N, K] rows at once)."""
    packed = [int4.quantize_rtn(m, g, dtype) for m in w]
    return [torch.stack([getattr(p, k) for p in packed]).to(DEVICE)
            for k in ("qweight", "scales", "zeros")]


def dequantized(q, s, z, g, k):
    return torch.stack([int4.dequantize(q[e], s[e], z[e], g, k, torch.float64)
                        for e in range(q.shape[0])])


def problem(t=9, k=2, e=6, h=40, i=24, g=32, dtype=torch.float32, routing="random", seed=0):
    """(x, ids, weights, gate_up q/s/z, down q/s/z, g) with O(1) outputs, scales in x's dtype.
    Routings as in test_moe_kernel: "random" (k distinct experts per token), "one" (every token
    the same k experts), "skewed" (slot 0 is expert 0), "repeat" (drawn with replacement)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    w_gate_up = torch.randn(e, 2 * i, h, generator=gen) / math.sqrt(h)
    w_down = torch.randn(e, h, i, generator=gen) / math.sqrt(i)
    if routing == "repeat":
        ids = torch.randint(0, e, (t, k), generator=gen)
    elif routing == "one":
        ids = torch.randperm(e, generator=gen)[:k].expand(t, k).clone()
    else:
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
        if routing == "skewed":
            ids[:, 0] = 0
            ids[:, 1:] = torch.where(ids[:, 1:] == 0, ids[:, :1].new_tensor(e - 1), ids[:, 1:])
    weights = torch.rand(t, k, generator=gen).softmax(-1)
    return (x.to(device=DEVICE, dtype=dtype), ids.to(DEVICE), weights.to(DEVICE),
            *quantize_experts(w_gate_up, g, dtype), *quantize_experts(w_down, g, dtype), g)


def expected(x, ids, weights, gq, gs, gz, dq, ds, dz, g, activation="silu"):
    """`reference.moe` on the dequantized weights in float64, written densely: every expert on
    every token, weighted by how much of the token's routing it got (mostly 0), the
    intermediate rounded to x's dtype as `reference.moe` rounds it. (No index_add_: its OpenMP
    region costs ~0.1 s per call on a loaded 2-core machine.)"""
    e, i = gq.shape[0], gq.shape[1] // 2
    w_gate_up, w_down = dequantized(gq, gs, gz, g, x.shape[1]), dequantized(dq, ds, dz, g, i)
    gate_up = torch.einsum("th,enh->etn", x.double(), w_gate_up)
    hidden = reference.moe_activation(gate_up[..., :i], activation) * gate_up[..., i:]
    y = torch.einsum("eti,ehi->eth", hidden.to(x.dtype).double(), w_down)
    share = (torch.nn.functional.one_hot(ids, e).double() * weights.double()[..., None]).sum(1)
    return (share.T[..., None] * y).sum(0)


def run(path, *args, **kw):
    if path == "triton":
        return kernel.fused_moe_w4a16(*args, **kw)
    return moe_cpu.moe_w4a16(*args, **kw)


def check(path, *args, activation="silu", tol=None, **kw):
    got = run(path, *args, activation, **kw)
    x = args[0]
    assert got.dtype == x.dtype and got.shape == x.shape and got.is_contiguous()
    tol = tol or (TOL if path == "triton" else CPU_TOL)[x.dtype]
    torch.testing.assert_close(got.double(), expected(*args, activation), rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize(("g", "dtype"), [(32, torch.float32), (64, torch.float16),
                                          (128, torch.bfloat16)])
@pytest.mark.parametrize("path", PATHS)
def test_group_sizes_and_dtypes(path, g, dtype):
    # H = 40 padded to 64 or 128, I = 24 to 32..128: K tails inside the last group.
    check(path, *problem(t=6, g=g, dtype=dtype, seed=g))


@pytest.mark.parametrize(("t", "k", "routing"), [(1, 1, "random"), (5, 2, "one"),
                                                 (4, 3, "repeat"), (6, 4, "skewed")])
@pytest.mark.parametrize("path", PATHS)
def test_top_k_and_routings(path, t, k, routing):
    # Over 6 experts: a single token (decode, 5 experts empty), all tokens on two experts, one
    # expert picked twice by a token, expert 0 in every token.
    check(path, *problem(t=t, k=k, routing=routing, h=64, i=20, dtype=torch.bfloat16, seed=k),
          activation="gelu_tanh" if k == 3 else "silu")


@pytest.mark.parametrize("path", PATHS)
def test_odd_sizes(path):
    # H = 37, I = 23: odd byte counts per row (Hp/2 = 32), ragged tiles; fp32 on the CPU path
    # here never meets the bf16 kernel (N = 46 and 37), so it is held to fp32 accuracy.
    args = problem(t=7, k=3, e=5, h=37, i=23, g=32)
    assert int4_cpu.supported(46, 32) and int4_cpu.supported(37, 32)
    check(path, *args, tol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_decode_reads_only_the_chosen_experts(path):
    # The scales of every expert the token did not pick are NaN: reading any would poison it.
    x, ids, weights, gq, gs, gz, dq, ds, dz, g = problem(t=1, k=2, e=8, h=64, i=24)
    unused = torch.ones(8, dtype=torch.bool, device=DEVICE)
    unused[ids[0]] = False
    clean = (gs.clone(), ds.clone())
    gs[unused], ds[unused] = float("nan"), float("nan")
    got = run(path, x, ids, weights, gq, gs, gz, dq, ds, dz, g)
    assert torch.isfinite(got).all()
    want = expected(x, ids, weights, gq, clean[0], gz, dq, clean[1], dz, g)
    tol = (TOL if path == "triton" else CPU_TOL)[x.dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_cpu_path_repacks_each_expert_once(monkeypatch):
    # gate/up (N = 48) goes through ATen's int4 kernel, its per-expert repacks made once and
    # cached on the stacked weight (the quantize pass makes them at compile time); down
    # (N = 40) is dequantized, and only for the experts that were picked.
    args = problem(t=3, k=2, e=6, h=40, i=24, dtype=torch.bfloat16)
    gq, dq = args[3], args[6]
    repacks, dequantized_rows = [], []
    real_repack, real_dequantize = int4_cpu._repack, int4.dequantize
    monkeypatch.setattr(int4_cpu, "_repack", lambda *a: repacks.append(1) or real_repack(*a))
    monkeypatch.setattr(int4, "dequantize",
                        lambda q, *a: dequantized_rows.append(q.shape[0]) or
                        real_dequantize(q, *a))
    int4_cpu.prepare(gq, args[4], args[5], 32)
    int4_cpu.prepare(dq, args[7], args[8], 32)
    assert len(repacks) == 6  # gate/up's six experts; down is not the kernel's shape
    first = moe_cpu.moe_w4a16(*args)
    assert len(repacks) == 6  # nothing repacked at run time
    assert dequantized_rows == [40] * len(args[1].unique())  # down, per expert picked
    assert torch.equal(moe_cpu.moe_w4a16(*args), first)


@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_op(impl):
    args = problem(t=3, dtype=torch.bfloat16, h=64, i=24)
    got = torch.ops.attnopt.moe_w4a16(*args, "silu", impl)
    tol = (TOL if impl != "auto" else CPU_TOL)[torch.bfloat16]
    torch.testing.assert_close(got.double(), expected(*args), rtol=tol, atol=tol)
    if impl == "auto" and DEVICE == "cpu":
        assert torch.equal(got, moe_cpu.moe_w4a16(*args))


def test_empty():
    x, ids, weights, *packed = problem(t=3)
    for fn in (reference.moe_w4a16, moe_cpu.moe_w4a16, kernel.fused_moe_w4a16):
        assert fn(x[:0], ids[:0], weights[:0], *packed).shape == (0, 40)
        got = fn(x, ids[:, :0], weights[:, :0], *packed)
        assert torch.equal(got, torch.zeros_like(x))


def test_fake_shapes_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.library.opcheck(torch.ops.attnopt.moe_w4a16.default,
                          (*problem(t=4, e=3, h=16, i=8), "silu", "auto"))
    with FakeTensorMode():
        bf16, u8 = torch.bfloat16, torch.uint8
        # E = 6, H = 40, I = 24, g = 32: Hp = 64, Ip = 32.
        x, ids, w = torch.empty(11, 40, dtype=bf16), torch.empty(11, 2, dtype=torch.int32), \
            torch.empty(11, 2)
        gate_up = (torch.empty(6, 48, 32, dtype=u8), torch.empty(6, 48, 2, dtype=bf16),
                   torch.empty(6, 48, 2, dtype=bf16))
        down = (torch.empty(6, 40, 16, dtype=u8), torch.empty(6, 40, 1, dtype=bf16),
                torch.empty(6, 40, 1, dtype=bf16))
        out = torch.ops.attnopt.moe_w4a16(x, ids, w, *gate_up, *down, 32)
        assert out.shape == (11, 40) and out.dtype == bf16
        with pytest.raises(ValueError, match=r"gate_up_scales must be .* \[6, 48, 1\]"):
            torch.ops.attnopt.moe_w4a16(x, ids, w, *gate_up, *down, 64)


def test_bad_arguments():
    x, ids, weights, gq, gs, gz, dq, ds, dz, g = problem(t=3)
    with pytest.raises(ValueError, match=r"gate_up_qweight must be \[E, N, Kp/2\] = \[6, 48, 32\]"):
        moe_cpu.moe_w4a16(x, ids, weights, gq[..., :8], gs, gz, dq, ds, dz, g)
    with pytest.raises(ValueError, match=r"down_scales must be a floating \[E, N, Kp/g\]"):
        reference.moe_w4a16(x, ids, weights, gq, gs, gz, dq, ds[..., :0], dz, g)
    with pytest.raises(ValueError, match="group_size must be one of"):
        kernel.fused_moe_w4a16(x, ids, weights, gq, gs, gz, dq, ds, dz, 16)
    with pytest.raises(ValueError, match="uint8"):
        moe_cpu.moe_w4a16(x, ids, weights, gq.int(), gs, gz, dq, ds, dz, g)
    with pytest.raises(ValueError, match="activation"):
        reference.moe_w4a16(x, ids, weights, gq, gs, gz, dq, ds, dz, g, "relu")
    ids[0, 0] = 6
    with pytest.raises(ValueError, match=r"expert id 6, outside \[0, 6\)"):
        moe_cpu.moe_w4a16(x, ids, weights, gq, gs, gz, dq, ds, dz, g)


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_cuda_autotune_spaces_for_int4(g, arch):
    # On CUDA every kept config has K tiles inside one group (and fits: test_moe_kernel.py).
    for configs, w_tiles in ((kernel.GATE_UP_CONFIGS, 2), (kernel.DOWN_CONFIGS, 1)):
        for block_m in (16, 128):
            kept = kernel.keep_configs(configs[arch], arch, 166912, block_m, 2, 0.5, w_tiles, g)
            assert kept and all(g % c.kwargs["BLOCK_K"] == 0 for c in kept)
