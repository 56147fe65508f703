"""W4A16 GEMM: out = x @ Wᵀ + bias with W the packed int4 weight of `backends.int4`, see
`reference.w4a16_linear`.

The format: `qweight [N, Kp/2] uint8` holds two 4-bit codes per byte (the even k in the low
nibble), `scales` and `zeros [N, Kp/g]` one scale s and one integer zero point z in [0, 15] per
group of g consecutive k, and W[n, k] = (q[n, k] - z[n, k // g]) · s[n, k // g]. Kp is K rounded
up to g; the padding columns dequantize to exactly 0 and x is read as 0 past K, so they add
nothing.

The fused kernels never write W. Each K tile (BLOCK_K codes, a divisor of g, so the tile lies
in one group) is dequantized in registers, (q - z) · s computed in fp32 and rounded once to x's
dtype: exactly the weight `int4.dequantize(..., dtype=x.dtype)` gives and the "dequant" path
hands cuBLAS, so every path multiplies the same 16-bit W. The tile then goes into one tl.dot
that accumulates in fp32 in place (`acc = dot(a, b, acc)`): no per-tile epilogue sits between
two products, so the tensor-core pipeline (wgmma on Hopper) overlaps the MMAs with the next
tiles' loads. (Applying the scale to each tile's product instead, `acc += dot(x, q - z) · s`,
keeps (q - z) · s unrounded but makes every iteration wait for its MMA to finish.) Bias is
added in fp32 in the epilogue and the result rounded once to x's dtype.

fp32 activations: on TF32 tensor cores when PyTorch's matmul precision allows it
(`tuning.tf32_allowed`), otherwise the automatic choice is "dequant", which hands the fp32
product to cuBLAS (full fp32, as `F.linear` would do it). Under the interpreter the kernels
multiply in full fp32 ("ieee"), and bf16 (which numpy lacks) runs as fp32 tiles holding bf16
values, rounded to the nearest as the GPU rounds (`_round_to_bf16`; the interpreter's own
conversion truncates), so the interpreter computes what the GPU computes.

Paths, chosen by M (the number of rows of x) unless `path` forces one:

- "gemv" (M <= GEMV_MAX_M = 16, decode): memory-bound, so the point is to spread the weight over
  every SM. One program owns a BLOCK_N slice of output columns and one chunk of K for all M rows
  (padded to 16; a forced "gemv" on more rows takes 16-row blocks). The product is computed
  transposed, outᵀ = W · xᵀ ("swap AB"): the weight tile takes the MMA's M side, which needs
  >= 16 (64 for wgmma) rows, and the few activation rows the small N side.
- "splitk" (M <= SPLITK_MAX_M = 64): BLOCK_M x BLOCK_N tiles with tl.dot, and K split into chunks
  so that a handful of row tiles still gives enough programs.
  Both split-K paths are one launch ("serial split-K"): every program writes its chunk's fp32
  partial tile to a workspace [SPLIT_K, M, N], then counts itself in on an arrival counter of
  its output tile (an acq_rel atomic, after a barrier so the whole tile is written); the
  program that arrives last sums the partials in split order (deterministic, unlike atomics on
  the output, and safe under autotuning, which reruns the kernel), adds the bias, casts, and
  resets the counter to 0 for the next launch. The counters are allocated zeroed once per
  device and stream (`_arrival_counters`) and left zeroed by every launch; the workspace comes
  from PyTorch's caching allocator. A decode step therefore makes one launch, no host sync and
  no device query (the SM count is read once per device, `tuning.device_info`). With a single
  chunk the program stores the output directly.
- "tiled" (larger M): the classic tiled GEMM over the whole K, with the GROUP_M swizzle of the
  Triton matmul tutorial for L2 reuse.
- "dequant" (M >= DEQUANT_MIN_M on CUDA, and fp32 without TF32): one kernel writes W [N, K] in
  x's dtype, then cuBLAS (F.linear). At large M the GEMM is compute-bound, writing and re-reading
  a 16-bit W costs little next to it, and cuBLAS is expected to beat a Triton GEMM that
  dequantizes in its inner loop (to be confirmed by the benchmark, see DEQUANT_MIN_M).

Configs are autotuned per architecture (`tuning.autotune`; the lists are those the compile
audit, `attnopt.backends.triton.audit`, finds free of spills and within shared memory on sm_80
and sm_90), keyed by the bucket of M (`tuning.bucket`), N, K and the group size.

x is read through its strides (a transposed or sliced x is never copied); so are the weight
tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from attnopt.backends.int4 import GROUP_SIZES
from attnopt.backends.triton import interpreting, tuning

PATHS = ("gemv", "splitk", "tiled", "dequant")
# M <= GEMV_MAX_M: "gemv"; M <= SPLITK_MAX_M: "splitk"; otherwise "tiled" (or "dequant", below).
GEMV_MAX_M = 16
SPLITK_MAX_M = 64
# On CUDA, M >= DEQUANT_MIN_M takes "dequant" (dequantize once, then cuBLAS). A placeholder: this
# crossover is to be read off `python -m benchmarks.w4a16` (rows "dequant" vs "tiled") on the
# target GPU; it could not be measured where this kernel was written (no GPU).
DEQUANT_MIN_M = 1024
# The split-K paths aim for this many programs per SM, and give each K chunk at least
# MIN_K_PER_SPLIT codes so that the partials stay small next to the weight reads.
PROGRAMS_PER_SM = 4
MIN_K_PER_SPLIT = 256
# The smallest BLOCK_M and BLOCK_N of any config: the arrival counters cover that many tiles.
MIN_TILE = 16
# Launches of one call, by path (`tests/backends/test_launch_counts.py` holds them to it).
LAUNCHES = {"gemv": 1, "splitk": 1, "tiled": 1, "dequant": 2}


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc + a @ b, accumulated by the MMA itself. PRECISION ("tf32" or "ieee") matters for
    fp32 operands only. DOT_IN_FP32 is for bf16 under the interpreter, whose tl.dot would
    multiply numpy's uint16 bit patterns (numpy has no bfloat16); both operands are exact in
    fp32, so upcasting changes nothing else."""
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _round_to_bf16(x):
    """x rounded to the nearest bf16 (ties to even), kept in fp32: the GPU's fp32 → bf16
    conversion. The interpreter's conversion truncates, so it emulates this one instead."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _weight_tile(qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg, cols, k0, group_size, N,
                 dtype: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """W[cols, k0:k0 + BLOCK_K] as [BLOCK_N, BLOCK_K] in `dtype`: (q - z) · s in fp32, rounded
    once (bf16 under the interpreter, DOT_IN_FP32: the same rounded values, held in fp32). k0
    is a multiple of BLOCK_K, which divides the group size: the whole tile is in group
    k0 // group_size. k < Kp always, so only N masks."""
    col_ok = cols < N
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    b = tl.load(qw + cols[:, None] * sqn + kb[None, :] * sqk, mask=col_ok[:, None], other=0)
    # Byte j holds codes 2j (low nibble) and 2j + 1 (high): stacking them on a new last axis and
    # flattening it puts the codes back in k order.
    q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))
    g = k0 // group_size
    z = tl.load(zp + cols * szn + g * szg, mask=col_ok, other=0.0).to(tl.float32)
    s = tl.load(sc + cols * ssn + g * ssg, mask=col_ok, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - z[:, None]) * s[:, None]
    if DOT_IN_FP32:
        return _round_to_bf16(w)
    return w.to(dtype)


