"""Writers of pre-quantized checkpoints for the tests: a tiny Llama saved by transformers, its
linears replaced by packed tensors laid out as the tools lay them out.

GPTQ and AWQ follow the tools' packing code (cited in attnopt/quantization/formats/gptq.py and
awq.py): they are written here from random codes, zero points (0 and 15 included, where the
GPTQ v1 "minus one" convention borrows across fields) and scales, so the exact dequantized
weight (q − z) · s is known. compressed-tensors checkpoints are written by the real library
(`compressed_tensors`), and its own dequantization is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attnopt.quantization.formats.awq import ORDER

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_llama(seed: int = 0, layers: int = 2):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def linear_names(model) -> list[str]:
    return [f"model.layers.{i}.{s}" for i in range(len(model.model.layers)) for s in LINEARS]


def random_codes(n: int, k: int, group_size: int, *, sym: bool, desc_act: bool = False,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """codes [N, K] in 0..15, zeros and fp16 scales [N, G], g_idx [K] (a random permutation's
    groups under desc_act), and the weight they stand for."""
    gen = torch.Generator().manual_seed(seed)
    g = k if group_size == -1 else group_size
    groups = -(-k // g)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.full((n, groups), 8) if sym else torch.randint(0, 16, (n, groups),
                                                                  generator=gen)
    if not sym:
        zeros[0, 0], zeros[1, 0], zeros[0, -1] = 0, 15, 0  # the v1 borrow and its neighbour
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).half()
    g_idx = torch.arange(k) // g
    if desc_act:
        g_idx = g_idx[torch.argsort(torch.randperm(k, generator=gen))]
    weight = (codes - zeros[:, g_idx]) * scales.float()[:, g_idx]
    return {"codes": codes, "zeros": zeros, "scales": scales, "g_idx": g_idx, "weight": weight}


def _words(fields: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 → [...] int32 words, field i in bits 4i (as the tools pack)."""
    word = (fields.long() << (4 * torch.arange(8))).sum(-1)
    return _int32(word)


def _int32(word: torch.Tensor) -> torch.Tensor:
    word = word & 0xFFFFFFFF
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def gptq_tensors(q: dict[str, torch.Tensor], *, v1: bool = True) -> dict[str, torch.Tensor]:
    """qweight [K/8, N] packed along K, qzeros [G, N/8] along N (v1: each word minus
    0x11111111, as GPTQModel's convert_gptq_v2_to_v1_format), scales [G, N], g_idx."""
    codes, zeros = q["codes"], q["zeros"]
    n, k = codes.shape
    qweight = _words(codes.T.reshape(k // 8, 8, n).transpose(1, 2))
    words = (zeros.T.long().reshape(-1, n // 8, 8) << (4 * torch.arange(8))).sum(-1)
    qzeros = _int32(words - 0x11111111 if v1 else words)
    return {"qweight": qweight, "qzeros": qzeros, "scales": q["scales"].T.contiguous(),
            "g_idx": q["g_idx"].to(torch.int32)}


def awq_tensors(q: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoAWQ gemm: qweight [K, N/8] and qzeros [G, N/8], field i holding column 8c + ORDER[i]."""
    def pack(values: torch.Tensor) -> torch.Tensor:  # [R, N] → [R, N/8]
        return _words(values.reshape(values.shape[0], -1, 8)[..., list(ORDER)])

    return {"qweight": pack(q["codes"].T), "qzeros": pack(q["zeros"].T),
            "scales": q["scales"].T.contiguous()}


def write(model, directory: Path, layers: dict[str, dict[str, torch.Tensor]],
          quantization_config: dict) -> Path:
    """Save `model` with transformers, then replace each `layers` linear's weight by its packed
    tensors and add `quantization_config` to config.json."""
    model.save_pretrained(directory)
    path = directory / "model.safetensors"
    state = load_file(path)
    for name, tensors in layers.items():
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": t.contiguous() for key, t in tensors.items()})
    save_file(state, path, metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def gptq_checkpoint(directory: Path, *, group_size: int, sym: bool, desc_act: bool,
                    v1: bool = True, layers: int = 2):
    """(directory, float model with the checkpoint's weights, quantized linear names)."""
    model = tiny_llama(layers=layers)
    made, packed = {}, {}
    for i, name in enumerate(linear_names(model)):
        n, k = model.get_submodule(name).weight.shape
        made[name] = random_codes(n, k, group_size, sym=sym, desc_act=desc_act, seed=i)
        packed[name] = gptq_tensors(made[name], v1=v1)
    write(model, directory, packed, {
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": sym,
        "desc_act": desc_act, "checkpoint_format": "gptq" if v1 else "gptq_v2",
        "pack_dtype": "int32"})
    return directory, _reference(model, made), list(made)


def awq_checkpoint(directory: Path, *, group_size: int, layers: int = 2):
    model = tiny_llama(layers=layers)
    made, packed = {}, {}
    for i, name in enumerate(linear_names(model)):
        n, k = model.get_submodule(name).weight.shape
        made[name] = random_codes(n, k, group_size, sym=False, seed=i)
        packed[name] = awq_tensors(made[name])
    write(model, directory, packed, {
        "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": None})
    return directory, _reference(model, made), list(made)


def compressed_checkpoint(directory: Path, *, group_size: int, sym: bool, layers: int = 2):
    """Written by compressed-tensors itself: its scheme applied to the tiny Llama, scales and
    zero points from each group's range (its `calculate_qparams`), compressed to
    pack-quantized and saved with its `update_config`. The reference weights are its own
    `fake_quantize` of the float weights."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_llama(layers=layers)
    reference = tiny_llama(layers=layers)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym,
                            **({"strategy": "channel"} if group_size == -1 else
                               {"strategy": "group", "group_size": group_size}))
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"]))
    names = linear_names(model)
    with torch.no_grad():
        for name in names:
            m = model.get_submodule(name)
            g = m.weight.shape[1] if group_size == -1 else group_size
            groups = m.weight.view(m.weight.shape[0], -1, g)
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            m.weight_scale.copy_(scale.view_as(m.weight_scale))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.copy_(zero.view_as(m.weight_zero_point))
            reference.get_submodule(name).weight.copy_(fake_quantize(
                m.weight, m.weight_scale, getattr(m, "weight_zero_point", None), args))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    return directory, reference, names


def _reference(model, made: dict[str, dict[str, torch.Tensor]]):
    """`model` with each quantized linear's weight replaced by the checkpoint's exact one."""
    with torch.no_grad():
        for name, q in made.items():
            model.get_submodule(name).weight.copy_(q["weight"])
    return model
