"""W4A16 GEMM: out = x @ Wᵀ + bias with W the packed int4 weight of `backends.int4`, see
`reference.w4a16_linear`.

The format: `qweight [N, Kp/2] uint8` holds two 4-bit codes per byte (the even k in the low
nibble), `scales` and `zeros [N, Kp/g]` one scale s and one integer zero point z in [0, 15] per
group of g consecutive k, and W[n, k] = (q[n, k] - z[n, k // g]) · s[n, k // g]. Kp is K rounded
up to g; the padding columns dequantize to exactly 0 and x is read as 0 past K, so they add
nothing.

The fused kernels never form W. Their K tiles (BLOCK_K codes) divide g, so a tile lies inside one
group and its scale is one number per output column n, which factors out of the tile's sum:

    out[m, n] = Σ_groups s[n, G] · Σ_{k ∈ tile} x[m, k] · (q[n, k] - z[n, G]).

q - z is an integer in [-15, 15], exact in fp16 and bf16, so each tile is one tl.dot on exact
operands accumulated in fp32, and the scale multiplies the fp32 tile result: the only roundings
are fp32 ones and the final cast to x's dtype (a kernel that dequantized to bf16 first would
also round every (q - z) · s to 8 significant bits). Bias is added in fp32 in the epilogue.

Paths, chosen by M (the number of rows of x) unless `path` forces one:

- "gemv" (M <= GEMV_MAX_M = 16, decode): memory-bound, so the point is to spread the weight over
  every SM. One program owns a BLOCK_N slice of output columns and one chunk of K for all M rows
  (padded to 16; a forced "gemv" on more rows takes 16-row blocks). The product is computed
  transposed, outᵀ = W · xᵀ ("swap AB"): the weight tile takes the MMA's M side, which needs
  >= 16 (64 on Hopper) rows, and the few activation rows the small N side.
- "splitk" (M <= SPLITK_MAX_M = 64): BLOCK_M x BLOCK_N tiles with tl.dot, and K split into chunks
  so that a handful of row tiles still gives enough programs.
  Both split-K paths write fp32 partials to a workspace [SPLIT_K, M, N]; a second kernel sums
  them in a fixed order (deterministic, unlike atomics, and safe under autotuning, which reruns
  the kernel), adds the bias and casts. With a single chunk the first kernel stores directly.
- "tiled" (larger M): the classic tiled GEMM over the whole K, with the GROUP_M swizzle of the
  Triton matmul tutorial for L2 reuse.
- "dequant" (M >= DEQUANT_MIN_M, CUDA only): one kernel writes W [N, K] in x's dtype, then
  cuBLAS (F.linear). At large M the GEMM is compute-bound, writing and re-reading a 16-bit W
  costs little next to it, and cuBLAS is expected to beat a Triton GEMM that dequantizes in its
  inner loop (to be confirmed by the benchmark, see DEQUANT_MIN_M).

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
from attnopt.backends.triton import interpreting

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


@triton.jit
def _dot(a, b, DOT_IN_FP32: tl.constexpr):
    # "ieee" keeps fp32 inputs in full fp32 rather than TF32. DOT_IN_FP32 is for bf16 under the
    # interpreter, whose tl.dot would multiply numpy's uint16 bit patterns (numpy has no
    # bfloat16); both operands are exact in fp32, so upcasting changes nothing else.
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _weight_tile(qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg, cols, k0, group_size, N,
                 dtype: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(q - z) for columns `cols` and k in [k0, k0 + BLOCK_K) as [BLOCK_N, BLOCK_K] in `dtype`,
    and the tile's scales [BLOCK_N] in fp32. k0 is a multiple of BLOCK_K, which divides the
    group size: the whole tile is in group k0 // group_size. k < Kp always, so only N masks."""
    col_ok = cols < N
    kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    b = tl.load(qw + cols[:, None] * sqn + kb[None, :] * sqk, mask=col_ok[:, None], other=0)
    # Byte j holds codes 2j (low nibble) and 2j + 1 (high): stacking them on a new last axis and
    # flattening it puts the codes back in k order.
    q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))
    g = k0 // group_size
    z = tl.load(zp + cols * szn + g * szg, mask=col_ok, other=0.0).to(tl.float32)
    s = tl.load(sc + cols * ssn + g * ssg, mask=col_ok, other=0.0).to(tl.float32)
    return (q.to(tl.float32) - z[:, None]).to(dtype), s


