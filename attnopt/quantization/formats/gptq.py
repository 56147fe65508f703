"""GPTQ checkpoints as AutoGPTQ and GPTQModel write them (`quant_method: "gptq"`).

Read from the tools' own code (the packer and its reference dequantization):
  auto_gptq 0.7.1, auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py (`QuantLinear.pack`,
  `forward`'s torch path), auto_gptq/quantization/gptq.py (`fasterquant`: g_idx);
  gptqmodel 7.7, gptqmodel/utils/model.py (`convert_gptq_v1_to_v2_format_module`).

Per linear `name` (W is [N, K], 4 bits, groups of g along K, G = ceil(K / g)):

    name.qweight  int32 [K/8, N]   word r of column n holds k = 8r + j in bits 4j..4j+3
    name.qzeros   int32 [G, N/8]   word c of row i holds the zero of column n = 8c + j, bits 4j
    name.scales   fp16  [G, N]
    name.g_idx    int32 [K]        the group of column k (k // g unless act-order, `desc_act`)
    name.bias     [N], if the layer has one

    W[n, k] = (q[k, n] - z[g_idx[k], n]) · s[g_idx[k], n]

The v1 convention (`checkpoint_format: "gptq"`, what both tools write by default) stores z − 1;
GPTQModel reads it back by adding 0x11111111 to each 32-bit word (one to every field, the carry
of a field that held −1 going to the next one, which undoes its own word-wise subtraction
exactly; AutoGPTQ's fields never wrap for z ≥ 1, where both readings agree). `gptq_v2` stores z.

qweight transposed is our layout: its column n, read as bytes, is row n of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnopt.quantization.formats.common import (
    CheckpointError,
    Int4Layer,
    Tensors,
    expect,
    finish,
    int32_bytes,
    nibbles,
    supported_group_size,
)

V1_OFFSET = 0x11111111  # one in each of the eight 4-bit fields
FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQScheme:
    group_size: int
    v1_zeros: bool  # zeros stored minus one
    desc_act: bool
    marker: str = "qweight"  # the tensor suffix that marks a quantized linear

    @classmethod
    def parse(cls, config: dict[str, Any]) -> GPTQScheme:
        where = "quantization_config (gptq)"
        bits = config.get("bits")
        if bits != 4:
            raise CheckpointError(f"{where} has bits={bits!r}; attnopt runs 4-bit weights only")
        found = config.get("checkpoint_format", config.get("format", "gptq"))
        if found not in FORMATS:
            raise CheckpointError(
                f"{where} has checkpoint_format {found!r}; attnopt reads {' and '.join(FORMATS)} "
                "(marlin-, bitblas- or exllama-repacked weights are not read: load the "
                "checkpoint in its gptq format)")
        pack_dtype = config.get("pack_dtype", "int32")
        if str(pack_dtype).removeprefix("torch.") != "int32":
            raise CheckpointError(f"{where} has pack_dtype {pack_dtype!r}; attnopt reads int32")
        group_size = config.get("group_size", -1)
        supported_group_size(group_size, where)
        return cls(group_size, found == "gptq", bool(config.get("desc_act", False)))

    def layer(self, tensors: Tensors, name: str, n: int, k: int, dtype: torch.dtype) -> Int4Layer:
        if k % 8 or n % 8:
            raise CheckpointError(f"{name} is [{n}x{k}]: GPTQ packs 8 values per word, so both "
                                  "dims must be multiples of 8")
        g = k if self.group_size == -1 else self.group_size
        groups = -(-k // g)
        why = f"for a [{n}x{k}] linear in groups of {g},"
        qweight = expect(tensors.take(f"{name}.qweight"), f"{name}.qweight", (k // 8, n),
                         (torch.int32,), why)
        qzeros = expect(tensors.take(f"{name}.qzeros", " (GPTQ stores a zero point per group, "
                                     "symmetric or not)"),
                        f"{name}.qzeros", (groups, n // 8), (torch.int32,), why)
        scales = expect(tensors.take(f"{name}.scales"), f"{name}.scales", (groups, n),
                        (torch.float16, torch.bfloat16, torch.float32), why)
        g_idx = None
        if f"{name}.g_idx" in tensors:
            g_idx = expect(tensors.take(f"{name}.g_idx"), f"{name}.g_idx", (k,),
                           (torch.int32, torch.int64), why)
        elif self.desc_act:
            raise CheckpointError(f"the checkpoint has no tensor '{name}.g_idx', which "
                                  "desc_act=true needs (the group of each column)")
        words = qzeros.long() + V1_OFFSET if self.v1_zeros else qzeros.long()
        zeros = nibbles(words & 0xFFFFFFFF)  # [G, N]
        return finish(int32_bytes(qweight.T), scales.T, zeros.T, self.group_size, k, dtype,
                      g_idx, where=f"{name}: ")
