"""Fused attention forward: softmax(q @ kᵀ * scale + mask) @ v, see `reference.attention`.

Both paths stream over the keys with the online softmax of FlashAttention (Dao et al., 2022).
For a block of query rows we keep, per row, the running maximum m of the scores, the running
sum l = Σ_j exp(s_j - m) and the unnormalised output acc = Σ_j exp(s_j - m) v_j. A new block
of scores s' moves the maximum to m' = max(m, max s') and is folded in as

    α = exp(m - m'),   l ← α l + Σ exp(s' - m'),   acc ← α acc + exp(s' - m') v',

so that at the end out = acc / l. Without an additive mask we work in base 2: the scores are
multiplied by scale · log2(e) so that exp becomes the cheaper exp2. With one (NATURAL) the
scores stay in natural units, s = q·k · scale + mask, exactly as eager adds them, and exp(x) is
exp2(x · log2(e)) taken of the *difference* x = s - m: transformers' padding masks hold
finfo(float32).min, and scaling that by log2(e) before subtracting would overflow to -inf,
turning a row whose keys are all masked by that finite fill into 0 where eager (and the
reference) average V over those keys, every score being the same -3.4e38.

Masked keys (a bool mask, causal, past the end) are -inf. A row that has seen only -inf has
m = -inf, and exp(-inf - -inf) would be NaN, so exponents are taken relative to m where it is
finite and relative to 0 otherwise: such a row keeps l = 0 and acc = 0, and gives out = 0 (as
SDPA does) instead of 0 / 0.

- Prefill (Lq > DECODE_MAX_Q): one program per (BLOCK_M query rows, batch · query head). With
  `is_causal` (bottom-right: query i sees keys j <= i + Lk - Lq) the key loop stops after the
  last key the block's last row can see, so blocks above the diagonal are never loaded.
- Decode (Lq <= DECODE_MAX_Q): flash decoding (Dao et al., 2023). One query block is far too
  little work for a GPU, so the keys are split into chunks and one program handles one
  (batch, KV head, chunk) for every query row of every query head that reads this KV head: the
  chunk of K/V is read once per group, not once per query head. Each program writes, per row,
  its normalised partial output o_s and its softmax state (m_s, l_s); a second kernel merges
  the chunks: out = Σ_s w_s o_s / Σ_s w_s with w_s = l_s · exp(m_s - max_s m_s). The state is
  kept as (m, l) rather than a log-sum-exp m + log l, which loses log l when m is -3.4e38 (a
  row masked everywhere by a finite fill), where the chunks must still weigh by their counts.

Grouped-query attention is pure indexing (query head h reads KV head h // (Hq // Hkv)), and q,
k, v, the mask and the biases are read through their strides: a transposed q or a mask
broadcast over heads (stride 0) is never copied.

The variants (`reference.ScoreMods`) are applied to each tile of scores by `_modify`, in the
reference's order: softcap, biases, ALiBi, mask, then the band of keys the window and the
causal flag keep. Any of the first three (or an additive mask) keeps the scores in natural
units, as eager computes them; exp of the differences is still exp2 of x · log2(e). The band
also bounds the loops: prefill visits only the key blocks some row of its block keeps, and
decode splits only the keys between the first row's first key and the last row's last, so a
4k window at 32k context reads 4k keys. A sink is a logit with no value: prefill starts each
row's state at (m, l) = (sink, 1) instead of (-inf, 0), and the split-KV merges add it as one
more chunk with weight e^(sink - m) and no output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.backends import reference
from attnopt.backends.triton import interpreting

# Query lengths up to this take the split-KV decode path.
DECODE_MAX_Q = 16
# Under the default split count every chunk has at least this many keys, so the partial
# outputs and the merge stay small next to the attention work.
MIN_KEYS_PER_SPLIT = 256

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)


@triton.jit
def _finite_or_zero(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _exp(x, NATURAL: tl.constexpr):
    """e^x for scores in natural units, 2^x for scores already in base 2."""
    if NATURAL:
        return tl.exp(x)
    return tl.exp2(x)


@triton.jit
def _fold(acc, m_i, l_i, s, v_blk, NATURAL: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """One block of scores s [BLOCK_M, BLOCK_N] (masked keys -inf) and its values folded into
    the online-softmax state: m' = max(m, max s), α = exp(m - m'), l' = α l + Σ exp(s - m'),
    acc' = α acc + exp(s - m') v."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    base = _finite_or_zero(m_new)
    p = _exp(s - base[:, None], NATURAL)
    alpha = _exp(m_i - base, NATURAL)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # P is rounded to V's dtype so the second product runs on the same tensor cores.
    acc = acc * alpha[:, None] + _dot(p.to(v_blk.dtype), v_blk, DOT_IN_FP32)
    return acc, m_new, l_i