@triton.jit
def _accumulate(acc, x, sxm, sxk, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg,
                rows, cols, M, N, K, group_size, k_lo, k_hi,
                SWAP_AB: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += x[rows, k_lo:k_hi] @ W[cols, k_lo:k_hi]ᵀ, one BLOCK_K tile at a time: acc is
    [BLOCK_M, BLOCK_N], or its transpose [BLOCK_N, BLOCK_M] when SWAP_AB."""
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x + rows.to(tl.int64) * sxm  # int64: M · K may overflow int32
    row_ok = rows < M
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + offs_k
        w, s = _weight_tile(qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg, cols, k0, group_size, N,
                            x.dtype.element_ty, BLOCK_N, BLOCK_K)
        # x reads 0 past K, where the padding codes give q - z = 0 anyway.
        if SWAP_AB:
            xt = tl.load(x_rows[None, :] + ks[:, None] * sxk,
                         mask=row_ok[None, :] & (ks < K)[:, None], other=0.0)
            acc += _dot(w, xt, DOT_IN_FP32) * s[:, None]
        else:
            xb = tl.load(x_rows[:, None] + ks[None, :] * sxk,
                         mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
            acc += _dot(xb, tl.trans(w), DOT_IN_FP32) * s[None, :]
    return acc


@triton.jit
def _store_out(out, acc, bias, rows, cols, M, N, HAS_BIAS: tl.constexpr):
    """out[rows, cols] = acc + bias, added in fp32 and rounded once to out's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rows.to(tl.int64)[:, None] * N + cols[None, :],
             acc.to(out.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _splitk_kernel(
    part, out, bias, x, sxm, sxk, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg,
    M, N, K, group_size, k_per_split, m_bucket,
    DIRECT: tl.constexpr, SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """"gemv" (SWAP_AB) and "splitk": K chunk program_id(1) of one BLOCK_M x BLOCK_N tile.
    part[split, m, n] = Σ_{k in chunk} x[m, k] W[n, k] in fp32, or, with a single chunk
    (DIRECT), the finished out[m, n]. k_per_split is a multiple of the group size."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate(acc, x, sxm, sxk, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg,
                      rows, cols, M, N, K, group_size, k_lo, k_hi,
                      SWAP_AB, DOT_IN_FP32, BLOCK_N, BLOCK_K)
    if SWAP_AB:
        acc = tl.trans(acc)
    if DIRECT:
        _store_out(out, acc, bias, rows, cols, M, N, HAS_BIAS)
    else:
        _store_out(part + split.to(tl.int64) * M * N, acc, bias, rows, cols, M, N, False)


@triton.jit
def _reduce_kernel(out, part, bias, MN, N, splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out.flat[i] = Σ_s part[s].flat[i] + bias[i % N], in fp32 and in split order."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    p = part + offs
    for _ in range(splits):
        acc += tl.load(p, mask=ok, other=0.0)
        p += MN
    if HAS_BIAS:
        acc += tl.load(bias + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def _tiled_kernel(
    out, bias, x, sxm, sxk, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg,
    M, N, K, group_size, m_bucket,
    HAS_BIAS: tl.constexpr, DOT_IN_FP32: tl.constexpr,
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
                      False, DOT_IN_FP32, BLOCK_N, BLOCK_K)
    _store_out(out, acc, bias, rows, cols, M, N, HAS_BIAS)


@triton.jit
def _dequant_kernel(w, qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg, N, K, group_size,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """"dequant": w[n, k] = (q - z) · s for one BLOCK_N x BLOCK_K tile, in fp32 and rounded
    once to w's dtype (as `int4.dequantize`)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    q, s = _weight_tile(qw, sqn, sqk, sc, ssn, ssg, zp, szn, szg, cols, k0, group_size, N,
                        tl.float32, BLOCK_N, BLOCK_K)
    tl.store(w + cols.to(tl.int64)[:, None] * K + ks[None, :],
             (q * s[:, None]).to(w.dtype.element_ty), mask=(cols < N)[:, None] & (ks < K)[None, :])


# --- configurations: autotuned on CUDA, one small fixed config under the interpreter ----------


def _configs(names: tuple[str, ...], shapes: list[tuple]) -> list[triton.Config]:
    """Configs from (block sizes..., num_warps, num_stages) tuples."""
    return [triton.Config(dict(zip(names, c[:-2], strict=True)), num_warps=c[-2],
                          num_stages=c[-1]) for c in shapes]


# The CUDA search spaces (the interpreter runs one small config each, in `_tuned`).
GEMV_CONFIGS = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
    (16, 32, 128, 2, 4), (16, 64, 128, 4, 3), (16, 128, 128, 4, 3), (16, 64, 64, 4, 4),
    (16, 128, 64, 4, 4), (16, 64, 32, 4, 4), (16, 128, 32, 4, 4)])
