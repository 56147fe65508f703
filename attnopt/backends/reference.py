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
