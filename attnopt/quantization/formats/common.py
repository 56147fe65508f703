"""What the pre-quantized checkpoint readers share: the directory's safetensors read lazily by
name, 4-bit codes out of int32 words, and the conversion of one layer into attnopt's packed
layout (`backends/int4.py`: qweight [N, Kp/2] uint8 low nibble first, scales and zeros
[N, Kp/g] with W[n, k] = (q - z) · s).

Every format stores, per linear layer, 4-bit codes q, a scale s and an integer zero point z per
group of input columns, with W = (q - z) · s; they differ only in how the codes are packed and
in how z is stored. `finish` takes a layer once its codes are in our byte order and makes it a
`PackedInt4` our kernels take: groups of 32/64/128, K padded to a whole group with the zero
point's code (it dequantizes to exactly 0), and column groups made contiguous when a GPTQ
`g_idx` scatters them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from attnopt.backends import int4


class CheckpointError(ValueError):
    """A pre-quantized checkpoint attnopt cannot read: unsupported, malformed, or not fitting
    its own config. The message names what was found and what attnopt reads."""


@dataclass(frozen=True)
class Int4Layer:
    """One linear layer converted: its packed weight, and the input order its columns follow
    (None: the natural order)."""

    packed: int4.PackedInt4
    input_order: Tensor | None = None


class Tensors:
    """The tensors of every `*.safetensors` file in a directory, read one at a time by name
    (a shard is opened per read: nothing but the tensor asked for is kept in memory).
    `take` records what was read, so that `unread` can name what no reader asked for."""

    def __init__(self, directory: Path):
        self.files: dict[str, Path] = {}
        self.taken: set[str] = set()
        for path in sorted(directory.glob("*.safetensors")):
            try:
                with safe_open(path, "pt") as f:
                    for key in f.keys():  # noqa: SIM118  (safe_open has keys(), no __iter__)
                        self.files[key] = path
            except SafetensorError as e:
                raise CheckpointError(f"{path} is not a readable safetensors file ({e}): it is "
                                      "corrupt or truncated") from None
        if not self.files:
            raise CheckpointError(f"{directory} has no .safetensors weights (pytorch_model.bin "
                                  "is not read: it is a pickle)")

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def take(self, key: str, what: str = "") -> Tensor:
        if key not in self.files:
            raise CheckpointError(f"the checkpoint has no tensor {key!r}{what}")
        self.taken.add(key)
        with safe_open(self.files[key], "pt") as f:
            return f.get_tensor(key)

    def unread(self) -> list[str]:
        return sorted(set(self.files) - self.taken)


def nibbles(words: Tensor) -> Tensor:
    """[..., W] int32 (or int64 holding 32-bit words) → [..., 8W] uint8: the eight 4-bit
    fields of each word, lowest bits first."""
    shifts = torch.arange(0, 32, 4, dtype=words.dtype)
    return ((words[..., None] >> shifts) & 0xF).to(torch.uint8).flatten(-2)


def int32_bytes(words: Tensor) -> Tensor:
    """[..., W] int32 → [..., 4W] uint8 without a copy: its bytes in memory order, which on a
    little-endian machine puts field 2i of a word in the low nibble of byte i and field 2i+1
    in its high nibble — our packing, for codes packed lowest bits first."""
    if sys.byteorder != "little":  # a view would swap the fields; nothing we run on
        return int4.pack_uint4(nibbles(words).flatten(0, -2)).view(*words.shape[:-1], -1)
    return words.contiguous().view(torch.uint8)


def expect(tensor: Tensor, key: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
           why: str) -> Tensor:
    """`tensor` (the checkpoint's `key`) if it has `shape` and one of `dtypes`, else a
    CheckpointError saying what the config and the model made us expect, and why."""
    if tuple(tensor.shape) != shape or tensor.dtype not in dtypes:
        raise CheckpointError(
            f"{key} is {tensor.dtype} {list(tensor.shape)}, but {why} it must be "
            f"{' or '.join(str(d) for d in dtypes)} {list(shape)}: the checkpoint disagrees with "
            "its config.json (or the model its config builds)")
    return tensor


def supported_group_size(group_size: int, where: str) -> None:
    """Group sizes we read: 32/64/128 as they are, per-channel (-1) and multiples of 128 as
    groups of 128 with the scale repeated (exact; a little more memory for scales)."""
    if not (group_size in int4.GROUP_SIZES or group_size == -1
            or (group_size > 0 and group_size % 128 == 0)):
        raise CheckpointError(
            f"{where} has group_size {group_size}; attnopt reads 32, 64, 128, multiples of 128 "
            "and -1 (one group per row)")


def finish(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, in_features: int,
           dtype: torch.dtype, g_idx: Tensor | None = None, where: str = "") -> Int4Layer:
    """A layer in our layout from `qweight [N, K/2]` (uint8, our nibble order, columns in the
    checkpoint's order), `scales` and `zeros` [N, groups] (zeros as integer codes 0..15) in
    groups of `group_size` columns (-1: all K), and GPTQ's `g_idx [K]` (the group of each
    column) when the checkpoint has one.

    - g_idx that is not k // group_size (act-order): the columns are sorted by group, once,
      and the sort becomes the layer's input order; each group must then hold exactly
      `group_size` consecutive sorted columns, or the layout cannot express it.
    - A group size our kernels lack (-1, 256, ...) becomes groups of 128, each with its source
      group's scale and zero: the same weight.
    - K is padded to a whole group with the zero point's code.
    """
    k = in_features
    size = k if group_size == -1 else group_size
    order = None
    if g_idx is not None:
        order = _group_order(g_idx, size, k, where)
        if order is not None:
            qweight = int4.pack_uint4(int4.unpack_uint4(qweight)[:, order])
    target = size if size in int4.GROUP_SIZES else 128
    kp = int4.padded(k, target)
    source = torch.arange(kp // target) * target // size  # the source group of each group
    scales, zeros = scales[:, source].to(dtype), zeros[:, source].to(torch.uint8)
    if kp > k:
        codes = torch.cat((int4.unpack_uint4(qweight),
                           zeros.repeat_interleave(target, dim=1)[:, k:]), dim=1)
        qweight = int4.pack_uint4(codes)
    return Int4Layer(int4.PackedInt4(qweight.contiguous(), scales.contiguous(),
                                     zeros.to(dtype).contiguous(), target, k), order)


def _group_order(g_idx: Tensor, size: int, k: int, where: str) -> Tensor | None:
    """The column order that makes each group of `g_idx` contiguous (a stable sort by group),
    or None when it already is; refused unless sorted group i holds columns i·size ... ."""
    g_idx = g_idx.long()
    order = torch.sort(g_idx, stable=True).indices
    natural = torch.arange(k)
    if not torch.equal(g_idx[order], natural // size):
        raise CheckpointError(
            f"{where}g_idx does not give each group exactly {size} columns (the group_size "
            "of its config), so its groups do not fit a packed layout")
    return None if torch.equal(order, natural) else order
