"""Split-KV flash decoding over an MLA latent cache, read in place; see
`reference.paged_latent_attention` and `reference.latent_attention`.

DeepSeek's MLA caches, per token, a latent c [R] (kv_lora_rank, 512) and a rotary key k_rot [P]
(64) shared by all H query heads. In the absorbed form each query head has a latent query q_lat
[R] (q_nope · W_UK) and a rotary query q_rot [P], and

    s_j = (q_lat · c_j + q_rot · k_rot_j) · scale,   out_lat = Σ_j softmax(s)_j c_j:

multi-query attention with one "KV head" whose key is [c | k_rot] and whose value is c itself.
The kernel exploits both: every program holds a block of (query head, query row) pairs of one
sequence — the H · Lq rows are folded together, as FlashMLA does — so each tile of the cache is
loaded once for all of them; and the latent tile is loaded once and used twice, as the key (its
part of q·k) and as the value (the P·V product). The two score terms are two dots, q_lat · cᵀ
over R and q_rot · k_rotᵀ over P, so neither is padded to the power of two above R + P (576 ->
1024 lanes would waste 44% of the products).

Phase 1 (split): one program per (batch, chunk of SPLIT_LEN keys, block of BLOCK_M query rows),
addressing each key through the block table as `triton.paged_attention` does (a tile may span
blocks; the block size is a compile-time constant); the online softmax, the mask and the causal
band are `attention_tiles`' (`_fold`, `_modify`), with the same conventions: a bool mask drops
keys, an additive one is added to scores kept in natural units, causal is bottom-right against
each sequence's length, and a chunk in which a row sees no key stores o_s = 0, l_s = 0. The
tiles below the causal diagonal and before the chunk's end take no mask, compare or -inf guard
beyond the model's mask; the diagonal and tail tiles do. Phase 2 is `triton.paged_attention`'s
merge, over R-wide partial outputs; the partials live in the workspace kept between calls. The
grid is sized by the block table, so launching reads nothing back from the device. int8 pools
are dequantized in registers as there.

A contiguous latent [B, 1, Lk, R] (`latent_attention`) is read as a pool of B blocks of Lk
tokens, one per sequence (a transposed view: no copy), through the table [[0], [1], ...]. With a
table one block wide every key is in that block at its own index, whatever the block's length,
so the kernel addresses it as one block of ONE_BLOCK keys (a power of two above any length): one
compiled kernel for every Lk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.backends import reference
from attnopt.backends.triton import interpreting
from attnopt.backends.triton.attention_tiles import (
    LOG2E,
    _dot,
    _fold,
    _interior,
    _load_kv_tile,
    _locate,
    _modify,
    _store_partial,
    dot_mode,
)
from attnopt.backends.triton.paged_attention import SPLIT_LEN, _paged_merge_kernel, partials

# Fp32 accumulator elements one program may hold ([BLOCK_M, BLOCK_R]): 32 rows of a 512-wide
# latent. More spills registers on a GPU; fewer rows reload each cache tile more often. An int8
# latent takes half: its tile dequantized in fp32 holds as many registers as 16 rows more (the
# compile audit finds 32 rows spilling on A100 and H100).
MAX_ACCUMULATOR = 32 * 512
# The block size a one-block-wide table is addressed with (see the top).
ONE_BLOCK = 1 << 30


@triton.jit
def _latent_tile(
    acc, m_i, l_i, ql, qr, h, q_pos, row_ok, start, hi,
    ckv_pool, scb, scn, scd, krot_pool, skb, skn, skd,
    ckv_scale, sscb, sscn, krot_scale, sskb, sskn, table_row, stj, mask_rows, smn,
    offset, R, P, qk_scale,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
    NATURAL: tl.constexpr, QUANTIZED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT: tl.constexpr, EDGE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The keys [start, start + BLOCK_N) (those before hi) folded into the state; EDGE as in
    `attention_tiles._fold_tile`."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    blk, row = _locate(cols, col_ok, table_row, stj, True, BLOCK_SIZE, EDGE)
    # The latent tile: the keys' first R lanes here, and the values below.
    c = _load_kv_tile(ckv_pool, ckv_scale, blk, row, scb, scn, scd, sscb, sscn,
                      tl.arange(0, BLOCK_R), col_ok, R, ql.dtype, QUANTIZED, EDGE)
    kr = _load_kv_tile(krot_pool, krot_scale, blk, row, skb, skn, skd, sskb, sskn,
                       tl.arange(0, BLOCK_P), col_ok, P, ql.dtype, QUANTIZED, EDGE)
    s = (_dot(ql, tl.trans(c), DOT) + _dot(qr, tl.trans(kr), DOT)) * qk_scale
    # The mask and the causal band (right edge 0); no variant (ql stands in for the pointers
    # of biases and slopes, never read).
    s = _modify(s, cols, col_ok, row_ok, 0, h, q_pos, offset, 0.0, ql, ql, ql, mask_rows, smn,
                -1, 0, False, 0, False, HAS_MASK, BOOL_MASK, False, IS_CAUSAL, EDGE)
    return _fold(acc, m_i, l_i, s, c, NATURAL, EDGE or HAS_MASK, DOT)


@triton.jit
def _latent_split_kernel(
    o_part, m_part, l_part,
    q_lat, sqb, sqh, sqm, sqd, q_rot, srb, srh, srm, srd,
    ckv_pool, scb, scn, sch, scd, krot_pool, skb, skn, skh, skd,
    ckv_scale, sscb, sscn, ssch, krot_scale, sskb, sskn, sskh,
    block_table, stb, stj, seq_lens, mask, smb, smh, smm, smn,
    H, Lq, R, P, num_splits, qk_scale,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
    NATURAL: tl.constexpr, QUANTIZED: tl.constexpr, DOT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SPLIT_LEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Phase 1: keys [split · SPLIT_LEN, (split + 1) · SPLIT_LEN) of sequence b against BLOCK_M
    of its (query head, query row) pairs, flattened as r = h · Lq + i."""
    b = tl.program_id(0).to(tl.int64)  # int64: offsets into large pools overflow int32
    split = tl.program_id(1)
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < H * Lq
    h = r // Lq
    q_pos = r % Lq
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)

    seq_len = tl.load(seq_lens + b).to(tl.int32)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, seq_len)
    if lo < seq_len:  # chunks past the sequence's end do nothing; the merge never reads them
        rows = row_ok[:, None]
        ql = tl.load(q_lat + b * sqb + h[:, None] * sqh + q_pos[:, None] * sqm
                     + offs_r[None, :] * sqd, mask=rows & (offs_r < R)[None, :], other=0.0)
        qr = tl.load(q_rot + b * srb + h[:, None] * srh + q_pos[:, None] * srm
                     + offs_p[None, :] * srd, mask=rows & (offs_p < P)[None, :], other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        table_row = block_table + b * stb
        mask_rows = mask + b * smb + h * smh + q_pos * smm  # row i of query head h's mask
        offset = seq_len - Lq
        # Interior tiles (below every row's causal diagonal, before hi), then the edge tiles.
        _, z = _interior(lo, hi, offset, Lq - 1 + offset, 0, 0, False, IS_CAUSAL, BLOCK_N)
        for start in range(lo, z, BLOCK_N):
            acc, m_i, l_i = _latent_tile(
                acc, m_i, l_i, ql, qr, h, q_pos, row_ok, start, hi,
                ckv_pool, scb, scn, scd, krot_pool, skb, skn, skd,
                ckv_scale, sscb, sscn, krot_scale, sskb, sskn, table_row, stj, mask_rows, smn,
                offset, R, P, qk_scale, HAS_MASK, BOOL_MASK, IS_CAUSAL, NATURAL, QUANTIZED,
                BLOCK_SIZE, DOT, False, BLOCK_N, BLOCK_R, BLOCK_P)
        for start in range(z, hi, BLOCK_N):
            acc, m_i, l_i = _latent_tile(
                acc, m_i, l_i, ql, qr, h, q_pos, row_ok, start, hi,
                ckv_pool, scb, scn, scd, krot_pool, skb, skn, skd,
                ckv_scale, sscb, sscn, krot_scale, sskb, sskn, table_row, stj, mask_rows, smn,
                offset, R, P, qk_scale, HAS_MASK, BOOL_MASK, IS_CAUSAL, NATURAL, QUANTIZED,
                BLOCK_SIZE, DOT, True, BLOCK_N, BLOCK_R, BLOCK_P)

        # Partials [B, H, Lq, num_splits, (R)]: the layout `_paged_merge_kernel` reads.
        part = ((b * H + h) * Lq + q_pos) * num_splits + split
        _store_partial(o_part, m_part, l_part, part, acc, m_i, l_i, row_ok, offs_r, R)


def paged_latent_attention(
    q_lat: Tensor,
    q_rot: Tensor,
    ckv_pool: Tensor,
    krot_pool: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    is_causal: bool = True,
    ckv_scale: Tensor | None = None,
    krot_scale: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    split_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """`reference.paged_latent_attention` for fp16, bf16 and fp32 queries over pools of their
    dtype or int8. `split_len` (keys per chunk), `block_m` ((query head, query row) pairs per
    program) and `block_n` (keys per tile) override the defaults so that tests reach every path
    on tiny shapes; any power of two from 16 up is valid for block_m and block_n."""
    reference.check_paged_latent_attention(q_lat, q_rot, ckv_pool, krot_pool, block_table,
                                           seq_lens, ckv_scale, krot_scale, mask)
    if q_lat.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"latent attention kernel supports fp16, bf16 and fp32, got "
                        f"{q_lat.dtype}")
    b, h, lq, rank = q_lat.shape
    rope, block_size = q_rot.shape[3], ckv_pool.shape[1]
    seq_lens = seq_lens.contiguous()  # read as B consecutive lengths (an expand has stride 0)
    out = torch.empty((b, h, lq, rank), dtype=q_lat.dtype, device=q_lat.device)
    if out.numel() == 0:
        return out
    quantized = ckv_pool.dtype == torch.int8

    rows, block_r = h * lq, triton.next_power_of_2(rank)
    bm = block_m or min(64, max(16, triton.next_power_of_2(rows)),
                        max(16, MAX_ACCUMULATOR // (2 if quantized else 1) // block_r))
    bn = block_n or (32 if interpreting() or block_r >= 512 else 64)
    chunk = triton.cdiv(split_len or SPLIT_LEN, bn) * bn
    num_splits = max(1, triton.cdiv(block_table.shape[1] * block_size, chunk))
    o_part, m_part, l_part = partials(q_lat.device, b * h * lq, num_splits, rank)
    natural = mask is not None and mask.dtype != torch.bool  # additive: natural-unit scores
    # Without int8 the scale pointers are unused: any tensor with zero strides will do.
    cs = (ckv_scale, *ckv_scale.stride()) if quantized else (q_lat, 0, 0, 0)
    ks = (krot_scale, *krot_scale.stride()) if quantized else (q_lat, 0, 0, 0)
    # The mask is read through the strides of its broadcast view: stride 0 on broadcast dims.
    ms = (q_lat, 0, 0, 0, 0) if mask is None else (mask, *mask.expand(b, h, lq, -1).stride())
    _latent_split_kernel[(b, num_splits, triton.cdiv(rows, bm))](
        o_part, m_part, l_part, q_lat, *q_lat.stride(), q_rot, *q_rot.stride(),
        ckv_pool, *ckv_pool.stride(), krot_pool, *krot_pool.stride(), *cs, *ks,
        block_table, *block_table.stride(), seq_lens, *ms,
        h, lq, rank, rope, num_splits,
        float(scale) * (1.0 if natural else LOG2E.value),
        HAS_MASK=mask is not None, BOOL_MASK=mask is not None and mask.dtype == torch.bool,
        IS_CAUSAL=bool(is_causal), NATURAL=natural, QUANTIZED=quantized,
        DOT=dot_mode(q_lat.dtype),
        BLOCK_SIZE=ONE_BLOCK if block_table.shape[1] == 1 else block_size, SPLIT_LEN=chunk,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r, BLOCK_P=triton.next_power_of_2(rope),
        num_warps=8 if block_r >= 256 else 4)
    _paged_merge_kernel[(b * h * lq,)](  # no sinks, no window: their arguments unused
        out, *out.stride(), o_part, m_part, l_part, seq_lens, out, h, lq, rank, num_splits, 0,
        NATURAL=natural, HAS_SINKS=False, BOUND_LEFT=False, SPLIT_LEN=chunk,
        BLOCK_S=min(16, triton.next_power_of_2(num_splits)), BLOCK_DV=block_r)
    return out


def latent_attention(q_lat: Tensor, q_rot: Tensor, c_kv: Tensor, k_rot: Tensor,
                     mask: Tensor | None, is_causal: bool, scale: float, **tiles: int) -> Tensor:
    """`reference.latent_attention`: the contiguous latent [B, 1, Lk, R] as a pool of B blocks
    of Lk tokens ([B, Lk, 1, R], a transposed view), one per sequence, all Lk long."""
    reference.check_latent_attention(q_lat, q_rot, c_kv, k_rot)
    b, lk = c_kv.shape[0], c_kv.shape[2]
    if lk == 0:
        return q_lat.new_zeros(q_lat.shape)
    if mask is not None and mask.dim() < 4:  # the kernel reads a 4-D broadcast view
        mask = mask[(None,) * (4 - mask.dim())]
    table = torch.arange(b, dtype=torch.int32, device=q_lat.device)[:, None]
    lens = torch.full((b,), lk, dtype=torch.int32, device=q_lat.device)
    return paged_latent_attention(q_lat, q_rot, c_kv.transpose(1, 2), k_rot.transpose(1, 2),
                                  table, lens, scale, is_causal, None, None, mask, **tiles)
