"""Fused attention forward: softmax(q @ kᵀ * scale + mask) @ v with the variants of
`reference.ScoreMods`, see `reference.attention`. The online softmax, the variants on a tile of
scores and the interior/edge split of the key loop are `attention_tiles`'.

- Prefill (Lq > DECODE_MAX_Q): one program per (BLOCK_M query rows, batch · query head). The key
  loop visits only the keys some row of the block keeps (bottom-right causal: query i sees keys
  j <= i + Lk - Lq, so blocks above the diagonal are never loaded; a window's blocks before its
  band neither), the interior tiles without any mask or compare, the diagonal and tail tiles
  with them.
- Decode (Lq <= DECODE_MAX_Q): flash decoding (Dao et al., 2023). One query block is far too
  little work for a GPU, so the keys are split into chunks and one program handles one
  (batch, KV head, chunk) for every query row of every query head that reads this KV head: the
  chunk of K/V is read once per group, not once per query head. Each program writes, per row,
  its normalised partial output o_s and its softmax state (m_s, l_s) into a workspace kept
  between calls (`workspace`); a second kernel merges the chunks: out = Σ_s w_s o_s / Σ_s w_s
  with w_s = l_s · exp(m_s - max_s m_s). The state is kept as (m, l) rather than a log-sum-exp
  m + log l, which loses log l when m is -3.4e38 (a row masked everywhere by a finite fill),
  where the chunks must still weigh by their counts. A call makes LAUNCHES["decode"] launches
  and allocates only its output.

Grouped-query attention is pure indexing (query head h reads KV head h // (Hq // Hkv)), and q,
k, v, the mask, the biases and the output are read and written through their strides: a
transposed q or a mask broadcast over heads (stride 0) is never copied, and the output can be
written straight into the [B, L, H, Dv] layout the heads-merging reshape after attention reads
(`reference.new_attention_out`).

The variants are applied to each tile of scores in the reference's order: softcap, biases,
ALiBi, mask, then the band of keys the window and the causal flag keep. The band also bounds the
loops: prefill visits only the key blocks some row of its block keeps, and decode splits only
the keys between the first row's first key and the last row's last, so a 4k window at 32k
context reads 4k keys. A sink is a logit with no value: prefill starts each row's state at
(m, l) = (sink, 1) instead of (-inf, 0), and the split-KV merges add it as one more chunk with
weight e^(sink - m) and no output.

Prefill configs are autotuned per architecture (`tuning.autotune`) from lists the compile audit
(`attnopt.backends.triton.audit`) finds free of spills and within shared memory for every head
dim, dtype and variant the pruner lets them serve (`prune_prefill`), keyed by the buckets of Lq
and Lk, the head dims, every variant flag and the biases' bytes per element (`PREFILL_KEY`, with
the dtypes of q and the mask): a second prompt length in the same bucket never tunes again, and
a config tuned for one call is never reused for a call the pruner would give other configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnopt.backends import reference
from attnopt.backends.triton import interpreting, tuning
from attnopt.backends.triton.attention_tiles import (
    LOG2E,
    _attend,
    _exp,
    _finite_or_zero,
    _initial_state,
    _store_partial,
    _with_sink,
    dot_mode,
)
from attnopt.backends.triton.workspace import carve, workspace

# Query lengths up to this take the split-KV decode path.
DECODE_MAX_Q = 16
# Under the default split count every chunk has at least this many keys, so the partial
# outputs and the merge stay small next to the attention work.
MIN_KEYS_PER_SPLIT = 256
# Triton launches of one call, by path (`tests/backends/test_launch_counts.py` holds them).
LAUNCHES = {"prefill": 1, "decode": 2}
# The compile-time flags of the variants: every kernel that folds keys takes them, and each is
# part of the prefill's tuning key (they change what a tile costs).
VARIANT_FLAGS = ("SOFTCAP", "NUM_BIASES", "HAS_ALIBI", "HAS_SINKS", "HAS_MASK", "BOOL_MASK",
                 "BOUND_LEFT", "BOUND_RIGHT", "NATURAL")


@triton.jit
def _attn_fwd(
    out, sob, soh, som, sod, q, sqb, sqh, sqm, sqd, k, skb, skh, skn, skd, v, svb, svh, svn, svd,
    mask, smb, smh, smm, smn, biases, bias_strides, slopes, sinks,
    Hq, Hkv, Lq, Lk, D, Dv, qk_scale, softcap, left, right, lq_bucket, lk_bucket, bias_bytes,
    SOFTCAP: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
    BOUND_LEFT: tl.constexpr, BOUND_RIGHT: tl.constexpr,
    NATURAL: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Prefill: out[b, h, rows] for one block of BLOCK_M query rows of one (batch, head).
    lq_bucket, lk_bucket and bias_bytes are the autotuner's key, unused here."""
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
    offset = Lk - Lq
    last = tl.minimum(start_m + BLOCK_M, Lq) - 1
    lo = 0
    hi = Lk
    if BOUND_LEFT:
        lo = tl.maximum(0, start_m + offset - left) // BLOCK_N * BLOCK_N
    if BOUND_RIGHT:
        hi = tl.minimum(Lk, last + 1 + offset + right)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i, l_i = _initial_state(sinks, heads, row_ok, NATURAL, HAS_SINKS, BLOCK_M)
    # K/V are one run of keys per (batch, KV head): no block table, no scales (q stands in
    # for the pointers that are never read).
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q_blk, b, heads, rows, row_ok,
        k + b * skb + hkv * skh, 0, skn, skd, v + b * svb + hkv * svh, 0, svn, svd,
        q, 0, 0, q, 0, 0, q, 0, mask + b * smb + h * smh + rows * smm, smn,
        biases, bias_strides, slopes, lo, hi, offset, start_m + offset, last + offset, D, Dv,
        qk_scale, softcap, left, right,
        SOFTCAP, NUM_BIASES, HAS_ALIBI, HAS_MASK, BOOL_MASK, BOUND_LEFT, BOUND_RIGHT, NATURAL,
        False, False, 1, DOT, BLOCK_N, BLOCK_D, BLOCK_DV,
    )
    # Rows that saw no unmasked key (and no sink) have l = 0 and acc = 0: they give 0.
    y = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + b * sob + h * soh + rows[:, None] * som + offs_dv[None, :] * sod,
             y.to(out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < Dv)[None, :])