@triton.jit
def _accumulate(acc, x, sxm, sxk, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg,
                rows, cols, M, N, K, group_size, k_lo, k_hi,
                SWAP_AB: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[rows, k_lo:k_hi] @ W[cols, k_lo:k_hi]ᵀ, one BLOCK_K tile at a time: acc is
    [BLOCK_M, BLOCK_N], or its transpose [BLOCK_N, BLOCK_M] when SWAP_AB."""
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x + rows.to(tl.int64) * sxm  # int64: M · K may overflow int32
    row_ok = rows < M
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        w = _weight_tile(qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg, cols, k0, group_size, N,
                         x.dtype.element_ty, DOT_IN_FP32, BLOCK_N, BLOCK_K)
        # x reads 0 past K, where the padding codes give W = 0 anyway.
        if SWAP_AB:
            xt = tl.load(x_rows[None, :] + ks[:, None] * sxk,
                         mask=row_ok[None, :] & (ks < K)[:, None], other=0.0)
            acc = _dot(w, xt, acc, PRECISION, DOT_IN_FP32)
        else:
            xb = tl.load(x_rows[:, None] + ks[None, :] * sxk,
                         mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
            acc = _dot(xb, tl.trans(w), acc, PRECISION, DOT_IN_FP32)
    return acc


@triton.jit
def _store_out(out, acc, bias, rows, cols, M, N, HAS_BIAS: tl.constexpr,
               DOT_IN_FP32: tl.constexpr):
    """out[rows, cols] = acc + bias, added in fp32 and rounded once to out's dtype (to the
    nearest, also under the interpreter, DOT_IN_FP32)."""
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if DOT_IN_FP32:
        acc = _round_to_bf16(acc)
    tl.store(out + rows.to(tl.int64)[:, None] * N + cols[None, :],
             acc.to(out.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _splitk_kernel(
    part, counters, out, bias, x, sxm, sxk, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg,
    M, N, K, group_size, k_per_split, splits, m_bucket,
    SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """"gemv" (SWAP_AB) and "splitk": K chunk program_id(1) of one BLOCK_M x BLOCK_N tile.
    With several chunks, part[split, m, n] = Σ_{k in chunk} x[m, k] W[n, k] in fp32, and the
    last chunk of the tile to finish writes out = Σ_split part[split] + bias; with one chunk
    (splits == 1, a compile-time constant by the JIT's specialization) it writes out itself.
    k_per_split is a multiple of the group size."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate(acc, x, sxm, sxk, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg,
                      rows, cols, M, N, K, group_size, k_lo, k_hi,
                      SWAP_AB, PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_K)
    if SWAP_AB:
        acc = tl.trans(acc)
    if splits == 1:
        _store_out(out, acc, bias, rows, cols, M, N, HAS_BIAS, DOT_IN_FP32)
    else:
        tile = (rows.to(tl.int64)[:, None] * N + cols[None, :])
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        tl.store(part + split.to(tl.int64) * M * N + tile, acc, mask=ok)
        # Every thread's partial is written before the counter moves (barrier), and the release
        # half of the atomic publishes them to the program that arrives last (acquire).
        tl.debug_barrier()
        counter = counters + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(splits):  # in split order: the sum does not depend on who was last
                # .cg reads L2, never a line of an earlier launch left in this SM's L1.
                total += tl.load(part + s * M * N + tile, mask=ok, other=0.0,
                                 cache_modifier=".cg")
            _store_out(out, total, bias, rows, cols, M, N, HAS_BIAS, DOT_IN_FP32)
            tl.atomic_xchg(counter, 0, sem="relaxed")  # zeroed for the next launch