@triton.jit
def _store_partial(o_part, m_part, l_part, part, acc, m_i, l_i, row_ok, offs_dv, Dv):
    """A split-KV chunk's result for rows `part`: its normalised output acc / l and its state
    (m, l); a row that saw no key stores 0, -inf and 0."""
    y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_part + part[:, None] * Dv + offs_dv[None, :], y,
             mask=row_ok[:, None] & (offs_dv < Dv)[None, :])
    tl.store(m_part + part, m_i, mask=row_ok)
    tl.store(l_part + part, l_i, mask=row_ok)


@triton.jit
def _dot(a, b, DOT_IN_FP32: tl.constexpr):
    # "ieee" keeps fp32 inputs in full fp32 rather than TF32; fp16/bf16 inputs are unaffected.
    # DOT_IN_FP32 is for bf16 under the interpreter: numpy has no bfloat16, and the interpreter's
    # tl.dot would multiply the raw uint16 bit patterns. bf16 products are exact in fp32, so
    # upcasting first gives what the tensor cores give.
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _tanh(x):
    """tanh from one exp: sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 1, which cannot
    overflow. Its absolute error is about 1e-7 (the rounding of e near 1), so a capped score
    c · tanh(s / c) is off by about c · 1e-7: the size of its own fp32 rounding at |s| ~ c.
    (libdevice's tanh does not run under the interpreter the tests use.)"""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _modify(
    s, cols, col_ok, rows_ok, b, h, q_pos, offset, softcap,
    biases, bias_strides, slopes, mask_rows, smn, left, right,
    SOFTCAP: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, BOUND_LEFT: tl.constexpr,
    BOUND_RIGHT: tl.constexpr,
):
    """The variants on a tile of scores s [BLOCK_M, BLOCK_N] (already q·k times the scale):
    rows are (head h, query q_pos) pairs, both [BLOCK_M] vectors, of sequence b; columns are
    keys `cols`. offset is Lk - Lq (bottom-right: p_i = q_pos + offset), left/right the band of
    keys kept around p_i (-1 unbounded; causal is right = 0). Returns s with dropped keys
    (out of the band, a False mask entry, past the end) at -inf."""
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    tile_ok = rows_ok[:, None] & col_ok[None, :]
    for i in tl.static_range(NUM_BIASES):
        sb, sh, sm, sn = bias_strides[i]
        bias = tl.load(biases[i] + (b * sb + h * sh + q_pos * sm)[:, None] + cols[None, :] * sn,
                       mask=tile_ok, other=0.0)
        s += bias.to(tl.float32)
    rel = cols[None, :] - (q_pos + offset)[:, None]  # j - p_i
    if HAS_ALIBI:
        slope = tl.load(slopes + h, mask=rows_ok, other=0.0).to(tl.float32)
        s += slope[:, None] * rel.to(tl.float32)
    keep = col_ok[None, :]
    if HAS_MASK:
        mk = tl.load(mask_rows[:, None] + cols[None, :] * smn, mask=tile_ok, other=0)
        if BOOL_MASK:
            keep = keep & (mk != 0)
        else:
            s += mk.to(tl.float32)
    if BOUND_LEFT:
        keep = keep & (rel >= -left)
    if BOUND_RIGHT:
        keep = keep & (rel <= right)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _initial_state(sinks, h, rows_ok, NATURAL: tl.constexpr, HAS_SINKS: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """The online-softmax state (m, l) of rows before any key: (-inf, 0), or (sink, 1) with a
    per-head sink logit (in the scores' units), whose value row is 0."""
    if HAS_SINKS:
        m = tl.load(sinks + h, mask=rows_ok, other=float("-inf")).to(tl.float32)
        if not NATURAL:
            m = m * LOG2E
        return m, tl.where(m == float("-inf"), 0.0, 1.0)
    return (tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
            tl.zeros([BLOCK_M], dtype=tl.float32))


@triton.jit
def _with_sink(acc, total, m, sinks, h, NATURAL: tl.constexpr, HAS_SINKS: tl.constexpr):
    """A merged row (acc = Σ w_s o_s, total = Σ w_s, weights relative to m) with head h's sink
    added to its denominator, rescaled to the new maximum; unchanged without sinks."""
    if HAS_SINKS:
        sink = tl.load(sinks + h).to(tl.float32)
        if not NATURAL:
            sink = sink * LOG2E
        m_new = tl.maximum(m, sink)
        base = _finite_or_zero(m_new)
        alpha = _exp(m - base, NATURAL)
        acc = acc * alpha
        total = total * alpha + _exp(sink - base, NATURAL)
    return acc, total


@triton.jit
def _attend(
    acc, m_i, l_i, q, b, h, q_pos, row_ok,
    k_ptr, skn, skd, v_ptr, svn, svd, mask_rows, smn, biases, bias_strides, slopes,
    lo, hi, Lq, Lk, D, Dv, qk_scale, softcap, left, right,
    SOFTCAP: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, BOUND_LEFT: tl.constexpr,
    BOUND_RIGHT: tl.constexpr, NATURAL: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Fold keys [lo, hi) into the online-softmax state (acc, m_i, l_i) of a block of query rows.

    q: [BLOCK_M, BLOCK_D] queries; h, q_pos: each row's query head and position in the query
    sequence; mask_rows: a pointer per row to its row of the mask. qk_scale is scale · log2(e),
    or scale itself for NATURAL scores.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        # Kᵀ block [BLOCK_D, BLOCK_N]; the padded head-dim lanes read 0 and add nothing to q·k.
        kt = tl.load(k_ptr + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & (offs_d < D)[:, None], other=0.0)
        s = _modify(_dot(q, kt, DOT_IN_FP32) * qk_scale, cols, col_ok, row_ok, b, h, q_pos,
                    Lk - Lq, softcap, biases, bias_strides, slopes, mask_rows, smn, left, right,
                    SOFTCAP, NUM_BIASES, HAS_ALIBI, HAS_MASK, BOOL_MASK, BOUND_LEFT,
                    BOUND_RIGHT)
        v_blk = tl.load(v_ptr + cols[:, None] * svn + offs_dv[None, :] * svd,
                        mask=col_ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)
        acc, m_i, l_i = _fold(acc, m_i, l_i, s, v_blk, NATURAL, DOT_IN_FP32)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(
    out, q, sqb, sqh, sqm, sqd, k, skb, skh, skn, skd, v, svb, svh, svn, svd,
    mask, smb, smh, smm, smn, biases, bias_strides, slopes, sinks,
    Hq, Hkv, Lq, Lk, D, Dv, qk_scale, softcap, left, right,
    SOFTCAP: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
    BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr,
    NATURAL: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Prefill: out[b, h, rows] for one block of BLOCK_M query rows of one (batch, head)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # int64: offsets of large tensors overflow int32
    b = bh // Hq
    h = bh % Hq
    hkv = h // (Hq // Hkv)
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    heads = tl.full([BLOCK_M], h, dtype=tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_blk = tl.load(q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    # Only the keys some row of the block keeps: p_i - left <= j <= p_i + right, with
    # p_i = i + Lk - Lq, from the block's first row to its last. lo is rounded down to a
    # whole tile, so tiles stay aligned.
    lo = 0
    hi = Lk
    if BOUND_LEFT:
        lo = tl.maximum(0, start_m + Lk - Lq - left) // BLOCK_N * BLOCK_N
    if BOUND_RIGHT:
        hi = tl.minimum(Lk, tl.minimum(start_m + BLOCK_M, Lq) + Lk - Lq + right)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i, l_i = _initial_state(sinks, heads, row_ok, NATURAL, HAS_SINKS, BLOCK_M)
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q_blk, b, heads, rows, row_ok,
        k + b * skb + hkv * skh, skn, skd, v + b * svb + hkv * svh, svn, svd,
        mask + b * smb + h * smh + rows * smm, smn, biases, bias_strides, slopes,
        lo, hi, Lq, Lk, D, Dv, qk_scale, softcap, left, right,
        SOFTCAP, NUM_BIASES, HAS_ALIBI, HAS_MASK, BOOL_MASK, BOUND_LEFT, BOUND_RIGHT, NATURAL,
        DOT_IN_FP32, BLOCK_N, BLOCK_D, BLOCK_DV,
    )
    # Rows that saw no unmasked key (and no sink) have l = 0 and acc = 0: they give 0.
    y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + (bh * Lq + rows[:, None]) * Dv + offs_dv[None, :], y.to(out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < Dv)[None, :])


def _prefill_configs() -> list[triton.Config]:
    if interpreting():  # one small config: autotuning under the interpreter would take minutes
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 2),
        ]
    ]


