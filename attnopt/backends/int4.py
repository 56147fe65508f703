"""The packed int4 weight format of `attnopt::w4a16_linear`, and round-to-nearest quantization.

A weight `W [N, K]` (out features × in features) is cut along K into groups of `group_size`
columns. Each group of each row gets an asymmetric uint4 code: a scale `s` and an integer zero
point `z` in [0, 15] with

    W[n, k] ≈ (q[n, k] - z[n, k // g]) * s[n, k // g],   q in [0, 15].

Storage (the layout of ONNX Runtime's `MatMulNBits`, so export is a reshape):

- `qweight [N, Kp/2] uint8`: two codes per byte, the even k in the low nibble. `Kp` is K rounded
  up to a multiple of `group_size`; the padding columns hold the zero point (they dequantize to
  exactly 0), so a kernel may read them against zero-padded activations.
- `scales [N, Kp/g]` and `zeros [N, Kp/g]` in the activation dtype; zeros hold integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class PackedInt4:
    """One packed weight: what a `w4a16_linear` call reads, besides the activations."""

    qweight: Tensor  # [N, Kp/2] uint8
    scales: Tensor  # [N, Kp/g]
    zeros: Tensor  # [N, Kp/g]
    group_size: int
    in_features: int  # K before padding

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.group_size,
                          self.in_features, dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def padded(k: int, group_size: int) -> int:
    return -(-k // group_size) * group_size


def pack_uint4(q: Tensor) -> Tensor:
    """[N, K] integer codes in [0, 15] (K even) → [N, K/2] uint8, even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_uint4(p: Tensor) -> Tensor:
    """The inverse of `pack_uint4`: [N, K/2] uint8 → [N, K] uint8 codes."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)


def quantize_rtn(w: Tensor, group_size: int = 128, dtype: torch.dtype | None = None) -> PackedInt4:
    """Round-to-nearest asymmetric group quantization of `w [N, K]`.

    Per group the range [min, max] (widened to include 0, so zero is exact) maps onto [0, 15]:
    s = (max - min) / 15, z = round(-min / s). Statistics are taken in fp32 whatever `w`'s dtype;
    scales and zeros are stored in `dtype` (default: `w.dtype`) and the codes are computed
    against the *stored* scale, so rounding the scale costs no extra error.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_rtn takes a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    dtype = dtype or w.dtype
    n, k = w.shape
    kp = padded(k, group_size)
    wf = torch.nn.functional.pad(w.detach().float(), (0, kp - k)).view(n, kp // group_size,
                                                                       group_size)
    scales, zeros = scale_and_zero(wf, dtype)
    s = scales.float()
    q = (wf / s[..., None] + zeros[..., None]).round().clamp(0, 15)
    # The padding columns dequantize to exactly 0 (their code is the zero point).
    q.view(n, kp)[:, k:] = zeros.repeat_interleave(group_size, dim=1)[:, k:]
    return PackedInt4(pack_uint4(q.view(n, kp)), scales, zeros.to(dtype), group_size, k)


def scale_and_zero(groups: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(scale in `dtype`, zero point as fp32 integers) of each group, the last dim of fp32
    `groups` [..., g]: the range [min, max], widened to include 0, onto [0, 15]; the zero is
    computed against the stored (rounded) scale. GPTQ (`quantization/gptq.py`) calls this too,
    so its groups are coded exactly as round-to-nearest codes them."""
    lo = groups.amin(-1).clamp(max=0.0)
    hi = groups.amax(-1).clamp(min=0.0)
    scales = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
    zeros = (-lo / scales.float()).round().clamp(0, 15)
    return scales, zeros


def dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
               in_features: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """(q - z) * s per group, as `[N, in_features]` in `dtype` (default: the scales' dtype).
    Computed in fp32 and rounded once."""
    n = qweight.shape[0]
    q = unpack_uint4(qweight).float().view(n, -1, group_size)
    w = ((q - zeros.float()[..., None]) * scales.float()[..., None]).view(n, -1)
    return w[:, : in_features or w.shape[1]].to(dtype or scales.dtype)