# --- prefill configs: per arch, pruned per head dim and variant, tuned per bucket -------------

def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


# The CUDA search spaces per arch, largest tiles first; `prune_prefill` keeps, for one call, those
# whose registers and shared memory fit its head dims, dtype and variants. The compile audit
# (`python -m attnopt.backends.triton.audit --family attention`) checks that every config the
# pruner keeps compiles without spills and within the arch's shared memory. 8 warps carry the
# 128-row tiles at head dim 128 and the 64-row tiles at head dim 256. sm_80 has no 4-warp
# config: with the variants' tiles (a bias, softcap, ALiBi) even 64x32 spills there.
_SHARED_PREFILL = [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 8, 2)]
PREFILL_CONFIGS = {
    "sm80": _configs(_SHARED_PREFILL),
    # wgmma keeps the accumulator in fewer registers and H100 has 227 KB of shared memory.
    "sm90": _configs([(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 8, 3),
                      (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 8, 2)]),
}
# Live fp32 values per thread a config may plan for (`_prefill_registers`) before ptxas spills:
# calibrated on the audit's figures (sm_80's mma.sync holds q's fragments in registers too).
REGISTER_BUDGET = {"sm80": 128, "sm90": 160}


def _prefill_registers(c: triton.Config, block_d: int, block_dv: int, q_bytes: int,
                       extra_tiles: int) -> float:
    """Live 32-bit values per thread of `_attn_fwd` under config c: the fp32 accumulator
    [BLOCK_M, BLOCK_DV], the fp32 scores [BLOCK_M, BLOCK_N] (and one more such tile for each
    mask or bias tile added to them), and q [BLOCK_M, BLOCK_D], over 32 · num_warps threads."""
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    words = bm * block_dv + bm * bn * (1 + extra_tiles) + bm * block_d * q_bytes / 4
    return words / (32 * c.num_warps)


