"""compressed-tensors checkpoints in the "pack-quantized" format (`quant_method:
"compressed-tensors"`, what llmcompressor writes and vLLM serves).

Read from compressed-tensors 0.20.1: compressors/pack_quantized/base.py
(`PackedQuantizationCompressor.compress` / `decompress`), compressors/pack_quantized/helpers.py
(`pack_to_int32`, `unpack_from_int32`), quantization/lifecycle/forward.py (`dequantize`), and
utils/match.py (`is_match`, `match_name`, `_match_class`: which modules a scheme targets).

The config lists `config_groups`, each a scheme (`weights`: num_bits, type, symmetric, strategy,
group_size) and the `targets` it applies to, plus an `ignore` list. A target or an ignore entry
matches a module by its exact name, by a regex after "re:" (`re.match` on the name), or by the
name of its class or one of its bases ("Linear"). Per quantized linear `name` (W [N, K]):

    name.weight_packed      int32 [N, ceil(K/8)]  value k in bits 4(k%8).. of word k//8, stored
                                                   as the signed code q plus 8 (so in 0..15)
    name.weight_scale       [N, G]                 G = K / group_size ("group"), 1 ("channel")
    name.weight_zero_point  int32 [ceil(N/8), G]   asymmetric only: the signed zero point plus 8,
                                                   packed the same way along N (older versions
                                                   wrote it unpacked, int8 [N, G])
    name.weight_shape       int [2] = (N, K)
    name.weight_g_idx       int [K]                older versions' actorder "group": the group
                                                   of each column, as GPTQ's g_idx

    W[n, k] = (q - zp) · s = ((q + 8) - (zp + 8)) · s    (symmetric: zp = 0)

So weight_packed, read as bytes, is our layout as it is, and our zero is zp + 8.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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

WHERE = "quantization_config (compressed-tensors)"
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class WeightScheme:
    group_size: int  # -1: one group per row ("channel")
    symmetric: bool
    g_idx: bool  # actorder "group": each layer has a weight_g_idx


@dataclass(frozen=True)
class CompressedScheme:
    groups: tuple[tuple[tuple[str, ...], WeightScheme], ...]  # (targets, scheme), config order
    ignore: tuple[str, ...]
    marker: str = "weight_packed"

    @classmethod
    def parse(cls, config: dict[str, Any]) -> CompressedScheme:
        top_format = config.get("format")
        groups = []
        for group_name, group in (config.get("config_groups") or {}).items():
            fmt = group.get("format") or top_format
            if fmt != "pack-quantized":
                raise CheckpointError(f"{WHERE} stores {group_name} as {fmt!r}; attnopt reads "
                                      "'pack-quantized' (packed int4 weights) only")
            for kind in ("input_activations", "output_activations"):
                if group.get(kind):
                    raise CheckpointError(
                        f"{WHERE}: {group_name} also quantizes {kind}; attnopt runs int4 "
                        "weights with 16-bit activations (W4A16) only")
            groups.append((tuple(group.get("targets") or ()),
                           _weight_scheme(group.get("weights"), group_name)))
        if not groups:
            raise CheckpointError(f"{WHERE} has no config_groups: nothing says which layers "
                                  "are quantized, or how")
        if config.get("sparsity_config"):
            raise CheckpointError(f"{WHERE} has a sparsity_config; attnopt reads dense "
                                  "pack-quantized weights only")
        return cls(tuple(groups), tuple(config.get("ignore") or ()))

    def scheme_of(self, name: str, module: nn.Module) -> WeightScheme | None:
        """The scheme of the first config group that targets `module`, None if it is ignored
        or no group targets it (compressed-tensors' `is_match`)."""
        if any(_matches(name, module, t) for t in self.ignore):
            return None
        return next((scheme for targets, scheme in self.groups
                     if any(_matches(name, module, t) for t in targets)), None)

    def layer(self, tensors: Tensors, name: str, n: int, k: int, dtype: torch.dtype,
              scheme: WeightScheme) -> Int4Layer:
        g = k if scheme.group_size == -1 else scheme.group_size
        groups = -(-k // g)
        why = f"for a [{n}x{k}] linear in groups of {g},"
        shape = tensors.take(f"{name}.weight_shape")
        if shape.tolist() != [n, k]:
            raise CheckpointError(f"{name}.weight_shape is {shape.tolist()}, but the model's "
                                  f"layer is [{n}, {k}]: the checkpoint is not of this config")
        if k % 2:
            raise CheckpointError(f"{name} has an odd in_features {k}; the packed layout needs "
                                  "it even")
        packed = expect(tensors.take(f"{name}.weight_packed"), f"{name}.weight_packed",
                        (n, -(-k // 8)), (torch.int32,), why)
        scales = expect(tensors.take(f"{name}.weight_scale"), f"{name}.weight_scale",
                        (n, groups), FLOATS, why)
        if scheme.symmetric:
            zeros = torch.full((n, groups), 8, dtype=torch.uint8)
        else:
            key = f"{name}.weight_zero_point"
            stored = tensors.take(key, " (an asymmetric scheme stores a zero point per group)")
            if stored.dtype == torch.int32:
                words = expect(stored, key, (-(-n // 8), groups), (torch.int32,), why)
                zeros = nibbles(words.T)[:, :n].T  # packed along N: fields are rows
            else:
                zeros = (expect(stored, key, (n, groups), (torch.int8,), why).int() + 8)
        g_idx = None
        if scheme.g_idx or f"{name}.weight_g_idx" in tensors:
            g_idx = expect(tensors.take(f"{name}.weight_g_idx"), f"{name}.weight_g_idx", (k,),
                           (torch.int32, torch.int64), why)
        return finish(int32_bytes(packed)[:, : k // 2], scales, zeros, scheme.group_size, k,
                      dtype, g_idx, where=f"{name}: ")


def _weight_scheme(weights: dict[str, Any] | None, group_name: str) -> WeightScheme:
    where = f"{WHERE}, {group_name}"
    if not weights:
        raise CheckpointError(f"{where} quantizes no weights; attnopt reads int4 weights")
    found = (weights.get("num_bits"), weights.get("type"))
    if found != (4, "int"):
        raise CheckpointError(f"{where} has {found[0]}-bit {found[1]} weights; attnopt runs "
                              "4-bit int weights only")
    strategy = weights.get("strategy")
    if strategy == "channel":
        group_size = -1
    elif strategy == "group":
        group_size = weights.get("group_size")
        supported_group_size(group_size, where)
    else:
        raise CheckpointError(f"{where} has strategy {strategy!r}; attnopt reads 'group' and "
                              "'channel'")
    actorder = weights.get("actorder")
    if actorder not in (None, False, True, "weight", "static", "group", "dynamic"):
        raise CheckpointError(f"{where} has actorder {actorder!r}, which attnopt does not know")
    return WeightScheme(group_size, bool(weights.get("symmetric", True)),
                        actorder in (True, "group", "dynamic"))


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), name) is not None
    return target == name or any(cls.__name__ == target for cls in type(module).__mro__)
