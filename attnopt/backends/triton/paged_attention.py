"""Split-KV flash decoding over a paged KV cache, read in place; see `reference.paged_attention`.

The cache of one layer is a pool of fixed-size blocks, K [num_blocks, block_size, Hkv, D] and
V [num_blocks, block_size, Hkv, Dv] (`attnopt.cache.PagedKVCache`), and sequence b's token t
lies in block block_table[b, t // block_size], row t % block_size. Nothing is gathered into a
contiguous K/V first: the kernel computes each key's address from the block table as it loads
the tile, so a tile of BLOCK_N keys may span several blocks. The block size is a compile-time
constant (`attention_tiles._locate`): `PagedKVCache`'s powers of two make the key's block and row
a shift and a mask; any other size works too, with one compiled kernel per size. K/V are read
through the pools' strides (the token-major layout above is what the cache writes; a head-major
pool [num_blocks, Hkv, block_size, D] viewed as `.transpose(1, 2)` reads as well).

Phase 1 (split): one program per (batch, KV head, chunk of SPLIT_LEN keys, block of query rows).
The chunk's K/V is read once for every query head of the group (GQA by indexing: query head h
reads KV head h // (Hq // Hkv)) and every one of the Lq query rows, flattened as
r = g · Lq + i. It folds the chunk into the online softmax of `attention_tiles` and
writes its normalised partial output and softmax state (m, l) per row, into a workspace kept
between calls (`workspace`): a call makes LAUNCHES launches and allocates only its output.

Phase 2 (merge): one program per output row combines that sequence's chunks,
out = Σ_s w_s o_s / Σ_s w_s with w_s = l_s · exp(m_s - max m), streaming over them with a
running maximum.

The grid is sized by the block table's width, not by the sequences' lengths, so launching reads
nothing back from the device (no sync, and one captured CUDA graph serves every step): a chunk
past its sequence's end loops over nothing and stores nothing, and the merge reads only the
first cdiv(seq_lens[b], SPLIT_LEN) chunks, those that hold keys. Parallelism therefore follows
the real lengths (each SPLIT_LEN keys of a sequence is one more program), and a table much
wider than the sequences costs only programs that exit at once and a larger partials buffer.

int8 pools are dequantized in registers: each tile of int8 codes is multiplied by its per
(token, head) fp32 scales and rounded to q's dtype before the products, exactly as
`reference.dequantize_kv` states. The key loop is `attention_tiles._attend`'s: the interior
tiles of a chunk without masks or compares, the causal diagonal, the window's edge and the
sequence's tail with them.

The model's mask (optional) is read through the strides of its broadcast view [B, Hq, Lq,
max_blocks · block_size] (stride 0 on broadcast dims): for each tile the split phase loads
mask[b, h, i, cols] for its (query head h, query row i) pairs and its keys, never a column at
or past the sequence's end. A bool mask drops keys; an additive one is added to the scores,
which then stay in natural units (`triton.attention` says why: a row whose keys are all masked
by finfo.min averages V over them, as eager does). A chunk in which a row sees no key stores
o_s = 0 and l_s = 0, so a row that sees no key at all gives 0.

The variants (`reference.ScoreMods`: softcap, biases laid out as the mask, ALiBi, window,
sinks) are `triton.attention`'s, each key's position among its sequence's keys: p_i =
seq_lens[b] - Lq + i. A window's keys before the band of the sequence's first query row are
neither read nor merged: the split phase skips their chunks, and the merge starts at the band.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.backends import reference
from attnopt.backends.triton import interpreting
from attnopt.backends.triton.attention import variants
from attnopt.backends.triton.attention_tiles import (
    LOG2E,
    _attend,
    _exp,
    _finite_or_zero,
    _store_partial,
    _with_sink,
)
from attnopt.backends.triton.workspace import carve, workspace

# Keys per chunk of the split phase by default: long enough that a chunk's partial output and
# the merge stay small next to its attention work, short enough that a few thousand cached
# tokens already spread over many programs.
SPLIT_LEN = 256
# Triton launches of one call (`tests/backends/test_launch_counts.py` holds it to this).
LAUNCHES = 2


@triton.jit
def _band_start(seq_len, Lq, left, BOUND_LEFT: tl.constexpr):
    """The first key any query row of a sequence of seq_len keys keeps: p_0 - left, p_0 =
    seq_len - Lq; 0 without a left edge."""
    if BOUND_LEFT:
        return tl.maximum(seq_len - Lq - left, 0)
    return 0


@triton.jit
def _paged_split_kernel(
    o_part, m_part, l_part,
    q, sqb, sqh, sqm, sqd,
    k_pool, skb, skn, skh, skd, v_pool, svb, svn, svh, svd,
    k_scale, sksb, sksn, sksh, v_scale, svsb, svsn, svsh,
    block_table, stb, stj, seq_lens, mask, smb, smh, smm, smn, biases, bias_strides, slopes,
    Hq, Hkv, Lq, D, Dv, num_splits, qk_scale, softcap, left, right,
    SOFTCAP: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, BOUND_LEFT: tl.constexpr,
    BOUND_RIGHT: tl.constexpr, NATURAL: tl.constexpr, QUANTIZED: tl.constexpr,
    DOT: tl.constexpr, BLOCK_SIZE: tl.constexpr, SPLIT_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Phase 1: keys [split · SPLIT_LEN, (split + 1) · SPLIT_LEN) of one (batch, KV head)
    against BLOCK_M of the group's (query head, query row) pairs."""
    bkv = tl.program_id(0).to(tl.int64)  # int64: offsets into large pools overflow int32
    split = tl.program_id(1)
    b = bkv // Hkv
    hkv = bkv % Hkv
    group = Hq // Hkv
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < group * Lq
    h = hkv * group + r // Lq
    q_pos = r % Lq
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    seq_len = tl.load(seq_lens + b).to(tl.int32)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, seq_len)
    first = _band_start(seq_len, Lq, left, BOUND_LEFT)
    # Chunks past the sequence's end, or wholly before its band, do nothing; the merge never
    # reads them.
    if (lo < seq_len) & (hi > first):
        q_blk = tl.load(
            q + b * sqb + h[:, None] * sqh + q_pos[:, None] * sqm + offs_d[None, :] * sqd,
            mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        offset = seq_len - Lq
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q_blk, b, h, q_pos, row_ok,
            k_pool + hkv * skh, skb, skn, skd, v_pool + hkv * svh, svb, svn, svd,
            k_scale + hkv * sksh, sksb, sksn, v_scale + hkv * svsh, svsb, svsn,
            block_table + b * stb, stj, mask + b * smb + h * smh + q_pos * smm, smn,
            biases, bias_strides, slopes, tl.maximum(lo, first // BLOCK_N * BLOCK_N), hi,
            offset, offset, Lq - 1 + offset, D, Dv, qk_scale, softcap, left, right,
            SOFTCAP, NUM_BIASES, HAS_ALIBI, HAS_MASK, BOOL_MASK, BOUND_LEFT, BOUND_RIGHT,
            NATURAL, True, QUANTIZED, BLOCK_SIZE, DOT, BLOCK_N, BLOCK_D, BLOCK_DV,
        )
        # Partials are [B, Hq, Lq, num_splits, (Dv)]: a row's chunks are adjacent for the
        # merge. A chunk in which a row sees no key stores o_s = 0 and l_s = 0.
        part = ((b * Hq + h) * Lq + q_pos) * num_splits + split
        _store_partial(o_part, m_part, l_part, part, acc, m_i, l_i, row_ok, offs_dv, Dv)


@triton.jit
def _paged_merge_kernel(
    out, sob, soh, som, sod, o_part, m_part, l_part, seq_lens, sinks, Hq, Lq, Dv, num_splits,
    left, NATURAL: tl.constexpr, HAS_SINKS: tl.constexpr, BOUND_LEFT: tl.constexpr,
    SPLIT_LEN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Phase 2: out[row] for one of the B · Hq · Lq rows, from the chunks of its sequence that
    hold keys of its band, merged with a running maximum of their m, and the head's sink. No
    chunk, or only chunks that saw no key (l_s = 0), and no sink gives 0."""
    row = tl.program_id(0).to(tl.int64)
    b = row // (Hq * Lq)
    seq_len = tl.load(seq_lens + b).to(tl.int32)
    used = tl.minimum((seq_len + SPLIT_LEN - 1) // SPLIT_LEN, num_splits)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(_band_start(seq_len, Lq, left, BOUND_LEFT) // SPLIT_LEN, used, BLOCK_S):
        splits = s0 + offs_s
        ok = splits < used
        part = row * num_splits + splits
        m_s = tl.load(m_part + part, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(m_s, axis=0))
        base = _finite_or_zero(m_new)
        w = tl.load(l_part + part, mask=ok, other=0.0) * _exp(m_s - base, NATURAL)
        alpha = _exp(m - base, NATURAL)
        o = tl.load(o_part + part[:, None] * Dv + offs_dv[None, :],
                    mask=ok[:, None] & (offs_dv < Dv)[None, :], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        total = total * alpha + tl.sum(w, axis=0)
        m = m_new
    h = row // Lq % Hq
    acc, total = _with_sink(acc, total, m, sinks, h, NATURAL, HAS_SINKS)
    y = acc / tl.where(total > 0, total, 1.0)
    dst = out + b * sob + h * soh + row % Lq * som
    tl.store(dst + offs_dv * sod, y.to(out.dtype.element_ty), mask=offs_dv < Dv)


def partials(device: torch.device, rows: int, num_splits: int, width: int) -> list[Tensor]:
    """o_part [rows, num_splits, width], m_part and l_part [rows, num_splits], fp32, in the
    workspace kept between calls."""
    n = rows * num_splits
    return carve(workspace(device, n * (width + 2)), (rows, num_splits, width),
                 (rows, num_splits), (rows, num_splits))


def paged_attention(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    is_causal: bool = True,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    mask: Tensor | None = None,
    mods: reference.ScoreMods = reference.PLAIN,
    *,
    layout: str = "bhld",
    split_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """`reference.paged_attention` for fp16, bf16 and fp32 q with pools of q's dtype or int8,
    written in `layout` (`reference.OUT_LAYOUTS`).

    `split_len` (keys per chunk of the split phase, default SPLIT_LEN), `block_m` ((query head,
    query row) pairs per program) and `block_n` (keys per tile) override the defaults, which
    lets tests reach every path on tiny shapes. Every power of two from 16 up is a valid
    block_m / block_n; split_len is rounded up to a multiple of block_n.
    """
    reference.check_paged_attention(q, k_pool, v_pool, block_table, seq_lens, k_scale, v_scale,
                                    mask, mods)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"paged attention kernel supports fp16, bf16 and fp32, got {q.dtype}")
    b, hq, lq, d = q.shape
    _, block_size, hkv, dv = v_pool.shape
    seq_lens = seq_lens.contiguous()  # read as B consecutive lengths (an expand has stride 0)
    out = reference.new_attention_out(q, dv, layout)
    if out.numel() == 0:
        return out
    quantized = k_pool.dtype == torch.int8
    capacity = block_table.shape[1] * block_size

    rows = hq // hkv * lq  # tl.dot needs 16 rows; past 64 rows of q and acc would spill
    bm = block_m or min(64, max(16, triton.next_power_of_2(rows)))
    # Head dim 256 (Gemma 2) with 64-key tiles spills on A100 and H100 (the compile audit).
    bn = block_n or (32 if interpreting() or max(d, dv) > 128 else 64)
    chunk = triton.cdiv(split_len or SPLIT_LEN, bn) * bn
    num_splits = max(1, triton.cdiv(capacity, chunk))
    o_part, m_part, l_part = partials(q.device, b * hq * lq, num_splits, dv)
    var = variants(mods, mask, is_causal, q, (b, hq, lq, capacity))
    biases, bias_strides, slopes, sinks = var.args
    # Without int8 the scale pointers are unused: any tensor with zero strides will do.
    ks = (k_scale, *k_scale.stride()) if quantized else (q, 0, 0, 0)
    vs = (v_scale, *v_scale.stride()) if quantized else (q, 0, 0, 0)
    # The mask is read through the strides of its broadcast view: stride 0 on broadcast dims.
    ms = (q, 0, 0, 0, 0) if mask is None else (mask, *mask.expand(b, hq, lq, -1).stride())
    block_dv = triton.next_power_of_2(dv)
    _paged_split_kernel[(b * hkv, num_splits, triton.cdiv(rows, bm))](
        o_part, m_part, l_part, q, *q.stride(), k_pool, *k_pool.stride(), v_pool, *v_pool.stride(),
        *ks, *vs, block_table, *block_table.stride(), seq_lens, *ms, biases, bias_strides, slopes,
        hq, hkv, lq, d, dv, num_splits,
        float(scale) * (1.0 if var.natural else LOG2E.value), float(mods.softcap), var.left,
        var.right, **var.split_flags(QUANTIZED=quantized, BLOCK_SIZE=block_size, SPLIT_LEN=chunk,
                                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=triton.next_power_of_2(d),
                                     BLOCK_DV=block_dv),
        num_warps=4)
    _paged_merge_kernel[(b * hq * lq,)](
        out, *out.stride(), o_part, m_part, l_part, seq_lens, sinks, hq, lq, dv, num_splits,
        var.left, NATURAL=var.natural, HAS_SINKS=var.flags["HAS_SINKS"],
        BOUND_LEFT=var.flags["BOUND_LEFT"], SPLIT_LEN=chunk,
        BLOCK_S=min(16, triton.next_power_of_2(num_splits)), BLOCK_DV=block_dv)
    return out
