"""The tile machinery every attention kernel shares (prefill and split-KV decode in
`triton.attention`, `triton.paged_attention`, `triton.latent_attention`): the online softmax, the
variants applied to a tile of scores, and the key loop split into interior and edge tiles.

Online softmax (FlashAttention, Dao et al., 2022). For a block of query rows we keep, per row,
the running maximum m of the scores, the running sum l = Σ_j exp(s_j - m) and the unnormalised
output acc = Σ_j exp(s_j - m) v_j. A new tile of scores s' moves the maximum to
m' = max(m, max s') and is folded in as

    α = exp(m - m'),   l ← α l + Σ exp(s' - m'),   acc ← α acc + exp(s' - m') v',

so that at the end out = acc / l. Without an additive term the scores are in base 2: multiplied
by scale · log2(e), so that exp becomes the cheaper exp2. With one (NATURAL: an additive mask, a
bias, ALiBi, or a softcap) they stay in natural units, s = q·k · scale + mask as eager adds them,
and exp(x) is exp2(x · log2(e)) taken of the *difference* x = s - m: transformers' padding masks
hold finfo(float32).min, and scaling that by log2(e) before subtracting would overflow to -inf,
turning a row whose keys are all masked by that finite fill into 0 where eager averages V over
those keys, every score being the same -3.4e38.

Dropped keys (a False mask entry, out of the causal/window band, past the end) are -inf. A row
that has seen only -inf has m = -inf, and exp(-inf - -inf) would be NaN, so there exponents are
taken relative to 0 instead of m (the "-inf guard"): such a row keeps l = 0 and acc = 0, and
gives 0 (as SDPA does) instead of 0 / 0.

Interior and edge tiles (as FlashAttention's kernels split their key loops). Of the keys
[lo, hi) a program folds, the *interior* tiles are those whose every key every row of the program
keeps: before the band's right edge of the first row (causal: below the diagonal), after the
left edge of the last row (a window), and before hi. They need no key mask on their loads, no
band compares and no -inf guard (all their scores are finite, so the maximum is), unless a mask
or bias tensor brings its own -inf. The other tiles — the diagonal, the window's left edge, the
ragged tail — are the *edges*, folded by a second loop that does all of it. The online softmax
does not depend on the order in which tiles are folded, up to rounding.

Paged K/V (`PAGED`): key j of a sequence lives in block block_table[j // BLOCK_SIZE], row
j % BLOCK_SIZE; BLOCK_SIZE is a compile-time constant, so for the power-of-two sizes of
`PagedKVCache` the division is a shift and the remainder a mask, not an integer division per key
of every tile. int8 pools (`QUANTIZED`) are dequantized in registers: each tile of codes times
its per (token, head) fp32 scales, rounded to q's dtype before the products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnopt.backends.triton import interpreting, tuning

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
def _dot(a, b, DOT: tl.constexpr):
    # DOT (`dot_mode`): "ieee" keeps fp32 products in full fp32 (FMA units; 16-bit inputs are
    # unaffected), "tf32" puts them on TF32 tensor cores, as PyTorch's fp32 matmuls are when
    # its matmul precision allows it; "upcast" is for bf16 under the interpreter: numpy has no
    # bfloat16, and the interpreter's tl.dot would multiply the raw uint16 bit patterns. bf16
    # products are exact in fp32, so upcasting first gives what the tensor cores give.
    if DOT == "upcast":
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if DOT == "tf32":
        return tl.dot(a, b, input_precision="tf32")
    return tl.dot(a, b, input_precision="ieee")


def dot_mode(dtype: torch.dtype) -> str:
    """The `DOT` constexpr of the attention kernels for inputs of `dtype`."""
    if interpreting():
        return "upcast" if dtype == torch.bfloat16 else "ieee"
    return "tf32" if dtype == torch.float32 and tuning.tf32_allowed() else "ieee"


@triton.jit
def _fold(acc, m_i, l_i, s, v_blk, NATURAL: tl.constexpr, GUARD: tl.constexpr,
          DOT: tl.constexpr):
    """One tile of scores s [BLOCK_M, BLOCK_N] and its values folded into the online-softmax
    state: m' = max(m, max s), α = exp(m - m'), l' = α l + Σ exp(s - m'),
    acc' = α acc + exp(s - m') v. GUARD: s may hold -inf (see the top)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    base = _finite_or_zero(m_new) if GUARD else m_new
    p = _exp(s - base[:, None], NATURAL)
    alpha = _exp(m_i - base, NATURAL)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # P is rounded to V's dtype so the second product runs on the same tensor cores.
    acc = acc * alpha[:, None] + _dot(p.to(v_blk.dtype), v_blk, DOT)
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
    BOUND_RIGHT: tl.constexpr, EDGE: tl.constexpr,
):
    """The variants on a tile of scores s [BLOCK_M, BLOCK_N] (already q·k times the scale), in
    `reference.ScoreMods`' order: softcap, biases, ALiBi, mask, then the band of keys kept.
    Rows are (head h, query q_pos) pairs, both [BLOCK_M] vectors, of sequence b; columns are
    keys `cols`. offset is Lk - Lq (bottom-right: p_i = q_pos + offset), left/right the band of
    keys kept around p_i (-1 unbounded; causal is right = 0). Returns s with dropped keys at
    -inf. An interior tile (not EDGE) has every key before the end and inside every row's band:
    only a boolean mask drops keys there, and col_ok is not read."""
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    tile_ok = rows_ok[:, None] & col_ok[None, :] if EDGE else rows_ok[:, None]
    for i in tl.static_range(NUM_BIASES):
        sb, sh, sm, sn = bias_strides[i]
        bias = tl.load(biases[i] + (b * sb + h * sh + q_pos * sm)[:, None] + cols[None, :] * sn,
                       mask=tile_ok, other=0.0)
        s += bias.to(tl.float32)
    rel = cols[None, :] - (q_pos + offset)[:, None]  # j - p_i
    if HAS_ALIBI:
        slope = tl.load(slopes + h, mask=rows_ok, other=0.0).to(tl.float32)
        s += slope[:, None] * rel.to(tl.float32)
    if HAS_MASK:
        mk = tl.load(mask_rows[:, None] + cols[None, :] * smn, mask=tile_ok, other=0)
        if not BOOL_MASK:
            s += mk.to(tl.float32)
    if EDGE:
        keep = col_ok[None, :]
        if HAS_MASK and BOOL_MASK:
            keep = keep & (mk != 0)
        if BOUND_LEFT:
            keep = keep & (rel >= -left)
        if BOUND_RIGHT:
            keep = keep & (rel <= right)
        s = tl.where(keep, s, float("-inf"))
    elif HAS_MASK and BOOL_MASK:
        s = tl.where(mk != 0, s, float("-inf"))
    return s


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
def _interior(lo, hi, first_pos, last_pos, left, right, BOUND_LEFT: tl.constexpr,
              BOUND_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """[a, z): the interior tiles of the keys [lo, hi) (tiles start at lo, hi >= lo): whole
    tiles whose every key each row keeps, rows at positions first_pos..last_pos with the band
    p - left <= j <= p + right. lo <= a <= z <= hi; [lo, a) and [z, hi) are the edge tiles.
    (Every operand of // is non-negative: Triton divides towards 0, Python towards -inf.)"""
    a = lo
    if BOUND_LEFT:
        a = tl.maximum(lo, last_pos - left)
        a = tl.minimum(lo + (a - lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)
    z = hi
    if BOUND_RIGHT:
        z = tl.maximum(tl.minimum(hi, first_pos + right + 1), lo)
    z = tl.maximum(lo + (z - lo) // BLOCK_N * BLOCK_N, a)
    return a, z


@triton.jit
def _locate(cols, col_ok, table_row, stj, PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            EDGE: tl.constexpr):
    """(block, row) of keys `cols`: their block from the block table and their row in it, or
    (0, cols) for K/V that are one contiguous run per sequence."""
    # One return: Triton type-checks every return of a function, even one a constexpr skips.
    if PAGED:
        if EDGE:
            blk = tl.load(table_row + (cols // BLOCK_SIZE) * stj, mask=col_ok, other=0)
        else:
            blk = tl.load(table_row + (cols // BLOCK_SIZE) * stj)
        blk = blk.to(tl.int64)
        row = cols % BLOCK_SIZE
    else:
        blk = 0
        row = cols
    return blk, row


@triton.jit
def _load_kv_tile(pool, scale, blk, row, sb, sn, sd, ssb, ssn, offs_d, col_ok, D,
                  dtype: tl.constexpr, QUANTIZED: tl.constexpr, EDGE: tl.constexpr):
    """The [BLOCK_N, BLOCK_D] vectors of BLOCK_N keys (or values) in `dtype`: key n lives at
    pool + blk[n] · sb + row[n] · sn (pool already at its KV head); lanes past D, and in an edge
    tile keys that are not col_ok, read 0."""
    d_ok = (offs_d < D)[None, :]
    ok = col_ok[:, None] & d_ok if EDGE else d_ok
    x = tl.load(pool + (blk * sb + row * sn)[:, None] + offs_d[None, :] * sd, mask=ok, other=0)
    if QUANTIZED:
        if EDGE:
            s = tl.load(scale + blk * ssb + row * ssn, mask=col_ok, other=0.0)
        else:
            s = tl.load(scale + blk * ssb + row * ssn)
        x = x.to(tl.float32) * s[:, None]
    return x.to(dtype)


@triton.jit
def _fold_tile(
    acc, m_i, l_i, q, b, h, q_pos, row_ok, start, hi,
    k_ptr, skb, skn, skd, v_ptr, svb, svn, svd, k_scale, sksb, sksn, v_scale, svsb, svsn,
    table_row, stj, mask_rows, smn, biases, bias_strides, slopes,
    offset, D, Dv, qk_scale, softcap, left, right,
    SOFTCAP: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, BOUND_LEFT: tl.constexpr,
    BOUND_RIGHT: tl.constexpr, NATURAL: tl.constexpr, PAGED: tl.constexpr,
    QUANTIZED: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT: tl.constexpr,
    EDGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The keys [start, start + BLOCK_N) (those before hi) folded into the state."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    blk, row = _locate(cols, col_ok, table_row, stj, PAGED, BLOCK_SIZE, EDGE)
    k_blk = _load_kv_tile(k_ptr, k_scale, blk, row, skb, skn, skd, sksb, sksn,
                          tl.arange(0, BLOCK_D), col_ok, D, q.dtype, QUANTIZED, EDGE)
    s = _modify(_dot(q, tl.trans(k_blk), DOT) * qk_scale, cols, col_ok, row_ok, b, h,
                q_pos, offset, softcap, biases, bias_strides, slopes, mask_rows, smn, left, right,
                SOFTCAP, NUM_BIASES, HAS_ALIBI, HAS_MASK, BOOL_MASK, BOUND_LEFT, BOUND_RIGHT,
                EDGE)
    v_blk = _load_kv_tile(v_ptr, v_scale, blk, row, svb, svn, svd, svsb, svsn,
                          tl.arange(0, BLOCK_DV), col_ok, Dv, q.dtype, QUANTIZED, EDGE)
    # Interior scores are finite unless a mask or bias brings -inf: only then the guard.
    return _fold(acc, m_i, l_i, s, v_blk, NATURAL, EDGE or HAS_MASK or NUM_BIASES > 0,
                 DOT)


@triton.jit
def _attend(
    acc, m_i, l_i, q, b, h, q_pos, row_ok,
    k_ptr, skb, skn, skd, v_ptr, svb, svn, svd, k_scale, sksb, sksn, v_scale, svsb, svsn,
    table_row, stj, mask_rows, smn, biases, bias_strides, slopes,
    lo, hi, offset, first_pos, last_pos, D, Dv, qk_scale, softcap, left, right,
    SOFTCAP: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, BOUND_LEFT: tl.constexpr,
    BOUND_RIGHT: tl.constexpr, NATURAL: tl.constexpr, PAGED: tl.constexpr,
    QUANTIZED: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Fold keys [lo, hi) into the online-softmax state (acc, m_i, l_i) of a block of query rows:
    the interior tiles first, then the edge tiles (see the top).

    q: [BLOCK_M, BLOCK_D] queries; h, q_pos: each row's query head and position in the query
    sequence (p_i = q_pos + offset); first_pos / last_pos: the least and greatest p_i of the
    block's valid rows; mask_rows: a pointer per row to its row of the mask. K/V are read at
    k_ptr / v_ptr (at the program's KV head; `_locate` finds each key's block and row). qk_scale
    is scale · log2(e), or scale itself for NATURAL scores."""
    hi = tl.maximum(hi, lo)
    a, z = _interior(lo, hi, first_pos, last_pos, left, right, BOUND_LEFT, BOUND_RIGHT, BLOCK_N)
    for start in range(a, z, BLOCK_N):
        acc, m_i, l_i = _fold_tile(
            acc, m_i, l_i, q, b, h, q_pos, row_ok, start, hi,
            k_ptr, skb, skn, skd, v_ptr, svb, svn, svd, k_scale, sksb, sksn, v_scale, svsb, svsn,
            table_row, stj, mask_rows, smn, biases, bias_strides, slopes,
            offset, D, Dv, qk_scale, softcap, left, right,
            SOFTCAP, NUM_BIASES, HAS_ALIBI, HAS_MASK, BOOL_MASK, BOUND_LEFT, BOUND_RIGHT,
            NATURAL, PAGED, QUANTIZED, BLOCK_SIZE, DOT, False, BLOCK_N, BLOCK_D, BLOCK_DV)
    # The edge tiles: [lo, a) then [z, hi), as one loop.
    n_left = (a - lo + BLOCK_N - 1) // BLOCK_N
    for t in range(0, n_left + (hi - z + BLOCK_N - 1) // BLOCK_N):
        start = tl.where(t < n_left, lo + t * BLOCK_N, z + (t - n_left) * BLOCK_N)
        acc, m_i, l_i = _fold_tile(
            acc, m_i, l_i, q, b, h, q_pos, row_ok, start, hi,
            k_ptr, skb, skn, skd, v_ptr, svb, svn, svd, k_scale, sksb, sksn, v_scale, svsb, svsn,
            table_row, stj, mask_rows, smn, biases, bias_strides, slopes,
            offset, D, Dv, qk_scale, softcap, left, right,
            SOFTCAP, NUM_BIASES, HAS_ALIBI, HAS_MASK, BOOL_MASK, BOUND_LEFT, BOUND_RIGHT,
            NATURAL, PAGED, QUANTIZED, BLOCK_SIZE, DOT, True, BLOCK_N, BLOCK_D, BLOCK_DV)
    return acc, m_i, l_i