_attn_fwd_tuned = triton.autotune(configs=_prefill_configs(), key=["Lq", "Lk", "D"])(_attn_fwd)


@triton.jit
def _decode_split_kernel(
    o_part, m_part, l_part, q, sqb, sqh, sqm, sqd, k, skb, skh, skn, skd,
    v, svb, svh, svn, svd, mask, smb, smh, smm, smn, biases, bias_strides, slopes,
    B, Hq, Hkv, Lq, Lk, D, Dv, qk_scale, softcap, left, right, band_lo, band_hi, split_len,
    SOFTCAP: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, BOUND_LEFT: tl.constexpr,
    BOUND_RIGHT: tl.constexpr, NATURAL: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Decode, phase 1: keys [band_lo + split · split_len, band_lo + (split + 1) · split_len)
    (up to band_hi) of one (batch, KV head) against BLOCK_M of the group's (query head, query
    row) pairs, flattened as r = g · Lq + i."""
    bkv = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    b = bkv // Hkv
    hkv = bkv % Hkv
    group = Hq // Hkv
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < group * Lq
    h = hkv * group + r // Lq
    q_pos = r % Lq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_blk = tl.load(
        q + b * sqb + h[:, None] * sqh + q_pos[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    lo = band_lo + split * split_len
    hi = tl.minimum(lo + split_len, band_hi)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q_blk, b, h, q_pos, row_ok,
        k + b * skb + hkv * skh, skn, skd, v + b * svb + hkv * svh, svn, svd,
        mask + b * smb + h * smh + q_pos * smm, smn, biases, bias_strides, slopes,
        lo, hi, Lq, Lk, D, Dv, qk_scale, softcap, left, right,
        SOFTCAP, NUM_BIASES, HAS_ALIBI, HAS_MASK, BOOL_MASK, BOUND_LEFT, BOUND_RIGHT, NATURAL,
        DOT_IN_FP32, BLOCK_N, BLOCK_D, BLOCK_DV,
    )
    # Partials are [splits, B, Hq, Lq, (Dv)]. A chunk with no unmasked key for a row stores
    # o_s = 0 and l_s = 0, so the merge gives it weight 0.
    part = ((split * B + b) * Hq + h) * Lq + q_pos
    _store_partial(o_part, m_part, l_part, part, acc, m_i, l_i, row_ok, offs_dv, Dv)


@triton.jit
def _decode_merge_kernel(
    out, o_part, m_part, l_part, sinks, R, S, Hq, Lq, Dv,
    NATURAL: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Decode, phase 2: out[row] = Σ_s w_s o_s / (Σ_s w_s + e^(sink - m)) with
    w_s = l_s · exp(m_s - m), m the largest m_s (and sink), for one of the R = B · Hq · Lq
    output rows. Rows whose chunks all saw no key give 0."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    part = splits.to(tl.int64) * R + row
    m_s = tl.load(m_part + part, mask=splits < S, other=float("-inf"))
    m = tl.max(m_s, axis=0)
    w = tl.load(l_part + part, mask=splits < S, other=0.0) * _exp(
        m_s - _finite_or_zero(m), NATURAL)
    o = tl.load(o_part + part[:, None] * Dv + offs_dv[None, :],
                mask=(splits < S)[:, None] & (offs_dv < Dv)[None, :], other=0.0)
    acc, total = _with_sink(tl.sum(w[:, None] * o, axis=0), tl.sum(w, axis=0), m, sinks,
                            row // Lq % Hq, NATURAL, HAS_SINKS)
    y = acc / tl.where(total > 0, total, 1.0)
    tl.store(out + row * Dv + offs_dv, y.to(out.dtype.element_ty), mask=offs_dv < Dv)


def _default_splits(q: Tensor, programs: int, lk: int) -> int:
    """Enough chunks that the split kernel has about two programs per SM."""
    if interpreting():
        return 2
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(lk, MIN_KEYS_PER_SPLIT)))


@dataclass(frozen=True)
class Variants:
    """What the kernels take for `reference.ScoreMods` and the mask's kind: the tensors and
    numbers (`args`, in the kernels' order) and the compile-time flags. Causality is the
    band's right edge: right = 0 (or the window's, if tighter)."""

    args: tuple
    flags: dict
    left: int  # -1: unbounded
    right: int

    @property
    def natural(self) -> bool:
        return self.flags["NATURAL"]

    def split_flags(self, **more: object) -> dict:
        """The flags of the kernels that fold keys (all but HAS_SINKS: the sink is the
        merge's), with `more`."""
        return {k: v for k, v in self.flags.items() if k != "HAS_SINKS"} | more


def variants(mods: reference.ScoreMods, mask: Tensor | None, is_causal: bool, q: Tensor,
             scores: tuple) -> Variants:
    """The kernel arguments for `mods` over scores of shape `scores` [B, Hq, Lq, Lk] (the
    biases are read through the strides of their broadcast to it)."""
    right = mods.window_right
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    left = mods.window_left
    biases = tuple(t.expand(scores) for t in mods.biases)
    additive = mask is not None and mask.dtype != torch.bool
    # Unused pointers (no slopes, no sinks, no bias: NUM_BIASES = 0 reads none of the one
    # passed, which keeps the tuple argument non-empty) are any tensor: never read.
    args = (biases or (q,), tuple(t.stride() for t in biases) or ((0, 0, 0, 0),),
            q if mods.alibi_slopes is None else mods.alibi_slopes,
            q if mods.sinks is None else mods.sinks)
    flags = dict(
        SOFTCAP=bool(mods.softcap), NUM_BIASES=len(mods.biases),
        HAS_ALIBI=mods.alibi_slopes is not None, HAS_SINKS=mods.sinks is not None,
        HAS_MASK=mask is not None, BOOL_MASK=mask is not None and mask.dtype == torch.bool,
        BOUND_LEFT=left >= 0, BOUND_RIGHT=right >= 0,
        # Scores in natural units whenever something is added to them or capped: see the top.
        NATURAL=bool(additive or mods.softcap or biases or mods.alibi_slopes is not None),
        DOT_IN_FP32=interpreting() and q.dtype == torch.bfloat16,
    )
    return Variants(args, flags, left, right)


def key_band(lq: int, lk: int, left: int, right: int) -> tuple[int, int]:
    """[lo, hi): the keys some query row keeps, rows at p_i = i + Lk - Lq."""
    lo = max(0, lk - lq - left) if left >= 0 else 0
    hi = min(lk, lk + right) if right >= 0 else lk
    return lo, max(lo, hi)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
    mods: reference.ScoreMods = reference.PLAIN,
    *,
    decode_split: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """softmax(q @ kᵀ * scale + mask) @ v with the variants `mods`, exactly as
    `reference.attention`, for fp16, bf16 and fp32 q [B, Hq, Lq, D], k [B, Hkv, Lk, D],
    v [B, Hkv, Lk, Dv].

    Lq <= DECODE_MAX_Q takes the split-KV decode path, longer queries the prefill kernel.
    `decode_split` (number of key chunks in decode) and `block_m` / `block_n` (rows and keys
    per tile; in decode, block_m counts (query head, query row) pairs) override the defaults,
    which lets tests reach every path on tiny shapes.
    """
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attention kernel supports fp16, bf16 and fp32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if hq % hkv or k.shape[:3] != v.shape[:3] or k.shape[-1] != d:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    mods.check(q, lk)
    out = torch.empty((b, hq, lq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or lk == 0:  # no keys: every row is fully masked
        return out.zero_()

    # The mask is read through the strides of its broadcast view: stride 0 on broadcast dims.
    mask4 = q if mask is None else mask.expand(b, hq, lq, lk)
    mask_strides = (0, 0, 0, 0) if mask is None else mask4.stride()
    var = variants(mods, mask, is_causal, q, (b, hq, lq, lk))
    biases, bias_strides, slopes, sinks = var.args
    args = (q, *q.stride(), k, *k.stride(), v, *v.stride(), mask4, *mask_strides)
    qk_scale = float(scale) * (1.0 if var.natural else LOG2E.value)  # exp2(x · log2(e))
    numbers = (qk_scale, float(mods.softcap), var.left, var.right)
    flags = dict(var.flags, BLOCK_D=triton.next_power_of_2(d),
                 BLOCK_DV=triton.next_power_of_2(dv))

    if lq > DECODE_MAX_Q:
        shape_args = (biases, bias_strides, slopes, sinks, hq, hkv, lq, lk, d, dv, *numbers)
        if block_m is None and block_n is None:
            grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * hq)
            _attn_fwd_tuned[grid](out, *args, *shape_args, **flags)
        else:
            bm, bn = block_m or 64, block_n or 64
            _attn_fwd[(triton.cdiv(lq, bm), b * hq)](
                out, *args, *shape_args, **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
        return out

    # Decode. tl.dot needs at least 16 rows; more than 64 rows of q and acc per program would
    # spill registers, so large groups (e.g. MQA) take several row blocks. Only the keys some
    # row keeps are split: a window reads its band, not the whole cache.
    band_lo, band_hi = key_band(lq, lk, var.left, var.right)
    rows = hq // hkv * lq
    bm = block_m or min(64, max(16, triton.next_power_of_2(rows)))
    row_blocks = triton.cdiv(rows, bm)
    splits = decode_split or _default_splits(q, b * hkv * row_blocks, band_hi - band_lo)
    split_len = max(1, triton.cdiv(band_hi - band_lo, splits))
    o_part = torch.empty((splits, b, hq, lq, dv), dtype=torch.float32, device=q.device)
    m_part, l_part = torch.empty((2, splits, b, hq, lq), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(b * hkv, splits, row_blocks)](
        o_part, m_part, l_part, *args, biases, bias_strides, slopes, b, hq, hkv, lq, lk, d, dv,
        *numbers, band_lo, band_hi, split_len,
        **var.split_flags(BLOCK_D=flags["BLOCK_D"], BLOCK_DV=flags["BLOCK_DV"]),
        BLOCK_M=bm, BLOCK_N=block_n or 64, num_warps=4)
    _decode_merge_kernel[(b * hq * lq,)](
        out, o_part, m_part, l_part, sinks, b * hq * lq, splits, hq, lq, dv,
        NATURAL=var.natural, HAS_SINKS=flags["HAS_SINKS"],
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=flags["BLOCK_DV"])
    return out