@triton.jit
def _tiled_kernel(
    out, bias, x, sxm, sxk, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg,
    M, N, K, group_size, m_bucket,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """"tiled": out[tile] for one BLOCK_M x BLOCK_N tile over the whole K."""
    # Swizzle: consecutive programs take GROUP_M row tiles down one column of tiles before
    # moving right, so programs running together share their x rows and weight columns in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate(acc, x, sxm, sxk, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg,
                      rows, cols, M, N, K, group_size, 0, K,
                      False, PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_K)
    _store_out(out, acc, bias, rows, cols, M, N, HAS_BIAS, DOT_IN_FP32)


@triton.jit
def _dequant_kernel(w, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg, N, K, group_size,
                    DOT_IN_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """"dequant": w[n, k] = (q - z) · s for one BLOCK_N x BLOCK_K tile, in fp32 and rounded
    once to w's dtype (as `int4.dequantize`)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    tile = _weight_tile(qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg, cols, k0, group_size, N,
                        w.dtype.element_ty, DOT_IN_FP32, BLOCK_N, BLOCK_K)
    tl.store(w + cols.to(tl.int64)[:, None] * K + ks[None, :], tile,
             mask=(cols < N)[:, None] & (ks < K)[None, :])


# --- configurations: autotuned per arch on CUDA, one small fixed config under the interpreter ---


def _configs(names: tuple[str, ...], shapes: list[tuple]) -> list[triton.Config]:
    """Configs from (block sizes..., num_warps, num_stages) tuples."""
    return [triton.Config(dict(zip(names, c[:-2], strict=True)), num_warps=c[-2],
                          num_stages=c[-1]) for c in shapes]


_GEMV = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_TILED = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
# The CUDA search spaces per arch: every config compiles without spills and within the arch's
# shared memory for fp16 and bf16 activations, and so does every config `prune_configs` keeps
# for TF32 (checked by the compile audit, `python -m attnopt.backends.triton.audit --full`).
# The first config of each list is the one a bucket first seen during CUDA-graph capture runs.
# sm_80 lacks two large tiled configs that spill there: wgmma keeps its accumulator in fewer
# registers than mma.sync does for the same tile.
_SHARED_GEMV = [(16, 64, 128, 4, 3), (16, 32, 128, 2, 4), (16, 128, 128, 4, 3), (16, 64, 64, 4, 4),
                (16, 128, 64, 4, 4), (16, 64, 32, 4, 4), (16, 128, 32, 4, 4)]
_SHARED_SPLITK = [(32, 64, 64, 4, 4), (16, 128, 128, 4, 3), (32, 128, 64, 4, 3),
                  (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 128, 8, 3),
                  (32, 64, 32, 4, 4), (64, 64, 32, 4, 4)]
_SHARED_TILED = [(128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
                 (64, 64, 64, 8, 4, 4), (128, 128, 32, 8, 4, 4), (64, 64, 32, 8, 4, 4)]
GEMV_CONFIGS = {arch: _configs(_GEMV, _SHARED_GEMV) for arch in tuning.ARCHS}
SPLITK_CONFIGS = {arch: _configs(_GEMV, _SHARED_SPLITK) for arch in tuning.ARCHS}
TILED_CONFIGS = {
    "sm80": _configs(_TILED, _SHARED_TILED),
    "sm90": _configs(_TILED, [*_SHARED_TILED, (128, 256, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3)]),
}
# TF32 tiles take twice the registers and shared memory of 16-bit ones: operand tiles of at
# most FP32_MAX_OPERAND elements and accumulators of at most FP32_MAX_ACC.
FP32_MAX_OPERAND = 64 * 128
FP32_MAX_ACC = 64 * 64


def _fits_fp32(c: triton.Config) -> bool:
    m, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    return max(m * k, n * k) <= FP32_MAX_OPERAND and m * n <= FP32_MAX_ACC


def prune_configs(configs: list[triton.Config], named_args: dict) -> list[triton.Config]:
    """A K tile must not straddle groups (BLOCK_K divides the power-of-two group size), fp32
    activations take only the smaller tiles (`_fits_fp32`), and a row tile taller than the
    bucket of M only multiplies padding (unless no config is shorter)."""
    g, m = named_args["group_size"], named_args["m_bucket"]
    fits = [c for c in configs if c.kwargs["BLOCK_K"] <= g]
    if named_args["x"].dtype == torch.float32:
        fits = [c for c in fits if _fits_fp32(c)]
    shortest = min(c.kwargs["BLOCK_M"] for c in fits)
    return [c for c in fits if c.kwargs["BLOCK_M"] <= max(shortest, m)]


def _tuned(kernel, configs: dict[str, list[triton.Config]], interp: dict):
    return tuning.autotune(configs, key=["m_bucket", "N", "K", "group_size"],
                           interpreter_config=triton.Config(interp, num_warps=4, num_stages=1),
                           prune=prune_configs)(kernel)


_SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
_gemv = _tuned(_splitk_kernel, GEMV_CONFIGS, _SMALL)
_splitk = _tuned(_splitk_kernel, SPLITK_CONFIGS, _SMALL)
# GROUP_M = 2 so that small test shapes already have a ragged last group of row tiles.
_tiled = _tuned(_tiled_kernel, TILED_CONFIGS, {**_SMALL, "GROUP_M": 2})


# --- the entry point ----------------------------------------------------------------------------


def choose_path(m: int, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The path `w4a16_matmul` takes for M rows of `dtype` activations when none is forced."""
    cuda = device.type == "cuda"
    if cuda and dtype == torch.float32 and not tuning.tf32_allowed():
        return "dequant"  # full fp32: cuBLAS, not FMA products in the Triton kernel
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= SPLITK_MAX_M:
        return "splitk"
    if cuda and m >= DEQUANT_MIN_M:
        return "dequant"
    return "tiled"


def default_splits(sms: int, tiles: int, k: int) -> int:
    """K chunks for `tiles` output tiles on `sms` SMs: enough that the programs fill the GPU
    (PROGRAMS_PER_SM each), none shorter than MIN_K_PER_SPLIT codes."""
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, tiles), k // MIN_K_PER_SPLIT))


