"""Row softmax with a fused scale, additive bias and boolean mask.

One program handles one row of N scores. A row that fits in one block is loaded once; a longer
row uses the online softmax (Milakov & Gimelshein, 2018): a first sweep keeps, per lane, the
running maximum m and the running sum d of exp(s - m), rescaling d by exp(m_old - m_new)
whenever the maximum grows; a second sweep writes exp(s - m) / d. Everything is accumulated in
fp32 whatever the input dtype.

-inf is handled so the result matches eager PyTorch: we subtract m only where it is finite, so a
lane or row that has seen only -inf keeps d = 0 instead of turning into NaN through
exp(-inf - -inf). A row that is -inf everywhere therefore ends as 0 / 0 = NaN, as torch.softmax
gives, or as 0 when `SAFE` (aten._safe_softmax).

Bias and mask are read through their own strides, so a broadcast [B, 1, 1, N] mask is never
expanded in memory. Rows are addressed as (i0, i1, i2) over up to three leading dims.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _scores(
    cols, N, x_row, sx, bias_row, sb, mask_row, sm, scale, fill,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, KEEP_MASK: tl.constexpr,
):
    """s = where(mask, fill, x * scale + bias) for one block of columns; -inf past the row end."""
    inside = cols < N
    s = tl.load(x_row + cols * sx, mask=inside, other=0.0).to(tl.float32) * scale
    if HAS_BIAS:
        s += tl.load(bias_row + cols * sb, mask=inside, other=0.0).to(tl.float32)
    if HAS_MASK:
        m = tl.load(mask_row + cols * sm, mask=inside, other=0)
        filled = m == 0 if KEEP_MASK else m != 0
        s = tl.where(filled, fill, s)
    return tl.where(inside, s, float("-inf"))


@triton.jit
def _finite_or_zero(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def softmax_kernel(
    out_ptr,
    x_ptr, sx0, sx1, sx2, sx3,
    bias_ptr, sb0, sb1, sb2, sb3,
    mask_ptr, sm0, sm1, sm2, sm3,
    D1, D2, N,
    scale, fill,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, KEEP_MASK: tl.constexpr,
    SAFE: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i2 = row % D2
    i1 = (row // D2) % D1
    i0 = row // (D1 * D2)
    x_row = x_ptr + i0 * sx0 + i1 * sx1 + i2 * sx2
    bias_row = bias_ptr + i0 * sb0 + i1 * sb1 + i2 * sb2
    mask_row = mask_ptr + i0 * sm0 + i1 * sm1 + i2 * sm2
    out_row = out_ptr + row * N
    cols = tl.arange(0, BLOCK_N)

    if ONE_BLOCK:
        s = _scores(cols, N, x_row, sx3, bias_row, sb3, mask_row, sm3, scale, fill,
                    HAS_BIAS, HAS_MASK, KEEP_MASK)
        m = tl.max(s, axis=0)
        p = tl.exp(s - _finite_or_zero(m))
        y = p / tl.sum(p, axis=0)
    else:
        # Sweep 1: per-lane running max and rescaled running sum.
        m_lane = tl.full([BLOCK_N], float("-inf"), tl.float32)
        d_lane = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            s = _scores(start + cols, N, x_row, sx3, bias_row, sb3, mask_row, sm3, scale, fill,
                        HAS_BIAS, HAS_MASK, KEEP_MASK)
            m_new = tl.maximum(m_lane, s)
            base = _finite_or_zero(m_new)
            d_lane = d_lane * tl.exp(m_lane - base) + tl.exp(s - base)
            m_lane = m_new
        m = tl.max(m_lane, axis=0)
        d = tl.sum(d_lane * tl.exp(m_lane - _finite_or_zero(m)), axis=0)
        # Sweep 2: normalise and store every full block; the last block is stored below.
        for start in range(0, N - BLOCK_N, BLOCK_N):
            s = _scores(start + cols, N, x_row, sx3, bias_row, sb3, mask_row, sm3, scale, fill,
                        HAS_BIAS, HAS_MASK, KEEP_MASK)
            y = tl.exp(s - _finite_or_zero(m)) / d
            if SAFE:
                y = tl.where(m == float("-inf"), 0.0, y)
            tl.store(out_row + start + cols, y.to(out_ptr.dtype.element_ty))
        cols = ((N - 1) // BLOCK_N) * BLOCK_N + cols
        s = _scores(cols, N, x_row, sx3, bias_row, sb3, mask_row, sm3, scale, fill,
                    HAS_BIAS, HAS_MASK, KEEP_MASK)
        y = tl.exp(s - _finite_or_zero(m)) / d
    if SAFE:
        y = tl.where(m == float("-inf"), 0.0, y)
    tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=cols < N)


def _rows_view(t: Tensor, shape: torch.Size) -> tuple[Tensor, tuple[int, int, int, int]]:
    """View `t` (already of `shape`, softmax dim last) as 3 row dims + columns with strides;
    broadcast dims keep stride 0. More than 3 leading dims are flattened (may copy)."""
    if t.dim() > 4:
        t = t.reshape(-1, shape[-3], shape[-2], shape[-1])
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t, tuple(t.stride())


# Rows up to this length are softmaxed from registers in one block; longer rows stream.
MAX_ONE_BLOCK = 8192


def softmax(
    x: Tensor,
    dim: int,
    scale: float,
    bias: Tensor | None,
    mask: Tensor | None,
    fill: float,
    keep_mask: bool,
    safe: bool,
    dtype: torch.dtype,
    block_n: int | None = None,
) -> Tensor:
    """Launch one program per row of `x` (at least 1-D). `block_n` forces the streaming path
    (used by tests to exercise it on small rows)."""
    dim = dim % x.dim()
    xm = x.movedim(dim, -1)
    shape = xm.shape
    n = shape[-1]
    out = torch.empty(shape, dtype=dtype, device=x.device)
    if out.numel() == 0:
        return out.movedim(-1, dim).contiguous()
    x4, sx = _rows_view(xm, shape)
    # Absent bias/mask: pass x as a dummy pointer; the constexpr flags keep it unread.
    b4, sb = (x4, sx) if bias is None else _rows_view(bias.expand(x.shape).movedim(dim, -1), shape)
    m4, sm = (x4, sx) if mask is None else _rows_view(mask.expand(x.shape).movedim(dim, -1), shape)
    d1, d2 = x4.shape[1], x4.shape[2]
    rows = out.numel() // n
    one_block = block_n is None and n <= MAX_ONE_BLOCK
    block = triton.next_power_of_2(n) if one_block else (block_n or 2048)
    softmax_kernel[(rows,)](
        out, x4, *sx, b4, *sb, m4, *sm, d1, d2, n, float(scale), float(fill),
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, KEEP_MASK=keep_mask, SAFE=safe,
        BLOCK_N=block, ONE_BLOCK=one_block, num_warps=8 if block >= 4096 else 4,
    )
    return out.movedim(-1, dim).contiguous()