SPLITK_CONFIGS = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), [
    (16, 128, 128, 4, 3), (32, 64, 64, 4, 4), (32, 128, 64, 4, 3), (64, 64, 64, 4, 3),
    (64, 128, 64, 4, 3), (64, 128, 128, 8, 3), (32, 64, 32, 4, 4), (64, 64, 32, 4, 4)])
TILED_CONFIGS = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
    (128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (128, 128, 32, 8, 4, 4),
    (64, 64, 32, 8, 4, 4), (128, 128, 128, 8, 8, 3)])


def prune_configs(configs, named_args, **kwargs):
    """A K tile must not straddle groups (BLOCK_K divides the power-of-two group size), and a
    row tile taller than M rounded up to a power of two only multiplies padding (unless no
    config is shorter)."""
    g, m = named_args["group_size"], named_args["m_bucket"]
    fits = [c for c in configs if c.kwargs["BLOCK_K"] <= g]
    shortest = min(c.kwargs["BLOCK_M"] for c in fits)
    return [c for c in fits if c.kwargs["BLOCK_M"] <= max(shortest, m)]


def _tuned(kernel, cuda_configs: list[triton.Config], interp: dict):
    configs = [triton.Config(interp, num_warps=4, num_stages=1)] if interpreting() \
        else cuda_configs
    # m_bucket = next_power_of_2(M): retuning for every distinct M would stall serving.
    return triton.autotune(configs=configs, key=["m_bucket", "N", "K", "group_size"],
                           prune_configs_by={"early_config_prune": prune_configs})(kernel)


_SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
_gemv = _tuned(_splitk_kernel, GEMV_CONFIGS, _SMALL)
_splitk = _tuned(_splitk_kernel, SPLITK_CONFIGS, _SMALL)
# GROUP_M = 2 so that small test shapes already have a ragged last group of row tiles.
_tiled = _tuned(_tiled_kernel, TILED_CONFIGS, {**_SMALL, "GROUP_M": 2})


# --- the entry point ----------------------------------------------------------------------------


def choose_path(m: int, device: torch.device) -> str:
    """The path `w4a16_matmul` takes for M rows when none is forced."""
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= SPLITK_MAX_M:
        return "splitk"
    if device.type == "cuda" and m >= DEQUANT_MIN_M:
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
    path = path or choose_path(m, x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    bias = None if bias is None else bias.contiguous()
    weights = (qweight, *qweight.stride(), scales, *scales.stride(), zeros, *zeros.stride())
    m_bucket = triton.next_power_of_2(m)
    flags = dict(HAS_BIAS=bias is not None,
                 DOT_IN_FP32=interpreting() and x.dtype == torch.bfloat16)

    if path == "dequant":
        w = torch.empty((n, k), dtype=x.dtype, device=x.device)
        bk = min(64, group_size)
        if k:
            _dequant_kernel[(triton.cdiv(n, 64), triton.cdiv(k, bk))](
                w, *weights, n, k, group_size, BLOCK_N=64, BLOCK_K=bk)
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
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            split_k = default_splits(sms, tiles, k)
    chunk = k_per_split(k, group_size, split_k)
    splits = max(1, triton.cdiv(k, chunk))
    part = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32,
                                               device=x.device)
    kernel = _gemv if path == "gemv" else _splitk
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits, triton.cdiv(m, meta["BLOCK_M"]))
    kernel[grid](part, out, bias, x, *x.stride(), *weights, m, n, k, group_size, chunk, m_bucket,
                 DIRECT=splits == 1, SWAP_AB=path == "gemv", **flags)
    if splits > 1:
        block = 1024
        _reduce_kernel[(triton.cdiv(m * n, block),)](out, part, bias, m * n, n, splits,
                                                     HAS_BIAS=flags["HAS_BIAS"], BLOCK=block)
    return out