def k_per_split(k: int, group_size: int, splits: int) -> int:
    """Codes per K chunk for about `splits` chunks, in whole groups (the K tiles must not
    straddle a chunk boundary, and a chunk must start at a group)."""
    groups = max(1, triton.cdiv(k, group_size))
    return triton.cdiv(groups, max(1, min(splits, groups))) * group_size


_counters: dict[tuple, Tensor] = {}
_outgrown: list[Tensor] = []


def _arrival_counters(device: torch.device, tiles: int) -> Tensor:
    """At least `tiles` int32 counters, all 0, for the serial split-K reduction. Every launch
    leaves them 0, so they are zeroed once, when first allocated (or grown), not per call. One
    set per device and stream: launches on one stream run one after another, while two streams
    could interleave two launches' counts. An outgrown set is kept alive, never freed: a CUDA
    graph captured earlier on this stream still points at it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    buf = _counters.get((device, stream))
    if buf is None or buf.numel() < tiles:
        if buf is not None:
            _outgrown.append(buf)
        size = max(tiles, 4096, 2 * (0 if buf is None else buf.numel()))
        buf = _counters[(device, stream)] = torch.zeros(size, dtype=torch.int32, device=device)
    return buf


def _check(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
           bias: Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"w4a16_matmul takes x [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"w4a16_matmul supports fp16, bf16 and fp32 activations, got {x.dtype}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"qweight must be [N, Kp/2] uint8, got {qweight.dtype} "
                        f"{tuple(qweight.shape)}")
    n, kp = qweight.shape[0], 2 * qweight.shape[1]
    if kp % group_size or x.shape[1] > kp:
        raise ValueError(f"x has K={x.shape[1]} but qweight {tuple(qweight.shape)} holds "
                         f"Kp={kp} codes per row (K rounded up to group_size={group_size})")
    groups = (n, kp // group_size)
    if tuple(scales.shape) != groups or tuple(zeros.shape) != groups:
        raise ValueError(f"scales and zeros must be {list(groups)}, got "
                         f"{list(scales.shape)} and {list(zeros.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")


def w4a16_matmul(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None = None,
    *,
    path: str | None = None,
    split_k: int | None = None,
) -> Tensor:
    """x [M, K] (fp16/bf16; fp32 accepted) → x @ Wᵀ + bias as a contiguous [M, N] in x.dtype.

    `path` forces one of PATHS (default: `choose_path(M)`); `split_k` forces the number of K
    chunks of "gemv" and "splitk" (rounded so that every chunk is whole groups). Both are for
    tests and benchmarks.
    """
    if path is not None and path not in PATHS:
        raise ValueError(f"path={path!r} is not one of {PATHS}")
    _check(x, qweight, scales, zeros, group_size, bias)
    m, k = x.shape
    n = qweight.shape[0]
    path = path or choose_path(m, x.device, x.dtype)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    bias = None if bias is None else bias.contiguous()
    weights = (qweight, *qweight.stride(), scales, *scales.stride(), zeros, *zeros.stride())
    m_bucket = tuning.bucket(m)
    tf32 = x.dtype == torch.float32 and not interpreting() and tuning.tf32_allowed()
    flags = dict(HAS_BIAS=bias is not None, PRECISION="tf32" if tf32 else "ieee",
                 DOT_IN_FP32=interpreting() and x.dtype == torch.bfloat16)

    if path == "dequant":
        w = torch.empty((n, k), dtype=x.dtype, device=x.device)
        bk = min(64, group_size)
        if k:
            _dequant_kernel[(triton.cdiv(n, 64), triton.cdiv(k, bk))](
                w, *weights, n, k, group_size, DOT_IN_FP32=flags["DOT_IN_FP32"], BLOCK_N=64,
                BLOCK_K=bk)
        if bias is None or bias.dtype == x.dtype:
            return F.linear(x, w, bias)  # the GEMM adds a same-dtype bias to its fp32 result
        return (F.linear(x, w).float() + bias.float()).to(x.dtype)

    if path == "tiled":
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _tiled[grid](out, bias, x, *x.stride(), *weights, m, n, k, group_size, m_bucket,
                     **flags)
        return out

    # "gemv" / "splitk". Chunks are counted for nominal 64 x 64 tiles: autotuning may pick
    # others, which moves the programs per SM by a small factor.
    if split_k is None:
        if interpreting():
            split_k = 2
        else:
            tiles = triton.cdiv(n, 64) * (1 if path == "gemv" else triton.cdiv(m, 64))
            split_k = default_splits(tuning.device_info(x.device).sms, tiles, k)
    chunk = k_per_split(k, group_size, split_k)
    splits = max(1, triton.cdiv(k, chunk))
    if splits == 1:
        part = counters = out  # unused: the kernel stores the output directly
    else:
        part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        counters = _arrival_counters(x.device, triton.cdiv(m, MIN_TILE) * triton.cdiv(n, MIN_TILE))
    kernel = _gemv if path == "gemv" else _splitk
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits, triton.cdiv(m, meta["BLOCK_M"]))
    kernel[grid](part, counters, out, bias, x, *x.stride(), *weights, m, n, k, group_size, chunk,
                 splits, m_bucket, SWAP_AB=path == "gemv", **flags)
    return out