def _prefill_shared(c: triton.Config, arch: str, block_d: int, block_dv: int, q_bytes: int,
                    tile_bytes: int) -> int:
    """Bytes of shared memory `_attn_fwd` takes under config c: q [BLOCK_M, BLOCK_D], the K and
    V tiles [BLOCK_N, BLOCK_D / BLOCK_DV] once per pipeline stage on sm_90 (one stage fewer on
    sm_80, which also stages P [BLOCK_M, BLOCK_N] there for mma.sync's operand layout), and the
    mask and bias tiles [BLOCK_M, BLOCK_N] (tile_bytes per element, all of them) in all but one
    stage. The audit's figures: 352 KB on sm_80 and 448 KB on sm_90 for 128x128, head dim 256,
    3 stages; 288 KB on sm_90 at head dim 128 with a bf16 additive mask."""
    bm, bn, stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    kv = bn * (block_d + block_dv) * q_bytes
    staged = stages * kv if arch == "sm90" else (stages - 1) * kv + bm * bn * q_bytes
    return bm * block_d * q_bytes + staged + (stages - 1) * bm * bn * tile_bytes


def prune_prefill(configs: list[triton.Config], named_args: dict) -> list[triton.Config]:
    """The configs of `configs` whose registers (`_prefill_registers`, within the arch's
    REGISTER_BUDGET) and shared memory (`_prefill_shared`, within the device's) fit this call's
    head dims, dtype and variants, and, of those, the ones whose row tile a short prompt fills.
    The last config of every list (64x32, 8 warps, 2 stages: fp32 at head dim 256) is kept if
    nothing else fits."""
    q = named_args["q"]
    arch, smem = "sm90", 227 * 1024
    if q.device.type != "cpu":
        info = tuning.device_info(q.device)
        arch, smem = info.arch, info.smem_per_block
    block_d, block_dv = named_args["BLOCK_D"], named_args["BLOCK_DV"]
    q_bytes = q.element_size()
    # Only what the tuning key holds (PREFILL_KEY, and the dtypes of the tensor arguments:
    # q's, the mask's), so that a key tuned once never serves a call this would prune
    # otherwise. The biases are a tuple, whose dtypes the autotuner does not see: their bytes
    # per element are the key argument bias_bytes.
    mask_bytes = named_args["mask"].element_size() if named_args["HAS_MASK"] else 0
    tiles = int(named_args["HAS_MASK"]) + named_args["NUM_BIASES"]
    fits = [c for c in configs
            if _prefill_registers(c, block_d, block_dv, q_bytes, tiles) <= REGISTER_BUDGET[arch]
            and _prefill_shared(c, arch, block_d, block_dv, q_bytes,
                                mask_bytes + named_args["bias_bytes"]) <= smem]
    fits = fits or configs[-1:]
    shortest = min(c.kwargs["BLOCK_M"] for c in fits)
    return [c for c in fits if c.kwargs["BLOCK_M"] <= max(shortest, named_args["lq_bucket"])]


PREFILL_KEY = ["lq_bucket", "lk_bucket", "bias_bytes", "D", "Dv", *VARIANT_FLAGS]
_attn_fwd_tuned = tuning.autotune(
    PREFILL_CONFIGS, key=PREFILL_KEY, prune=prune_prefill,
    # One small config under the interpreter: tuning there would take minutes.
    interpreter_config=triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4,
                                     num_stages=1))(_attn_fwd)


