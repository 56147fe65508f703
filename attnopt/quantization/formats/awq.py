"""AWQ checkpoints as AutoAWQ writes them in its "gemm" version (`quant_method: "awq"`).

Read from autoawq 0.2.9: awq/modules/linear/gemm.py (`WQLinear_GEMM.from_linear`, the packer)
and awq/utils/packing_utils.py (`dequantize_gemm`, `AWQ_ORDER`, `AWQ_REVERSE_ORDER`).

Per linear `name` (W is [N, K], 4 bits, groups of g along K, G = K / g):

    name.qweight  int32 [K, N/8]   word c of row k: field i (bits 4i..4i+3) holds column
                                   n = 8c + ORDER[i], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    name.qzeros   int32 [G, N/8]   the same interleave
    name.scales   fp16  [G, N]
    name.bias     [N], if the layer has one

    W[n, k] = (q[k, n] - z[k // g, n]) · s[k // g, n]      (no −1 convention)

Packed along N, so the codes are unpacked, put in column order and packed again along K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnopt.backends import int4
from attnopt.quantization.formats.common import (
    CheckpointError,
    Int4Layer,
    Tensors,
    expect,
    finish,
    nibbles,
)

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field i of a word holds column 8c + ORDER[i]
FIELD_OF_COLUMN = tuple(ORDER.index(j) for j in range(8))  # its inverse: column j's field
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class AWQScheme:
    group_size: int
    marker: str = "qweight"

    @classmethod
    def parse(cls, config: dict[str, Any]) -> AWQScheme:
        where = "quantization_config (awq)"
        bits = config.get("bits", config.get("w_bit"))
        if bits != 4:
            raise CheckpointError(f"{where} has bits={bits!r}; attnopt runs 4-bit weights only")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"{where} has version {version!r}; attnopt reads AutoAWQ's "
                                  "'gemm' packing only (gemv, gemv_fast, marlin, exllama and "
                                  "ipex interleave differently)")
        if not config.get("zero_point", True):
            raise CheckpointError(f"{where} has zero_point=false; attnopt reads AWQ with zero "
                                  "points (AutoAWQ's default)")
        group_size = config.get("group_size", config.get("q_group_size"))
        if group_size not in GROUP_SIZES:
            raise CheckpointError(f"{where} has group_size {group_size!r}; attnopt reads AWQ in "
                                  f"groups of {', '.join(map(str, GROUP_SIZES))}")
        return cls(group_size)

    def layer(self, tensors: Tensors, name: str, n: int, k: int, dtype: torch.dtype) -> Int4Layer:
        g = self.group_size
        if n % 8 or k % g:
            raise CheckpointError(f"{name} is [{n}x{k}]: AWQ gemm needs out_features a multiple "
                                  f"of 8 and in_features a multiple of its group size {g}")
        why = f"for a [{n}x{k}] linear in groups of {g},"
        qweight = expect(tensors.take(f"{name}.qweight"), f"{name}.qweight", (k, n // 8),
                         (torch.int32,), why)
        qzeros = expect(tensors.take(f"{name}.qzeros", " (AWQ stores a zero point per group)"),
                        f"{name}.qzeros", (k // g, n // 8), (torch.int32,), why)
        scales = expect(tensors.take(f"{name}.scales"), f"{name}.scales", (k // g, n),
                        (torch.float16, torch.bfloat16, torch.float32), why)
        codes = _columns(qweight)  # [K, N]
        return finish(int4.pack_uint4(codes.T), scales.T, _columns(qzeros).T, g, k, dtype)


def _columns(words: torch.Tensor) -> torch.Tensor:
    """[R, N/8] int32 in AWQ's interleave → [R, N] uint8 codes in column order."""
    fields = nibbles(words).view(words.shape[0], -1, 8)
    return fields[..., list(FIELD_OF_COLUMN)].reshape(words.shape[0], -1)
