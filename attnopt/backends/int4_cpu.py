"""The CPU path of `attnopt::w4a16_linear`: ATen's int4 kernel on a repacked copy of the weight.

`aten._weight_int4pack_mm_for_cpu` (the kernel behind torchao's int4 on CPU) reads its own tiled
layout and a `[K/g, N, 2]` table of (scale, zero) with

    W[n, k] = (q - 8) * scale + zero,

so our `(q - z) * s` maps to zero = (8 - z) * s. The repack runs once per weight — the quantize
pass triggers it at compile time — and is cached beside the weight's lifetime.

The kernel is vectorised for bf16 activations only (fp16/fp32 activations are cast to bf16 for
it, which is what "A16" means). It wins at decode sizes (~4-5x over a bf16 `F.linear` at M=1
for a 4096² layer on a 2-core x86 machine) and falls behind a dense bf16 GEMM from a few rows
on, but dequantizing the whole weight for every call costs more still (benchmarks/w4a16.py), so
it is used at every M. Shapes it cannot take (out_features not a multiple of 16) dequantize and
call `F.linear`.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from attnopt.backends import int4

_repacked: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
_repacked_experts: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = {}


def supported(n: int, group_size: int) -> str | None:
    """None if the ATen kernel takes an [n, ·] weight in groups of `group_size`, else why not."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "this torch has no aten._weight_int4pack_mm_for_cpu"
    if n % 16:
        return f"the ATen int4 CPU kernel needs out_features divisible by 16, got {n}"
    return None


def repack(qweight: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """(ATen-packed weight, [K/g, N, 2] bf16 scale-and-zero) for our packed weight, cached."""
    key = (id(qweight), qweight._version)
    if key not in _repacked:
        _repacked[key] = _repack(qweight, scales, zeros)
        weakref.finalize(qweight, _repacked.pop, key, None)
    return _repacked[key]


def _repack(qweight: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    codes = int4.unpack_uint4(qweight).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    s = scales.float()
    table = torch.stack((s, (8 - zeros.float()) * s), dim=-1).transpose(0, 1)
    return packed, table.to(torch.bfloat16).contiguous()


def repack_experts(qweight: Tensor, scales: Tensor, zeros: Tensor) -> list[tuple[Tensor, Tensor]]:
    """`repack` of each expert matrix of stacked packed weights (qweight [E, N, Kp/2], scales
    and zeros [E, N, Kp/g]), cached on the stacked tensor (the slices of one are new objects at
    every call, so they cannot key the cache themselves)."""
    key = (id(qweight), qweight._version, id(scales), id(zeros))
    if key not in _repacked_experts:
        _repacked_experts[key] = [_repack(qweight[e], scales[e], zeros[e])
                                  for e in range(qweight.shape[0])]
        weakref.finalize(qweight, _repacked_experts.pop, key, None)
    return _repacked_experts[key]


def prepare(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> None:
    """Repack now (at compile time) if the ATen kernel will be used for this weight (one
    matrix [N, Kp/2], or the stacked experts [E, N, Kp/2] of `attnopt::moe_w4a16`)."""
    if supported(qweight.shape[-2], group_size) is None:
        if qweight.dim() == 3:
            repack_experts(qweight, scales, zeros)
        else:
            repack(qweight, scales, zeros)


def linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Tensor | None,
           group_size: int) -> Tensor:
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    x2 = x.reshape(-1, x.shape[-1])
    if supported(n, group_size) is None:
        packed, table = repack(qweight, scales, zeros)
        xb = torch.nn.functional.pad(x2.to(torch.bfloat16), (0, kp - x2.shape[-1]))
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, table)
        out = out.to(x.dtype)
        if bias is not None:
            out += bias.to(x.dtype)
    else:
        w = int4.dequantize(qweight, scales, zeros, group_size, x.shape[-1], x.dtype)
        out = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype))
    return out.view(*x.shape[:-1], n)