@triton.jit
def _decode_split_kernel(
    o_part, m_part, l_part, q, sqb, sqh, sqm, sqd, k, skb, skh, skn, skd,
    v, svb, svh, svn, svd, mask, smb, smh, smm, smn, biases, bias_strides, slopes,
    B, Hq, Hkv, Lq, Lk, D, Dv, qk_scale, softcap, left, right, band_lo, band_hi, split_len,
    SOFTCAP: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, BOUND_LEFT: tl.constexpr,
    BOUND_RIGHT: tl.constexpr, NATURAL: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Decode, phase 1: keys [band_lo + split · split_len, band_lo + (split + 1) · split_len)
    (up to band_hi) of one (batch, KV head) against BLOCK_M of the group's (query head, query
    row) pairs, flattened as r = g · Lq + i."""
    bkv = tl.program_id(0).to(tl.int64)
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

    q_blk = tl.load(
        q + b * sqb + h[:, None] * sqh + q_pos[:, None] * sqm + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    lo = band_lo + split * split_len
    hi = tl.minimum(lo + split_len, band_hi)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    offset = Lk - Lq
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q_blk, b, h, q_pos, row_ok,
        k + b * skb + hkv * skh, 0, skn, skd, v + b * svb + hkv * svh, 0, svn, svd,
        q, 0, 0, q, 0, 0, q, 0, mask + b * smb + h * smh + q_pos * smm, smn,
        biases, bias_strides, slopes, lo, hi, offset, offset, Lq - 1 + offset, D, Dv,
        qk_scale, softcap, left, right,
        SOFTCAP, NUM_BIASES, HAS_ALIBI, HAS_MASK, BOOL_MASK, BOUND_LEFT, BOUND_RIGHT, NATURAL,
        False, False, 1, DOT, BLOCK_N, BLOCK_D, BLOCK_DV,
    )
    # Partials are [splits, B, Hq, Lq, (Dv)]. A chunk with no unmasked key for a row stores
    # o_s = 0 and l_s = 0, so the merge gives it weight 0.
    part = ((split * B + b) * Hq + h) * Lq + q_pos
    _store_partial(o_part, m_part, l_part, part, acc, m_i, l_i, row_ok, offs_dv, Dv)


@triton.jit
def _decode_merge_kernel(
    out, sob, soh, som, sod, o_part, m_part, l_part, sinks, R, S, Hq, Lq, Dv,
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
    h = row // Lq % Hq
    acc, total = _with_sink(tl.sum(w[:, None] * o, axis=0), tl.sum(w, axis=0), m, sinks, h,
                            NATURAL, HAS_SINKS)
    y = acc / tl.where(total > 0, total, 1.0)
    dst = out + row // (Hq * Lq) * sob + h * soh + row % Lq * som
    tl.store(dst + offs_dv * sod, y.to(out.dtype.element_ty), mask=offs_dv < Dv)


def _default_splits(q: Tensor, programs: int, lk: int) -> int:
    """Enough chunks that the split kernel has about two programs per SM (the SM count read
    once per device)."""
    if interpreting():
        return 2
    sms = tuning.device_info(q.device).sms
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
        DOT=dot_mode(q.dtype),
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
    layout: str = "bhld",
    decode_split: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """softmax(q @ kᵀ * scale + mask) @ v with the variants `mods`, exactly as
    `reference.attention`, for fp16, bf16 and fp32 q [B, Hq, Lq, D], k [B, Hkv, Lk, D],
    v [B, Hkv, Lk, Dv], written in `layout` (`reference.OUT_LAYOUTS`).

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
    out = reference.new_attention_out(q, dv, layout)
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
        shape_args = (biases, bias_strides, slopes, sinks, hq, hkv, lq, lk, d, dv, *numbers,
                      tuning.bucket(lq), tuning.bucket(lk),
                      sum(t.element_size() for t in mods.biases))
        if block_m is None and block_n is None:
            grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * hq)
            _attn_fwd_tuned[grid](out, *out.stride(), *args, *shape_args, **flags)
        else:
            bm, bn = block_m or 64, block_n or 64
            _attn_fwd[(triton.cdiv(lq, bm), b * hq)](
                out, *out.stride(), *args, *shape_args, **flags, BLOCK_M=bm, BLOCK_N=bn,
                num_warps=4)
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
    r = b * hq * lq
    o_part, m_part, l_part = carve(workspace(q.device, splits * r * (dv + 2)),
                                   (splits, r, dv), (splits, r), (splits, r))
    _decode_split_kernel[(b * hkv, splits, row_blocks)](
        o_part, m_part, l_part, *args, biases, bias_strides, slopes, b, hq, hkv, lq, lk, d, dv,
        *numbers, band_lo, band_hi, split_len,
        **var.split_flags(BLOCK_D=flags["BLOCK_D"], BLOCK_DV=flags["BLOCK_DV"]),
        BLOCK_M=bm, BLOCK_N=block_n or 64, num_warps=4)
    _decode_merge_kernel[(r,)](
        out, *out.stride(), o_part, m_part, l_part, sinks, r, splits, hq, lq, dv,
        NATURAL=var.natural, HAS_SINKS=flags["HAS_SINKS"],
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=flags["BLOCK_DV"])
    return out
