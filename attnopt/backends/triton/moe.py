"""Fused mixture-of-experts: the routed experts of a sparse MoE block, see `reference.moe`:

    out[t] = Σ_j w[t, j] · W_down[e] (act(W_gate[e] x[t]) ⊙ W_up[e] x[t]),   e = ids[t, j],

with W_gate[e] = w_gate_up[e, :I] and W_up[e] = w_gate_up[e, I:] — or any `ExpertForm`: gate and
up interleaved (rows 2n and 2n + 1), GPT-OSS's clamped SwiGLU, per-expert biases on gate/up and
down, the routing weight on the input (Llama-4). Those are epilogue (and prologue) changes of
the same kernels, chosen by constexpr flags: the biases are added to the fp32 accumulators,
the gating is computed on them, the input tile is scaled by its pair's weight. The design is
vLLM's fused_moe, written from the math. Number the S = T·k (token, expert) pairs p = t·k + j (so
token t = p // k). The work of expert e is two GEMMs over the rows {p : ids.flat[p] = e}; once
the pairs are grouped by expert, every expert's rows are one contiguous run and both
projections are grouped GEMMs over runs:

1. Align (`align_block_size`, one program). Count the pairs of each expert (a histogram),
   pad each count up to a multiple of BLOCK_M, and lay the runs out back to back:
   `sorted_ids` holds, for each expert in turn, its pair indices followed by the sentinel S up
   to the padded end. A block of BLOCK_M consecutive entries then belongs to exactly one expert,
   `expert_of_block[b]`, and `num_post_padded` (on the device: no host sync) says where the
   real blocks end. Each pair then takes the next slot of its expert's run (an atomic add on a
   per-expert cursor that starts at the run's first slot). An expert with no pairs has no
   blocks, so at decode only the chosen experts' weights are ever read. One program does it
   all, so nothing needs zeroing beforehand and no launch waits for another's counts; at the
   largest pass (MAX_PAIRS pairs) it is two sweeps of the ids, microseconds next to the GEMMs.
   The GEMM grids are sized for the most blocks any routing can need,
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
   of pairs inside a block, which the atomic cursors make arbitrary, changes nothing, since
   rows of a GEMM tile are computed independently).

A single token (a decode step) skips step 1: its k pairs are k blocks of one row, block j =
pair j of expert ids[0, j] (`_rows` with BY_PAIR), which is what the align step would produce
for k distinct experts (top-k's), minus its launch.

A call therefore makes four launches (`LAUNCHES`; three for one token, `DECODE_LAUNCHES`),
no host sync and no device query (the SM count is read once per device,
`tuning.device_info`), and two allocations: the output and one workspace from PyTorch's
caching allocator that holds the alignment, h and the partials (`_Plan.parts`), each section
256-byte aligned. Nothing outlives the call, so a CUDA graph
captures it as it is.

Precision is `reference.moe`'s: fp32 accumulation, act(gate) ⊙ up rounded to x's dtype once
(the second GEMM's operand), routing weights and the sum over k in fp32. fp32 activations
multiply on TF32 tensor cores when PyTorch's matmul precision allows it
(`tuning.tf32_allowed`), in full fp32 ("ieee", FMA units) otherwise.

Token chunks of at most MAX_PAIRS pairs go through 1-4 in turn, which bounds the workspace at
large T (one workspace, sized for the largest chunk, serves them all). All address arithmetic
on pair, token and expert indices is in int64. Out-of-range expert ids cannot raise here (that
would need a device sync; `reference.moe` and the CPU path raise): the align step and the
GEMMs skip such pairs, so nothing is read or written out of bounds, and the sum makes their
tokens' rows NaN, so that the bad input shows rather than a plausible wrong row.

BLOCK_M is chosen on the host from the average number of rows per expert (`choose_block_m`),
before the align step that depends on it; the other tile sizes are autotuned on CUDA
(`tuning.autotune`: one config list per architecture, keyed by the bucket of T, so a new
batch size in a tuned bucket tunes nothing; never during CUDA-graph capture; results kept on
disk), one small config under the interpreter. Every config the pruner can keep compiles
without spills and within the arch's shared memory (the compile audit,
`attnopt.backends.triton.audit`, checks it on sm_80 and sm_90).

Int4 expert weights (`fused_moe_w4a16`, `attnopt::moe_w4a16`): the same steps, with both GEMM
kernels compiled with INT4 set. Their weight tiles are then read as packed codes (each expert
matrix in the layout of `backends.int4`: [N, Kp/2] uint8, one scale and zero per group along K)
and dequantized in registers by `triton/w4a16.py`'s `_weight_tile`: (q - z) · s in fp32,
rounded once to x's dtype (the weight `int4.dequantize(..., dtype=x.dtype)` gives), and fed
to the same tl.dot that accumulates in place, so no per-tile scale sits between two MMAs and
the tensor-core pipeline overlaps them with the next tiles' loads. BLOCK_K divides the group
size (configs are capped to it), and the down GEMM's K chunks are whole granules, so no tile
straddles a group. Precision is then the float kernel's on the dequantized weights, plus one
rounding of each weight to x's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.backends import reference
from attnopt.backends.reference import ExpertForm
from attnopt.backends.triton import interpreting, tuning
from attnopt.backends.triton.w4a16 import _dot
from attnopt.backends.triton.w4a16 import _weight_tile as _int4_tile

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "swiglu_oai": 3}
# Launches of one call (one token chunk): align, gate/up, down, sum; a single token (a decode
# step) needs no align (`tests/backends/test_launch_counts.py` holds them to it).
LAUNCHES = 4
DECODE_LAUNCHES = 3
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
# The align program reads the ids ALIGN_BLOCK at a time; its [experts, columns] tiles hold about
# ALIGN_TILE elements (8 per thread at 8 warps).
ALIGN_BLOCK = 2048
ALIGN_TILE = 2048
ALIGN_WARPS = 8
# Every workspace section starts at a multiple of this many bytes (coalesced rows, and the
# 16-byte alignment the JIT specializes on).
SECTION_ALIGN = 256


# --- align: sort the pairs by expert, padded to BLOCK_M -----------------------------------------


@triton.jit
def _expert_ids(ids, offs, S, E):
    """The expert ids of pairs `offs` as int32 (0 where not used) and which are used: pairs
    below S with an id in [0, E), checked before the narrowing cast, so that a huge int64 id
    cannot wrap into range."""
    in_range = offs < S
    e = tl.load(ids + offs, mask=in_range, other=-1)
    ok = in_range & (e >= 0) & (e < E)
    return tl.where(ok, e, 0).to(tl.int32), ok


@triton.jit
def _align_kernel(ids, sorted_ids, expert_of_block, num_post_padded, cursor, S, E, max_blocks,
                  BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, BLOCK: tl.constexpr,
                  PAD_COLS: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: the padded runs [begin[e], end[e]) of the experts, the sentinel S in the
    padding of each run, the expert of every block (-1 past the last), their total, and every
    pair p of expert e at slot begin[e] + (its place among e's pairs)."""
    es = tl.arange(0, E_POW2)
    e_ok = es < E
    counts = tl.zeros([E_POW2], dtype=tl.int32)
    for p0 in range(0, S, BLOCK):
        e, ok = _expert_ids(ids, p0 + tl.arange(0, BLOCK), S, E)
        counts += tl.histogram(e, E_POW2, mask=ok)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    begin = end - padded
    total = tl.sum(padded, 0)
    tl.store(num_post_padded, total)
    tl.store(cursor + es, begin, mask=e_ok)
    # Each run's padding is shorter than BLOCK_M: [E, PAD_COLS] tiles cover all of them.
    first_pad = begin + counts
    for c0 in tl.static_range(0, BLOCK_M, PAD_COLS):
        slots = first_pad[:, None] + (c0 + tl.arange(0, PAD_COLS))[None, :]
        tl.store(sorted_ids + slots, tl.zeros(slots.shape, tl.int32) + S,
                 mask=e_ok[:, None] & (slots < end[:, None]))
    # Block b starts at row b · BLOCK_M and lies in the run of the expert e for which exactly
    # e runs end at or before that row (empty runs included).
    for b0 in range(0, max_blocks, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        first = bs * BLOCK_M
        e_of = tl.sum(((end[None, :] <= first[:, None]) & e_ok[None, :]).to(tl.int32), 1)
        tl.store(expert_of_block + bs, tl.where(first < total, e_of, -1), mask=bs < max_blocks)
    # The cursors are written by some threads and advanced by all: the barrier orders the two.
    tl.debug_barrier()
    for p0 in range(0, S, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        e, ok = _expert_ids(ids, offs, S, E)
        slot = tl.atomic_add(cursor + e, 1, mask=ok, sem="relaxed")
        tl.store(sorted_ids + slot, offs, mask=ok)


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


def _align_parts(pairs: int, num_experts: int, block_m: int) -> list[tuple[int, torch.dtype]]:
    """The align step's buffers: sorted_ids, expert_of_block, num_post_padded, cursors."""
    nb = max_blocks(pairs, num_experts, block_m)
    return [(nb * block_m, torch.int32), (nb, torch.int32), (1, torch.int32),
            (num_experts, torch.int32)]


def _sections(parts: list[tuple[int, torch.dtype]]) -> tuple[list[int], int]:
    """Byte offsets of `parts` (numel, dtype) laid out back to back, each SECTION_ALIGN-aligned,
    and the bytes they take."""
    offsets, end = [], 0
    for numel, dtype in parts:
        offsets.append(end)
        end += triton.cdiv(numel * dtype.itemsize, SECTION_ALIGN) * SECTION_ALIGN
    return offsets, end


def _carve(workspace: Tensor, parts: list[tuple[int, torch.dtype]]) -> list[Tensor]:
    """Flat views of the byte tensor `workspace` as `parts` (views: no allocation)."""
    offsets, _ = _sections(parts)
    return [workspace[o:o + n * d.itemsize].view(d)
            for o, (n, d) in zip(offsets, parts, strict=True)]


def _align(ids: Tensor, num_experts: int, block_m: int, buffers: list[Tensor]) -> Alignment:
    """Launch the align step for the flat expert ids `ids` [S] into `buffers` (`_align_parts`)."""
    s = ids.numel()
    if s + num_experts * block_m >= 2**31:
        raise ValueError(f"{s} pairs are too many for one pass (int32 slots); use token chunks")
    sorted_ids, expert_of_block, num_post_padded, cursor = buffers
    nb = expert_of_block.numel()
    e_pow2 = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](ids, sorted_ids, expert_of_block, num_post_padded, cursor, s,
                        num_experts, nb, BLOCK_M=block_m, E_POW2=e_pow2, BLOCK=ALIGN_BLOCK,
                        PAD_COLS=min(block_m, max(1, ALIGN_TILE // e_pow2)),
                        BLOCK_B=max(16, min(256, ALIGN_TILE // e_pow2)),
                        num_warps=ALIGN_WARPS)
    return Alignment(sorted_ids, expert_of_block, num_post_padded, nb, block_m)


def align_block_size(ids: Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the pairs of flat expert ids `ids` [S] by expert, each run padded to block_m (in
    buffers of its own; the op carves them from its workspace)."""
    parts = _align_parts(ids.numel(), num_experts, block_m)
    workspace = torch.empty(_sections(parts)[1], dtype=torch.uint8, device=ids.device)
    return _align(ids, num_experts, block_m, _carve(workspace, parts))


# --- the grouped GEMMs --------------------------------------------------------------------------


@triton.jit
def _weight_tile(w, rows, k0, k_hi, n_rows, swn, swk, sc, ssn, ssg, zp, szn, szg, group_size,
                 dtype: tl.constexpr, INT4: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile W[rows, k0:k0 + BLOCK_K]ᵀ of one expert's weight (w points
    at the expert), ready for tl.dot; 0 for rows >= n_rows.

    A float weight is loaded as it is, 0 outside k < k_hi. An int4 weight (INT4: the packed
    format of `backends.int4`, w the uint8 codes [N, Kp/2]) is dequantized in registers by
    `triton/w4a16.py` (`_int4_tile`): (q - z) · s in fp32, rounded once to `dtype` (held in
    fp32 under DOT_IN_FP32). k0 is a multiple of BLOCK_K, which divides the group size, so the
    tile lies in one group. The codes past K (up to K rounded up to the group) dequantize to 0
    and k0 < K, so the codes need no K mask; the activations are 0 there anyway."""
    if INT4:
        return tl.trans(_int4_tile(w, swn, swk, sc, ssn, ssg, zp, szn, szg, rows, k0,
                                   group_size, n_rows, dtype, DOT_IN_FP32, BLOCK_N, BLOCK_K))
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        return tl.load(w + rows[None, :] * swn + ks[:, None] * swk,
                       mask=(ks < k_hi)[:, None] & (rows < n_rows)[None, :], other=0.0)


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
def _rows(pid_m, sorted_ids, expert_of_block, num_post_padded, S, E, BLOCK_M: tl.constexpr,
          BY_PAIR: tl.constexpr):
    """Whether block pid_m has work, its pair indices (int64), which of them are real (not
    padding), and its expert. Aligned: the block's rows of sorted_ids, live below
    num_post_padded. BY_PAIR (one token, no align step): block b is pair b alone in row 0,
    expert_of_block is the flat expert ids, and a pair whose id is outside [0, E) has no work
    (the sum makes its token NaN); sorted_ids and num_post_padded are not read."""
    if BY_PAIR:
        e = tl.load(expert_of_block + pid_m).to(tl.int64)
        live = (e >= 0) & (e < E)
        rows = tl.arange(0, BLOCK_M)
        pairs = tl.where(rows == 0, pid_m, S).to(tl.int64)
        return live, pairs, pairs < S, tl.where(live, e, 0)
    else:
        live = pid_m * BLOCK_M < tl.load(num_post_padded)
        # Read for dead blocks too (in bounds; their values are not used).
        pairs = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        e = tl.load(expert_of_block + pid_m).to(tl.int64)
        return live, pairs, pairs < S, e


@triton.jit
def _gate_up_kernel(
    h, x, sxt, sxh, w, swe, swn, swk, sc, sse, ssn, ssg, zp, sze, szn, szg, bias, sbe, sbn,
    topk_weights, sorted_ids, expert_of_block, num_post_padded,
    S, N, K, top_k, max_blocks, E, m_bucket, group_size, alpha, limit,
    ACT: tl.constexpr, INT4: tl.constexpr, HAS_BIAS: tl.constexpr, INTERLEAVED: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BY_PAIR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """h[p, cols] = gated(a · W_gate[e, cols] + b_gate[e, cols], a · W_up[e, cols] +
    b_up[e, cols]) for the pairs p of one block (N = I, K = H), a = x[p // k] (times the
    routing weight, rounded to x's dtype, with WEIGHT_ON_INPUT). W_up[e, n] is row I + n of
    w_gate_up[e], or with INTERLEAVED W_gate[e, n] and W_up[e, n] are rows 2n and 2n + 1; the
    bias b [E, 2I] has the same rows. With INT4, w, sc and zp are the packed codes, scales and
    zeros (`_weight_tile`); otherwise sc and zp are unused."""
    pid_m, pid_n = _tile(tl.program_id(0), max_blocks, N, BLOCK_N, GROUP_M)
    live, pairs, row_ok, e = _rows(pid_m, sorted_ids, expert_of_block, num_post_padded, S, E,
                                   BLOCK_M, BY_PAIR)
    if live:  # else past the last real block (or an unused pair): nothing to do
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x + (pairs // top_k) * sxt
        w_e, sc_e, zp_e = w + e * swe, sc + e * sse, zp + e * sze
        # The weight rows of the two projections, and the bound that masks exactly cols < N.
        if INTERLEAVED:
            gate_rows, up_rows, gate_bound = 2 * cols, 2 * cols + 1, 2 * N
        else:
            gate_rows, up_rows, gate_bound = cols, cols + N, N
        if WEIGHT_ON_INPUT:
            rw = tl.load(topk_weights + pairs, mask=row_ok, other=0.0).to(tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            a = tl.load(x_rows[:, None] + ks[None, :] * sxh,
                        mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
            if WEIGHT_ON_INPUT:
                a = (a.to(tl.float32) * rw[:, None]).to(x.dtype.element_ty)
            bg = _weight_tile(w_e, gate_rows, k0, K, gate_bound, swn, swk, sc_e, ssn, ssg, zp_e,
                              szn, szg, group_size, x.dtype.element_ty, INT4, DOT_IN_FP32,
                              BLOCK_N, BLOCK_K)
            acc_g = _dot(a, bg, acc_g, PRECISION, DOT_IN_FP32)
            bu = _weight_tile(w_e, up_rows, k0, K, 2 * N, swn, swk, sc_e, ssn, ssg, zp_e, szn,
                              szg, group_size, x.dtype.element_ty, INT4, DOT_IN_FP32, BLOCK_N,
                              BLOCK_K)
            acc_u = _dot(a, bu, acc_u, PRECISION, DOT_IN_FP32)
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
    S, N, K, k_per_split, max_blocks, E, m_bucket, group_size,
    INT4: tl.constexpr, HAS_BIAS: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BY_PAIR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """part[chunk, p, cols] = topk_weights.flat[p] · (Σ_{i in chunk} h[p, i] W_down[e, cols, i]
    + b_down[e, cols] in chunk 0 only) in fp32, for the pairs p of one block (N = H, K = I;
    chunk = program_id(1)); without the routing weight with WEIGHT_ON_INPUT (it scaled the
    input). INT4 as in `_gate_up_kernel`; k_per_split is then a multiple of BLOCK_K, so no K
    tile straddles a group."""
    pid_m, pid_n = _tile(tl.program_id(0), max_blocks, N, BLOCK_N, GROUP_M)
    live, pairs, row_ok, e = _rows(pid_m, sorted_ids, expert_of_block, num_post_padded, S, E,
                                   BLOCK_M, BY_PAIR)
    if live:  # else past the last real block (or an unused pair): nothing to do
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
            a = tl.load(h_rows[:, None] + ks[None, :], mask=row_ok[:, None] & (ks < k_hi)[None, :],
                        other=0.0)
            b = _weight_tile(w_e, cols, k0, k_hi, N, swn, swk, sc_e, ssn, ssg, zp_e, szn, szg,
                             group_size, h.dtype.element_ty, INT4, DOT_IN_FP32, BLOCK_N, BLOCK_K)
            acc = _dot(a, b, acc, PRECISION, DOT_IN_FP32)
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
    """out.flat[i] = Σ_j Σ_chunk part[chunk, t, j, n] (i = t · N + n) in fp32, in that order.
    A pair with an expert id outside [0, E) was never computed: its token's row is NaN, the
    error `reference.moe` raises, made visible without a device sync (a dropped pair would
    leave a plausible wrong row)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TN
    t = offs // N
    n = offs % N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(top_k):
        pair = t * top_k + j
        e = tl.load(ids + pair, mask=ok, other=0)
        use = ok & (e >= 0) & (e < E)
        # NaN stays NaN through the later sums: no mask kept live across the loop (a spill).
        acc = tl.where(ok & ~use, float("nan"), acc)
        p = part + pair * N + n
        for _ in range(splits):
            acc += tl.load(p, mask=use, other=0.0)
            p += SN
    tl.store(out + offs, acc.to(out.dtype.element_ty), mask=ok)


# --- configurations: autotuned per arch on CUDA, one small fixed config under the interpreter --


def _configs(shapes: list[tuple]) -> list[triton.Config]:
    """Configs from (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) tuples; BLOCK_M is set
    by the caller (it fixes the alignment)."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g}, num_warps=wp,
                          num_stages=st) for n, k, g, wp, st in shapes]


# The CUDA search spaces per arch: small-M (decode) tiles that stream wide K slices of the
# weight, and larger tiles with the GROUP_M swizzle for prefill. The first config of each list
# is the one a bucket first seen during CUDA-graph capture runs.
_GATE_UP = [(32, 128, 1, 4, 4), (64, 128, 1, 4, 3), (64, 256, 1, 4, 3), (128, 64, 1, 4, 4),
            (64, 64, 8, 4, 4), (128, 64, 8, 8, 3), (64, 32, 8, 4, 5), (128, 32, 8, 8, 4),
            (32, 64, 1, 4, 4), (64, 64, 1, 4, 4), (64, 128, 1, 8, 3), (128, 128, 8, 8, 3),
            (64, 64, 8, 8, 4), (128, 64, 8, 4, 3)]
_DOWN = [(32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (64, 256, 1, 4, 3), (128, 128, 1, 4, 3),
         (64, 64, 8, 4, 4), (128, 64, 8, 4, 4), (128, 128, 8, 8, 3), (256, 64, 8, 8, 3),
         (32, 64, 1, 4, 4), (64, 64, 1, 4, 4), (128, 128, 1, 8, 3), (128, 64, 8, 8, 3),
         (64, 128, 8, 4, 3), (256, 128, 8, 8, 3)]
GATE_UP_CONFIGS = {arch: _configs(_GATE_UP) for arch in tuning.ARCHS}
DOWN_CONFIGS = {arch: _configs(_DOWN) for arch in tuning.ARCHS}


def _capped(configs: list[triton.Config], group_size: int) -> list[triton.Config]:
    """`configs` with BLOCK_K at most the (power-of-two) group size, which it then divides, so
    no int4 K tile straddles two groups (duplicates dropped)."""
    capped = {}
    for c in configs:
        kw = {**c.kwargs, "BLOCK_K": min(c.kwargs["BLOCK_K"], group_size)}
        capped.setdefault((*sorted(kw.items()), c.num_warps, c.num_stages),
                          triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(capped.values())


# Register limits, from the compile audit (ptxas on sm_80 and sm_90): the fp32 accumulators
# per thread, w_tiles · BLOCK_M · BLOCK_N / (32 · num_warps), and with int4 weights the widest
# K tile. 128 accumulators a thread spill on sm_80 (gate/up 64x128, 4 warps) and at
# BLOCK_M = 128 on sm_90 (gate/up 128x64 and down 128x128, 4 warps; down 128x256, 8 warps);
# the same tiles with twice the warps, 64 a thread, compile cleanly on both. An int4 tile is
# unpacked in registers (BLOCK_N · BLOCK_K values, fp32 before rounding): with BLOCK_K = 128
# it spills on sm_80 (at BLOCK_M 64, and at 16 with BLOCK_N 128) and on sm_90 (gate/up
# 16x32x128 at decode), or sits at 245-255 registers; BLOCK_K = 64 compiles cleanly on both.
MAX_ACC_REGS = 64
INT4_MAX_BLOCK_K = 64


def acc_registers(c: triton.Config, block_m: int, w_tiles: int) -> int:
    """fp32 accumulator registers per thread: w_tiles [BLOCK_M, BLOCK_N] tiles over the
    threads."""
    return w_tiles * block_m * c.kwargs["BLOCK_N"] // (32 * c.num_warps)


def _smem_estimate(c: triton.Config, block_m: int, a_bytes: int, w_bytes: float,
                   w_tiles: int) -> float:
    """Shared memory of the pipelined tiles: stages x (A tile + weight tiles)."""
    n, k = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    return c.num_stages * (block_m * k * a_bytes + w_tiles * n * k * w_bytes)


def keep_configs(configs: list[triton.Config], arch: str, smem_limit: int, block_m: int,
                 a_bytes: int, w_bytes: float, w_tiles: int,
                 group_size: int | None = None) -> list[triton.Config]:
    """The configs that launch on `arch` without spills: with int4 weights (`group_size` given)
    BLOCK_K capped to the group size (`_capped`) and to INT4_MAX_BLOCK_K; at most
    MAX_ACC_REGS accumulator registers a thread; the pipelined tiles within `smem_limit`
    bytes. If none is left (fp32 at BLOCK_M = 128 on sm_80), the smallest tiles (every list
    holds 32x64 at 4 warps, within the register limit everywhere) with fewer stages."""
    if group_size is not None:
        configs = _capped(configs, min(group_size, INT4_MAX_BLOCK_K))

    def smem(c):
        return _smem_estimate(c, block_m, a_bytes, w_bytes, w_tiles)

    kept = [c for c in configs if smem(c) <= smem_limit
            and acc_registers(c, block_m, w_tiles) <= MAX_ACC_REGS]
    if kept:
        return kept
    c = min(configs, key=lambda c: (acc_registers(c, block_m, w_tiles), smem(c)))
    stages = max(1, min(c.num_stages, int(smem_limit // (smem(c) / c.num_stages))))
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=stages)]


def prune_configs(configs: list[triton.Config], named_args: dict) -> list[triton.Config]:
    """`keep_configs` for one launch of `_gate_up_kernel` (two weight tiles per step: it has
    an `x`) or `_down_kernel`, on the call's device."""
    gate_up = "x" in named_args
    a = named_args["x" if gate_up else "h"]
    int4 = bool(named_args["INT4"])
    info = tuning.device_info(a.device)
    return keep_configs(configs, info.arch, info.smem_per_block, named_args["BLOCK_M"],
                        a.element_size(), 0.5 if int4 else named_args["w"].element_size(),
                        2 if gate_up else 1, named_args["group_size"] if int4 else None)


def _tuned(kernel, configs: dict[str, list[triton.Config]]):
    # INT4, group_size and PRECISION: the float and int4 variants (each group size) and TF32
    # tune apart; BLOCK_M follows the bucket of rows per expert.
    return tuning.autotune(
        configs, key=["m_bucket", "N", "K", "BLOCK_M", "INT4", "group_size", "PRECISION"],
        # BLOCK_N 16 and BLOCK_K 16 so that small test shapes have several tiles and tails.
        interpreter_config=triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                                         num_warps=4, num_stages=1),
        prune=prune_configs)(kernel)


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
    weight tiles dequantized in registers ((q - z) · s rounded once to x's dtype,
    `_weight_tile`) and fed to the MMA, fp32 accumulation. x is fp16/bf16 (fp32 accepted);
    the scales may have any floating dtype. `block_m` and `split_k` as in `fused_moe`."""
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
    chunks = [(t0, min(t, t0 + step)) for t0 in range(0, t, step)]
    shape = (gate_up.w.shape[0], inter, x.shape[1], x.dtype)
    plans = {n: _plan(n, k, *shape, x.device, block_m, split_k)
             for n in {t1 - t0 for t0, t1 in chunks}}
    # One workspace for every chunk: each carves its sections from the front.
    workspace = torch.empty(max(p.nbytes for p in plans.values()), dtype=torch.uint8,
                            device=x.device)
    for t0, t1 in chunks:
        _forward(out[t0:t1], x[t0:t1], ids[t0:t1], weights[t0:t1], gate_up, down, inter,
                 form, b_gate_up, b_down, group_size, plans[t1 - t0], workspace)
    return out


class _Plan(NamedTuple):
    """The launch geometry of one token chunk and its workspace sections (`_plan`)."""

    block_m: int
    max_blocks: int
    by_pair: bool  # one token: a block per pair, no align step
    splits: int  # K chunks of the down GEMM
    k_chunk: int  # K (= I) per chunk: whole SPLIT_GRANULEs
    parts: list[tuple[int, torch.dtype]]  # align buffers (`_align_parts`) unless by_pair, h, part
    nbytes: int


def _plan(tokens: int, top_k: int, num_experts: int, inter: int, hidden: int,
          dtype: torch.dtype, device: torch.device, block_m: int | None,
          split_k: int | None) -> _Plan:
    """Block height, K chunks and workspace of a chunk of `tokens` tokens. One token (a decode
    step) goes by pair: top-k picks k distinct experts, so aligning its k pairs would only
    find k blocks of one row each, the pairs themselves, which the GEMMs then take without
    the align launch (a repeated id costs one more read of that expert's weights)."""
    s = tokens * top_k
    bm = block_m or (16 if interpreting() else choose_block_m(s, num_experts))
    by_pair = tokens == 1
    nb = s if by_pair else max_blocks(s, num_experts, bm)
    # Chunks counted for nominal 64-column tiles; autotuning may pick others, which moves the
    # programs per SM by a small factor. A chunk is whole granules, so whole K tiles (every
    # BLOCK_K divides the granule): no int4 tile straddles a group.
    if split_k is None:
        if interpreting():
            split_k = 2
        else:
            split_k = default_splits(tuning.device_info(device).sms,
                                     nb * triton.cdiv(hidden, 64), inter)
    granule = 16 if interpreting() else SPLIT_GRANULE
    chunk = max(1, triton.cdiv(triton.cdiv(inter, max(1, split_k)), granule)) * granule
    splits = max(1, triton.cdiv(inter, chunk))  # one chunk at I = 0: the bias alone
    parts = [*([] if by_pair else _align_parts(s, num_experts, bm)), (s * inter, dtype),
             (splits * s * hidden, torch.float32)]
    return _Plan(bm, nb, by_pair, splits, chunk, parts, _sections(parts)[1])


def _forward(out, x, ids, weights, gate_up: _Weight, down: _Weight, inter: int,
             form: ExpertForm, b_gate_up, b_down, group_size: int, plan: _Plan,
             workspace: Tensor) -> None:
    """One token chunk: steps 1-4 of the module docstring into `out` (contiguous rows)."""
    t, k = ids.shape
    h_dim, s = x.shape[1], t * k
    num_experts = gate_up.w.shape[0]
    bm, nb, splits = plan.block_m, plan.max_blocks, plan.splits
    *align_buffers, hidden, part = _carve(workspace, plan.parts)
    if plan.by_pair:  # `_rows`: the ids are the blocks' experts
        blocks = (ids, ids, ids)
    else:
        al = _align(ids.view(-1), num_experts, bm, align_buffers)
        blocks = (al.sorted_ids, al.expert_of_block, al.num_post_padded)
    tf32 = x.dtype == torch.float32 and not interpreting() and tuning.tf32_allowed()
    flags = dict(INT4=gate_up.scales is not None, WEIGHT_ON_INPUT=form.weight_on_input,
                 PRECISION="tf32" if tf32 else "ieee",
                 DOT_IN_FP32=interpreting() and x.dtype == torch.bfloat16, BY_PAIR=plan.by_pair,
                 BLOCK_M=bm)
    m_bucket = tuning.bucket(t)

    if inter:  # else h is empty and the down GEMM leaves only its bias
        grid = lambda meta: (nb * triton.cdiv(inter, meta["BLOCK_N"]),)
        _gate_up[grid](hidden, x, *x.stride(), *gate_up.args(), *_bias_args(b_gate_up, x),
                       weights, *blocks, s, inter, h_dim, k, nb, num_experts, m_bucket,
                       group_size,
                       form.alpha, form.limit, ACT=ACTIVATIONS[form.activation],
                       HAS_BIAS=b_gate_up is not None, INTERLEAVED=form.interleaved, **flags)

    grid = lambda meta: (nb * triton.cdiv(h_dim, meta["BLOCK_N"]), splits)
    _down[grid](part, hidden, *down.args(), *_bias_args(b_down, x), weights, *blocks,
                s, h_dim, inter, plan.k_chunk, nb, num_experts, m_bucket, group_size,
                HAS_BIAS=b_down is not None, **flags)

    block = 1024
    _sum_kernel[(triton.cdiv(t * h_dim, block),)](out, part, ids, t * h_dim, h_dim,
                                                  s * h_dim, num_experts, k, splits,
                                                  BLOCK=block)
