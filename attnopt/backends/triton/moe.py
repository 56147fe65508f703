"""Fused mixture-of-experts: the routed experts of a sparse MoE block, see `reference.moe`:

    out[t] = Σ_j w[t, j] · W_down[e] (act(W_gate[e] x[t]) ⊙ W_up[e] x[t]),   e = ids[t, j],

with W_gate[e] = w_gate_up[e, :I] and W_up[e] = w_gate_up[e, I:] — or any `ExpertForm`: gate and
up interleaved (rows 2n and 2n + 1), GPT-OSS's clamped SwiGLU, per-expert biases on gate/up and
down, the routing weight on the input (Llama-4). Those are epilogue (and prologue) changes of
the same kernels, chosen by constexpr flags: the biases are added to the fp32 accumulators,
the gating is computed on them, the input tile is scaled by its pair's weight. The design is
vLLM's
fused_moe, written from the math. Number the S = T·k (token, expert) pairs p = t·k + j (so
token t = p // k). The work of expert e is two GEMMs over the rows {p : ids.flat[p] = e}; once
the pairs are grouped by expert, every expert's rows are one contiguous run and both
projections are grouped GEMMs over runs:

1. Align (`align_block_size`, three small kernels). Count the pairs of each expert (an atomic
   add per pair, whose old value is the pair's rank within its expert), pad each count up to a
   multiple of BLOCK_M, and lay the runs out back to back: `sorted_ids` holds, for each expert
   in turn, its pair indices followed by the sentinel S up to the padded end. A block of
   BLOCK_M consecutive entries then belongs to exactly one expert, `expert_of_block[b]`, and
   `num_post_padded` (on the device: no host sync) says where the real blocks end. An expert
   with no pairs has no blocks, so at decode only the chosen experts' weights are ever read.
   The grid is sized for the most blocks any routing can need,
   (S + min(E, S) · (BLOCK_M - 1)) // BLOCK_M, and programs past `num_post_padded` exit at
   once (a fixed grid also keeps the op capturable in a CUDA graph).
2. Gate/up GEMM (`_gate_up_kernel`). One program per (block, BLOCK_N columns of I): it gathers
   the x rows of the block's pairs, multiplies them by the same columns of W_gate[e] and of
   W_up[e] into two fp32 accumulators, adds the biases, and stores gated(gate, up), rounded
   once to x's dtype, into h[p] ([S, I], in pair order).
3. Down GEMM (`_down_kernel`). One program per (block, BLOCK_N columns of H, K chunk): h rows
   of the block times W_down[e]ᵀ in fp32 (plus the bias, in chunk 0 only), times the routing
   weight w.flat[p] in fp32, stored in fp32 to part[chunk, p] ([SPLIT_K, T, k, H]).
   Splitting K (= I) keeps the GPU busy at decode, when there are only k blocks.
4. Sum (`_sum_kernel`). out[t] = Σ_j Σ_chunk part[chunk, t, j], in fp32 and in a fixed order,
   rounded once to x's dtype. No atomics on the output: the result is deterministic (the order
   of pairs inside a block, which the atomic ranks make arbitrary, changes nothing, since rows
   of a GEMM tile are computed independently).

Precision is `reference.moe`'s: fp32 accumulation, act(gate) ⊙ up rounded to x's dtype once
(the second GEMM's operand), routing weights and the sum over k in fp32.

Token chunks of at most MAX_PAIRS pairs go through 1-4 in turn, which bounds the workspaces
(h and part) at large T. All address arithmetic on pair, token and expert indices is in int64.
Out-of-range expert ids are not checked (that would need a device sync): the align step skips
such pairs and the sum treats them as 0, so nothing is read or written out of bounds;
`reference.moe` and the CPU path raise instead.

BLOCK_M is chosen on the host from the average number of rows per expert (`choose_block_m`),
before the align step that depends on it; the other tile sizes are autotuned on CUDA, one small
config under the interpreter.

Int4 expert weights (`fused_moe_w4a16`, `attnopt::moe_w4a16`): the same steps, with both GEMM
kernels compiled with INT4 set. Their weight tiles are then read as packed codes (each expert
matrix in the layout of `backends.int4`: [N, Kp/2] uint8, one scale and zero per group along K)
and unpacked in registers as `triton/w4a16.py` does it (`_weight_tile`): q - z is an integer,
exact in x's dtype, so each tile is one tl.dot on exact operands accumulated in fp32, and the
group's scale multiplies the fp32 tile product. BLOCK_K divides the group size (configs are
capped to it), and the down GEMM's K chunks are whole granules, so no tile straddles a group.
Precision is then the float kernel's on the dequantized weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.backends import reference
from attnopt.backends.reference import ExpertForm
from attnopt.backends.triton import interpreting

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "swiglu_oai": 3}
# Pairs (tokens · top-k) per pass; larger batches go through in token chunks.
MAX_PAIRS = 65536
# The down GEMM splits I so that about PROGRAMS_PER_SM programs run per SM, each chunk at least
# MIN_K_PER_SPLIT long and a multiple of SPLIT_GRANULE (which every BLOCK_K divides).
PROGRAMS_PER_SM = 4
MIN_K_PER_SPLIT = 256
SPLIT_GRANULE = 256
# Block heights by average rows per expert: up to 16 rows -> 16, 64 -> 32, 512 -> 64, else 128.
# A placeholder heuristic from vLLM's defaults, to be tuned with `python -m benchmarks.moe`.
BLOCK_M_STEPS = ((16, 16), (64, 32), (512, 64))
BLOCK_M_MAX = 128


# --- align: sort the pairs by expert, padded to BLOCK_M -----------------------------------------


@triton.jit
def _count_kernel(ids, counts, rank, S, E, BLOCK: tl.constexpr):
    """counts[e] += 1 for each pair of expert e; rank[p] = the count before (p's place in e)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < S
    e = tl.load(ids + offs, mask=ok, other=-1)
    ok = ok & (e >= 0) & (e < E)  # before any narrowing cast, so a huge int64 id cannot wrap
    r = tl.atomic_add(counts + e.to(tl.int32), 1, mask=ok, sem="relaxed")
    tl.store(rank + offs, r, mask=ok)


@triton.jit
def _offsets_kernel(counts, start, expert_of_block, num_post_padded, sorted_ids, S, E,
                    max_blocks, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr,
                    BLOCK_B: tl.constexpr):
    """One program: the padded runs [start[e], end[e]) of the experts, the sentinel S in the
    padding of each run, the expert of every block (-1 past the last), and their total."""
    es = tl.arange(0, E_POW2)
    e_ok = es < E
    c = tl.load(counts + es, mask=e_ok, other=0)
    padded = (c + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    begin = end - padded
    tl.store(start + es, begin, mask=e_ok)
    total = tl.sum(padded, 0)
    tl.store(num_post_padded, total)
    # Each run's padding is shorter than BLOCK_M: one [E, BLOCK_M] tile covers all of them.
    slots = (begin + c)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_ids + slots, tl.zeros(slots.shape, tl.int32) + S,
             mask=e_ok[:, None] & (slots < end[:, None]))
    # Block b starts at row b · BLOCK_M and lies in the run of the expert e for which exactly
    # e runs end at or before that row (empty runs included).
    for b0 in range(0, max_blocks, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        first = bs * BLOCK_M
        e_of = tl.sum(((end[None, :] <= first[:, None]) & e_ok[None, :]).to(tl.int32), 1)
        tl.store(expert_of_block + bs, tl.where(first < total, e_of, -1), mask=bs < max_blocks)


@triton.jit
def _scatter_kernel(ids, rank, start, sorted_ids, S, E, BLOCK: tl.constexpr):
    """sorted_ids[start[e] + rank[p]] = p for every pair p of expert e."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < S
    e = tl.load(ids + offs, mask=ok, other=-1)
    ok = ok & (e >= 0) & (e < E)
    e = e.to(tl.int32)
    slot = tl.load(start + e, mask=ok, other=0) + tl.load(rank + offs, mask=ok, other=0)
    tl.store(sorted_ids + slot, offs.to(tl.int32), mask=ok)


class Alignment(NamedTuple):
    """The pairs sorted by expert in runs padded to block_m (see the module docstring)."""

    sorted_ids: Tensor  # [max_blocks · block_m] int32: pair indices, S in the padding
    expert_of_block: Tensor  # [max_blocks] int32: the expert of each block, -1 past the last
    num_post_padded: Tensor  # [1] int32: rows in use (a multiple of block_m)
    max_blocks: int  # the most blocks any routing of these pairs can need
    block_m: int


def max_blocks(pairs: int, num_experts: int, block_m: int) -> int:
    """Σ_e ceil(count_e / block_m) over the at most min(E, S) non-empty experts is at most
    (S + min(E, S) · (block_m - 1)) / block_m."""
    return (pairs + min(num_experts, pairs) * (block_m - 1)) // block_m


def align_block_size(ids: Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the pairs of flat expert ids `ids` [S] by expert, each run padded to block_m."""
    s = ids.numel()
    dev = ids.device
    if s + num_experts * block_m >= 2**31:
        raise ValueError(f"{s} pairs are too many for one pass (int32 slots); use token chunks")
    nb = max_blocks(s, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    rank = torch.empty(s, dtype=torch.int32, device=dev)
    start = torch.empty(num_experts, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    expert_of_block = torch.empty(nb, dtype=torch.int32, device=dev)
    num_post_padded = torch.empty(1, dtype=torch.int32, device=dev)
    block = 1024
    grid = (triton.cdiv(s, block),)
    _count_kernel[grid](ids, counts, rank, s, num_experts, BLOCK=block)
    _offsets_kernel[(1,)](counts, start, expert_of_block, num_post_padded, sorted_ids, s,
                          num_experts, nb, BLOCK_M=block_m,
                          E_POW2=triton.next_power_of_2(num_experts), BLOCK_B=256)
    _scatter_kernel[grid](ids, rank, start, sorted_ids, s, num_experts, BLOCK=block)
    return Alignment(sorted_ids, expert_of_block, num_post_padded, nb, block_m)


# --- the grouped GEMMs --------------------------------------------------------------------------


@triton.jit
def _dot(a, b, DOT_IN_FP32: tl.constexpr):
    # "ieee" keeps fp32 inputs in full fp32 rather than TF32. DOT_IN_FP32 is for bf16 under the
    # interpreter, whose tl.dot would multiply numpy's uint16 bit patterns (numpy has no
    # bfloat16); bf16 products are exact in fp32, so upcasting changes nothing else.
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _weight_tile(w, cols, col_ok, k0, k_hi, swn, swk, sc, ssn, ssg, zp, szn, szg, group_size,
                 dtype: tl.constexpr, INT4: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile W[cols, k0:k0 + BLOCK_K]ᵀ of one expert's weight (w points
    at the expert), and the tile's scales [BLOCK_N] in fp32 (ones for a float weight).

    A float weight is loaded as it is, 0 outside k < k_hi and col_ok. An int4 weight (INT4: the
    packed format of `backends.int4`, w the uint8 codes [N, Kp/2]) is unpacked in registers as
    in `triton/w4a16.py`: the tile's bytes, their nibbles split and interleaved back into k
    order, the group's zero point subtracted, giving q - z, an integer exact in `dtype`. k0 is
    a multiple of BLOCK_K, which divides the group size, so the tile lies in one group and its
    scale is one number per column, which the caller applies to the fp32 product. The codes
    past K (up to K rounded up to the group) dequantize to 0 and k0 < K, so the bytes need no
    K mask; the activations are 0 there anyway."""
    if INT4:
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(w + cols[:, None] * swn + kb[None, :] * swk, mask=col_ok[:, None], other=0)
        # Byte j holds codes 2j (low nibble) and 2j + 1 (high): stacking them on a new last
        # axis and flattening it puts the codes back in k order.
        q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))
        g = k0 // group_size
        z = tl.load(zp + cols * szn + g * szg, mask=col_ok, other=0.0).to(tl.float32)
        s = tl.load(sc + cols * ssn + g * ssg, mask=col_ok, other=0.0).to(tl.float32)
        return tl.trans((q.to(tl.float32) - z[:, None]).to(dtype)), s
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        tile = tl.load(w + cols[None, :] * swn + ks[:, None] * swk,
                       mask=(ks < k_hi)[:, None] & col_ok[None, :], other=0.0)
        return tile, tl.full([BLOCK_N], 1.0, tl.float32)


@triton.jit
def _gated(g, u, alpha, limit, ACT: tl.constexpr):
    """h = act(g) ⊙ u with silu(g) = g σ(g); gelu(g) = g Φ(g) = g (1 + erf(g / √2)) / 2; its
    tanh form g (1 + tanh(v)) / 2 = g σ(2v), v = √(2/π) (g + 0.044715 g³); or GPT-OSS's
    clamped SwiGLU (ACT 3), (clamp(u, -limit, limit) + 1) ⊙ g' σ(alpha g'), g' = min(g, limit).
    The clamps are comparisons, so a NaN stays NaN as in torch.clamp."""
    if ACT == 0:
        return g * tl.sigmoid(g) * u
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * u
    elif ACT == 2:
        return g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g)) * u
    else:
        g = tl.where(g > limit, limit, g)
        u = tl.where(u > limit, limit, tl.where(u < -limit, -limit, u))
        return (u + 1.0) * (g * tl.sigmoid(g * alpha))


@triton.jit
def _tile(pid, max_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (row block, column tile) of program `pid`. Swizzled as in the Triton matmul
    tutorial: GROUP_M consecutive blocks (mostly of one expert, so sharing its weight tile in
    L2) go down a column of tiles before moving right."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(max_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _rows(pid_m, sorted_ids, expert_of_block, S, BLOCK_M: tl.constexpr):
    """The pair indices of block pid_m (int64), which of them are real (not padding), and the
    block's expert."""
    pairs = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    e = tl.load(expert_of_block + pid_m).to(tl.int64)
    return pairs, pairs < S, e


@triton.jit
def _gate_up_kernel(
    h, x, sxt, sxh, w, swe, swn, swk, sc, sse, ssn, ssg, zp, sze, szn, szg, bias, sbe, sbn,
    topk_weights, sorted_ids, expert_of_block, num_post_padded,
    S, N, K, top_k, max_blocks, m_bucket, group_size, alpha, limit,
    ACT: tl.constexpr, INT4: tl.constexpr, HAS_BIAS: tl.constexpr, INTERLEAVED: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h[p, cols] = gated(a · W_gate[e, cols] + b_gate[e, cols], a · W_up[e, cols] +
    b_up[e, cols]) for the pairs p of one block (N = I, K = H), a = x[p // k] (times the
    routing weight, rounded to x's dtype, with WEIGHT_ON_INPUT). W_up[e, n] is row I + n of
    w_gate_up[e], or with INTERLEAVED W_gate[e, n] and W_up[e, n] are rows 2n and 2n + 1; the
    bias b [E, 2I] has the same rows. With INT4, w, sc and zp are the packed codes, scales and
    zeros (`_weight_tile`); otherwise sc and zp are unused."""
    pid_m, pid_n = _tile(tl.program_id(0), max_blocks, N, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M < tl.load(num_post_padded):  # past the last real block: nothing to do
        pairs, row_ok, e = _rows(pid_m, sorted_ids, expert_of_block, S, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x + (pairs // top_k) * sxt
        w_e, sc_e, zp_e = w + e * swe, sc + e * sse, zp + e * sze
        if INTERLEAVED:
            gate_rows, up_rows = 2 * cols, 2 * cols + 1
        else:
            gate_rows, up_rows = cols, cols + N
        if WEIGHT_ON_INPUT:
            rw = tl.load(topk_weights + pairs, mask=row_ok, other=0.0).to(tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < K
            a = tl.load(x_rows[:, None] + ks[None, :] * sxh,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if WEIGHT_ON_INPUT:
                a = (a.to(tl.float32) * rw[:, None]).to(x.dtype.element_ty)
            bg, sg = _weight_tile(w_e, gate_rows, col_ok, k0, K, swn, swk, sc_e, ssn, ssg,
                                  zp_e, szn, szg, group_size, x.dtype.element_ty, INT4,
                                  BLOCK_N, BLOCK_K)
            bu, su = _weight_tile(w_e, up_rows, col_ok, k0, K, swn, swk, sc_e, ssn, ssg, zp_e,
                                  szn, szg, group_size, x.dtype.element_ty, INT4, BLOCK_N,
                                  BLOCK_K)
            if INT4:
                acc_g += _dot(a, bg, DOT_IN_FP32) * sg[None, :]
                acc_u += _dot(a, bu, DOT_IN_FP32) * su[None, :]
            else:
                acc_g += _dot(a, bg, DOT_IN_FP32)
                acc_u += _dot(a, bu, DOT_IN_FP32)
        if HAS_BIAS:
            b_e = bias + e * sbe
            acc_g += tl.load(b_e + gate_rows * sbn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b_e + up_rows * sbn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out = _gated(acc_g, acc_u, alpha, limit, ACT)
        tl.store(h + pairs[:, None] * N + cols[None, :], out.to(h.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    part, h, w, swe, swn, swk, sc, sse, ssn, ssg, zp, sze, szn, szg, bias, sbe, sbn, topk_weights,
    sorted_ids, expert_of_block, num_post_padded,
    S, N, K, k_per_split, max_blocks, m_bucket, group_size,
    INT4: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """part[chunk, p, cols] = topk_weights.flat[p] · (Σ_{i in chunk} h[p, i] W_down[e, cols, i]
    + b_down[e, cols] in chunk 0 only) in fp32, for the pairs p of one block (N = H, K = I;
    chunk = program_id(1)); without the routing weight with WEIGHT_ON_INPUT (it scaled the
    input). INT4 as in `_gate_up_kernel`; k_per_split is then a multiple of BLOCK_K, so no K
    tile straddles a group."""
    pid_m, pid_n = _tile(tl.program_id(0), max_blocks, N, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M < tl.load(num_post_padded):  # past the last real block: nothing to do
        pairs, row_ok, e = _rows(pid_m, sorted_ids, expert_of_block, S, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        col_ok = cols < N
        offs_k = tl.arange(0, BLOCK_K)
        h_rows = h + pairs * K
        w_e, sc_e, zp_e = w + e * swe, sc + e * sse, zp + e * sze
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < k_hi
            a = tl.load(h_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b, sb = _weight_tile(w_e, cols, col_ok, k0, k_hi, swn, swk, sc_e, ssn, ssg, zp_e,
                                 szn, szg, group_size, h.dtype.element_ty, INT4, BLOCK_N,
                                 BLOCK_K)
            if INT4:
                acc += _dot(a, b, DOT_IN_FP32) * sb[None, :]
            else:
                acc += _dot(a, b, DOT_IN_FP32)
        if HAS_BIAS:
            b_e = tl.load(bias + e * sbe + cols * sbn, mask=col_ok, other=0.0).to(tl.float32)
            acc += tl.where(split == 0, b_e, 0.0)[None, :]  # once, not once per K chunk
        if not WEIGHT_ON_INPUT:
            rw = tl.load(topk_weights + pairs, mask=row_ok, other=0.0).to(tl.float32)
            acc = acc * rw[:, None]
        dst = part + split.to(tl.int64) * S * N + pairs[:, None] * N + cols[None, :]
        tl.store(dst, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_kernel(out, part, ids, TN, N, SN, E, top_k, splits, BLOCK: tl.constexpr):
    """out.flat[i] = Σ_j Σ_chunk part[chunk, t, j, n] (i = t · N + n) in fp32, in that order;
    pairs with an expert id outside [0, E) were never computed and count 0."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TN
    t = offs // N
    n = offs % N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(top_k):
        pair = t * top_k + j
        e = tl.load(ids + pair, mask=ok, other=-1)
        use = ok & (e >= 0) & (e < E)
        p = part + pair * N + n
        for _ in range(splits):
            acc += tl.load(p, mask=use, other=0.0)
            p += SN
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=ok)


# --- configurations: autotuned on CUDA, one small fixed config under the interpreter ----------


def _configs(shapes: list[tuple]) -> list[triton.Config]:
    """Configs from (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) tuples; BLOCK_M is set
    by the caller (it fixes the alignment)."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g}, num_warps=wp,
                          num_stages=st) for n, k, g, wp, st in shapes]


# The CUDA search spaces: small-M (decode) tiles that stream wide K slices of the weight, and
# larger tiles with the GROUP_M swizzle for prefill. Two accumulators in the gate/up kernel.
GATE_UP_CONFIGS = _configs([
    (32, 128, 1, 4, 4), (64, 128, 1, 4, 3), (64, 256, 1, 4, 3), (128, 64, 1, 4, 4),
    (64, 64, 8, 4, 4), (128, 64, 8, 8, 3), (64, 32, 8, 4, 5), (128, 32, 8, 8, 4)])
DOWN_CONFIGS = _configs([
    (32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (64, 256, 1, 4, 3), (128, 128, 1, 4, 3),
    (64, 64, 8, 4, 4), (128, 64, 8, 4, 4), (128, 128, 8, 8, 3), (256, 64, 8, 8, 3)])
SMEM_BYTES = 200 * 1024  # under the ~227 KB an H100 block may use; A100 has 163 KB


def prune_configs(configs, named_args, **kwargs):
    """Drop configs whose pipelined tiles would not fit in shared memory at this BLOCK_M and
    element size (estimate: stages x (A tile + B tiles), an int4 B tile half a byte per code);
    keep the smallest if none fits. With int4 weights a K tile must not straddle groups, so
    BLOCK_K is capped at the (power-of-two) group size, which it then divides."""
    args = {**named_args, **kwargs}
    bm = args["BLOCK_M"]
    int4 = bool(args.get("INT4", False))
    a = next((args[k] for k in ("x", "h") if isinstance(args.get(k), Tensor)), args["w"])
    a_elt, w_elt = a.element_size(), 0.5 if int4 else args["w"].element_size()
    b_tiles = 2 if "x" in args else 1  # the gate/up kernel loads two weight tiles per step
    if int4:
        capped = {}
        for c in configs:
            kw = {**c.kwargs, "BLOCK_K": min(c.kwargs["BLOCK_K"], args["group_size"])}
            capped.setdefault((*sorted(kw.items()), c.num_warps, c.num_stages), triton.Config(
                kw, num_warps=c.num_warps, num_stages=c.num_stages))
        configs = list(capped.values())

    def smem(c):
        n, k = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return c.num_stages * (bm * k * a_elt + b_tiles * n * k * w_elt)

    fits = [c for c in configs if smem(c) <= SMEM_BYTES]
    return fits or [min(configs, key=smem)]


def _tuned(kernel, cuda_configs: list[triton.Config]):
    # INT4 and group_size: the float and int4 variants (and each group size) tune apart.
    key = ["m_bucket", "N", "K", "BLOCK_M", "INT4", "group_size"]
    if interpreting():
        # BLOCK_N 16 and BLOCK_K 16 so that small test shapes have several tiles and tails.
        config = triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4,
                               num_stages=1)
        return triton.autotune(configs=[config], key=key)(kernel)
    return triton.autotune(configs=cuda_configs, key=key,
                           prune_configs_by={"early_config_prune": prune_configs})(kernel)


_gate_up = _tuned(_gate_up_kernel, GATE_UP_CONFIGS)
_down = _tuned(_down_kernel, DOWN_CONFIGS)


# --- the entry point ----------------------------------------------------------------------------


def choose_block_m(pairs: int, num_experts: int) -> int:
    """BLOCK_M for `pairs` routed pairs over `num_experts`, from the average rows per expert."""
    avg = pairs / max(1, num_experts)
    for most, bm in BLOCK_M_STEPS:
        if avg <= most:
            return bm
    return BLOCK_M_MAX


def default_splits(sms: int, tiles: int, k: int) -> int:
    """K chunks of the down GEMM for `tiles` output tiles on `sms` SMs."""
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, tiles), k // MIN_K_PER_SPLIT))


def _check(x, topk_ids, topk_weights, w_gate_up, w_down, form, b_gate_up, b_down) -> None:
    reference.check_moe(x, topk_ids, topk_weights, w_gate_up, w_down, form, b_gate_up, b_down)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"fused_moe supports fp16, bf16 and fp32, got {x.dtype}")


def _bias_args(b: Tensor | None, like: Tensor) -> tuple:
    """A bias [E, N] and its strides; `like` and 0s when absent (not read: HAS_BIAS is off)."""
    return (like, 0, 0) if b is None else (b, *b.stride())


class _Weight(NamedTuple):
    """One stacked expert weight as the GEMM kernels take it: a float [E, N, K] (scales and
    zeros None), or int4 codes [E, N, Kp/2] with their scales and zeros [E, N, Kp/g]."""

    w: Tensor
    scales: Tensor | None = None
    zeros: Tensor | None = None

    def args(self) -> tuple:
        """w and its strides, then scales and zeros with theirs (w and 0s for a float weight:
        the kernels do not read them)."""
        if self.scales is None:
            return (self.w, *self.w.stride(), self.w, 0, 0, 0, self.w, 0, 0, 0)
        return (self.w, *self.w.stride(), self.scales, *self.scales.stride(), self.zeros,
                *self.zeros.stride())


def fused_moe(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    activation: str | ExpertForm = "silu",
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    *,
    block_m: int | None = None,
    split_k: int | None = None,
) -> Tensor:
    """x [T, H] (fp16/bf16; fp32 accepted) → `reference.moe` as a contiguous [T, H] in x.dtype,
    for any `reference.ExpertForm` and biases (added to the fp32 accumulators in the epilogues).

    `block_m` forces the block height (a power of two, >= 16; default `choose_block_m`) and
    `split_k` the number of K chunks of the down GEMM (default: enough to fill the GPU, 2 under
    the interpreter); both are for tests and benchmarks. x and the weights are read through
    their strides (a transposed weight view is never copied).
    """
    form = ExpertForm.of(activation)
    _check(x, topk_ids, topk_weights, w_gate_up, w_down, form, b_gate_up, b_down)
    return _fused(x, topk_ids, topk_weights, _Weight(w_gate_up), _Weight(w_down),
                  w_gate_up.shape[1] // 2, form, b_gate_up, b_down, 1, block_m, split_k)


def fused_moe_w4a16(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    gate_up_qweight: Tensor,
    gate_up_scales: Tensor,
    gate_up_zeros: Tensor,
    down_qweight: Tensor,
    down_scales: Tensor,
    down_zeros: Tensor,
    group_size: int,
    activation: str | ExpertForm = "silu",
    b_gate_up: Tensor | None = None,
    b_down: Tensor | None = None,
    *,
    block_m: int | None = None,
    split_k: int | None = None,
) -> Tensor:
    """`fused_moe` on int4 expert weights (`reference.moe_w4a16`): the same kernels with their
    weight tiles unpacked in registers (`_weight_tile`), fp32 accumulation, each group's scale
    applied to its tile's fp32 product. x is fp16/bf16 (fp32 accepted); the scales may have
    any floating dtype. `block_m` and `split_k` as in `fused_moe`."""
    reference.check_moe_w4a16(x, topk_ids, topk_weights, gate_up_qweight, gate_up_scales,
                              gate_up_zeros, down_qweight, down_scales, down_zeros, group_size,
                              activation, b_gate_up, b_down)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"fused_moe_w4a16 supports fp16, bf16 and fp32, got {x.dtype}")
    return _fused(x, topk_ids, topk_weights,
                  _Weight(gate_up_qweight, gate_up_scales, gate_up_zeros),
                  _Weight(down_qweight, down_scales, down_zeros),
                  gate_up_qweight.shape[1] // 2, ExpertForm.of(activation), b_gate_up, b_down,
                  group_size, block_m, split_k)


def _fused(x, topk_ids, topk_weights, gate_up: _Weight, down: _Weight, inter: int,
           form: ExpertForm, b_gate_up, b_down, group_size: int, block_m, split_k) -> Tensor:
    if block_m is not None and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    t, k = topk_ids.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if t == 0 or x.shape[1] == 0:
        return out
    if k == 0:
        return out.zero_()
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    step = max(1, MAX_PAIRS // k)
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        _forward(out[t0:t1], x[t0:t1], ids[t0:t1], weights[t0:t1], gate_up, down, inter,
                 form, b_gate_up, b_down, group_size, block_m, split_k)
    return out


def _forward(out, x, ids, weights, gate_up: _Weight, down: _Weight, inter: int,
             form: ExpertForm, b_gate_up, b_down, group_size: int, block_m, split_k) -> None:
    """One token chunk: steps 1-4 of the module docstring into `out` (contiguous rows)."""
    t, k = ids.shape
    h_dim, s = x.shape[1], t * k
    num_experts = gate_up.w.shape[0]
    int4 = gate_up.scales is not None
    bm = block_m or (16 if interpreting() else choose_block_m(s, num_experts))
    al = align_block_size(ids.view(-1), num_experts, bm)
    m_bucket = triton.next_power_of_2(t)
    dot_fp32 = interpreting() and x.dtype == torch.bfloat16
    blocks = (al.sorted_ids, al.expert_of_block, al.num_post_padded)

    hidden = torch.empty((s, inter), dtype=x.dtype, device=x.device)
    if inter:  # else h is empty and the down GEMM leaves only its bias
        grid = lambda meta: (al.max_blocks * triton.cdiv(inter, meta["BLOCK_N"]),)
        _gate_up[grid](hidden, x, *x.stride(), *gate_up.args(), *_bias_args(b_gate_up, x),
                       weights,
                       *blocks, s, inter, h_dim, k, al.max_blocks, m_bucket, group_size,
                       form.alpha, form.limit, ACT=ACTIVATIONS[form.activation], INT4=int4,
                       HAS_BIAS=b_gate_up is not None, INTERLEAVED=form.interleaved,
                       WEIGHT_ON_INPUT=form.weight_on_input, DOT_IN_FP32=dot_fp32, BLOCK_M=bm)

    # Chunks counted for nominal 64-column tiles; autotuning may pick others, which moves the
    # programs per SM by a small factor. A chunk is whole granules, so whole K tiles (every
    # BLOCK_K divides the granule): no int4 tile straddles a group.
    if split_k is None:
        if interpreting():
            split_k = 2
        else:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            split_k = default_splits(sms, al.max_blocks * triton.cdiv(h_dim, 64), inter)
    granule = 16 if interpreting() else SPLIT_GRANULE
    chunk = max(1, triton.cdiv(triton.cdiv(inter, max(1, split_k)), granule)) * granule
    splits = max(1, triton.cdiv(inter, chunk))  # one chunk at I = 0: the bias alone
    part = torch.empty((splits, s, h_dim), dtype=torch.float32, device=x.device)
    grid = lambda meta: (al.max_blocks * triton.cdiv(h_dim, meta["BLOCK_N"]), splits)
    _down[grid](part, hidden, *down.args(), *_bias_args(b_down, x), weights, *blocks,
                s, h_dim, inter, chunk, al.max_blocks, m_bucket, group_size,
                INT4=int4, HAS_BIAS=b_down is not None, WEIGHT_ON_INPUT=form.weight_on_input,
                DOT_IN_FP32=dot_fp32, BLOCK_M=bm)

    block = 1024
    _sum_kernel[(triton.cdiv(t * h_dim, block),)](out, part, ids, t * h_dim, h_dim,
                                                  s * h_dim, num_experts, k, splits,
                                                  BLOCK=block)
