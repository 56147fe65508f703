"""Plain-PyTorch implementations of every attnopt op: the ground truth the kernels are tested
against, and the CPU path where ATen already has a fast kernel for each step.

Each function states the op's semantics exactly; the docstrings of `attnopt.backends.ops` point
here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in fp32; fp32 and fp64 in their own precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax(
    x: Tensor,
    dim: int,
    scale: float = 1.0,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    fill: float = float("-inf"),
    keep_mask: bool = False,
    safe: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """softmax(where(mask, fill, x * scale + bias), dim), computed in fp32 (fp64 for fp64 input).

    - `bias` is additive and broadcasts to `x`.
    - `mask` is boolean and broadcasts to `x`: positions where it is True take `fill`
      (`masked_fill` semantics); with `keep_mask=True` the mask marks positions to *keep* and
      the others take `fill` (`where(mask, scores, fill)`, the SDPA convention).
    - `safe=True` gives 0 for rows whose scores are all -inf (`aten._safe_softmax`); otherwise
      such rows are NaN, exactly as `torch.softmax` gives them.
    - The result has dtype `dtype` (default: `x.dtype`) and is contiguous.
    """
    s = x.to(compute_dtype(x.dtype))
    if scale != 1.0:
        s = s * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask if keep_mask else mask, fill)
    y = torch.softmax(s, dim)
    if safe:
        y = y.masked_fill((s == float("-inf")).all(dim, keepdim=True), 0.0)
    return y.to(dtype or x.dtype).contiguous()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q @ kᵀ * scale + mask) @ v over q [B, Hq, Lq, D], k [B, Hkv, Lk, D],
    v [B, Hkv, Lk, Dv], computed in fp32 (fp64 for fp64 input).

    - Grouped-query attention: Hq is a multiple of Hkv; query head h reads KV head
      h // (Hq // Hkv). K/V are never repeated in memory by the kernels.
    - `mask` broadcasts to [B, Hq, Lq, Lk]: boolean means True = attend (SDPA convention); a
      float mask is added to the scaled scores.
    - `is_causal`: bottom-right aligned, query i attends keys j <= i + (Lk - Lq), so a chunk of
      new queries at the end of a longer cache sees the whole past (chunked prefill, decode).
      With Lq == Lk this is the usual lower-triangular mask.
    - Rows where every key is masked give 0 (as SDPA gives them), not NaN.
    - `scale` defaults to 1/sqrt(D). The result is contiguous [B, Hq, Lq, Dv] in q's dtype.
    """
    _, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    cdt = compute_dtype(q.dtype)
    scale = d**-0.5 if scale is None else scale
    group = hq // hkv
    kf = k.to(cdt).repeat_interleave(group, dim=1)
    vf = v.to(cdt).repeat_interleave(group, dim=1)
    s = (q.to(cdt) @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(cdt)
    if is_causal:
        rows = torch.arange(lq, device=q.device)[:, None] + (lk - lq)
        s = s.masked_fill(torch.arange(lk, device=q.device)[None, :] > rows, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # fully masked rows: 0/0 -> 0
    # nan_to_num would also hide NaNs from NaN inputs; keep those visible.
    p = torch.where(torch.isnan(s).any(-1, keepdim=True), float("nan"), p)
    return (p @ vf).to(q.dtype).contiguous()


def w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None,
                 group_size: int) -> Tensor:
    """x @ dequantize(W)ᵀ + bias in fp32, returned in x's dtype. `dequantize` is exact in fp32
    (a 4-bit code times a 16-bit scale), so this is the float reference of the int4 weight."""
    from attnopt.backends import int4

    w = int4.dequantize(qweight, scales, zeros, group_size, x.shape[-1], torch.float32)
    out = x.float() @ w.T
    return (out if bias is None else out + bias.float()).to(x.dtype)
