"""The calls the audit makes: every op wrapper, at the shapes of real models, with every dtype
and flag combination the wrapper can launch (the "full" tier), or a representative subset of
them that still reaches every kernel and every config list (the "standard" tier, for CI).

Inputs are meta tensors laid out as the models lay them out (attention reads q, k, v as the
[B, S, H, D] → [B, H, S, D] transposed views of a Hugging Face attention layer, a paged cache
is [blocks, 16, Hkv, D], int4 weights are [N, Kp/2] codes with [N, Kp/g] scales and zeros), so
the recorded specializations (alignment, unit strides) are the real ones. A path that the
wrapper chooses by device (w4a16's "dequant" on CUDA) is chosen as on CUDA.

`RETUNE` pairs two calls that differ only in an exact length inside one bucket (a second
prompt length, another batch size): a serving-ready autotuner gives both the same key.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from attnopt.backends.reference import ScoreMods
from attnopt.backends.triton import (
    attention,
    latent_attention,
    moe,
    paged_attention,
    softmax,
    w4a16,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@dataclass(frozen=True)
class Scenario:
    name: str
    call: Callable[[], object]


def meta(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def heads_view(b: int, s: int, h: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, S, D] as the transposed view of a projection's [B, S, H, D] output."""
    return meta(b, s, h, d, dtype=dtype).transpose(1, 2)


def _name(*parts: object) -> str:
    return " ".join(str(p).removeprefix("torch.") for p in parts if p != "")


@contextlib.contextmanager
def _fp32_precision(tf32: bool) -> Iterator[None]:
    """PyTorch's fp32 matmul precision set to TF32 (or full fp32) inside."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


# --- attention ---------------------------------------------------------------------------------

# Query heads, KV heads, head dim.
ATTENTION_MODELS = {
    "llama3-8b": (32, 8, 128),
    "qwen2-7b": (28, 4, 128),
    "gpt2": (12, 12, 64),
    "gemma2-9b": (16, 8, 256),
}
MASKS = ("causal", "bool", "additive", "none")


def _variant(name: str, b: int, hq: int, lq: int, lk: int, dtype) -> ScoreMods:
    """The variants (`reference.ScoreMods`) as the models that use them set them."""
    window = ScoreMods(window_left=4095)  # Gemma 2, GPT-OSS, Mistral: a 4k sliding window
    mods = {
        "": ScoreMods(),
        "softcap": ScoreMods(softcap=50.0),  # Gemma 2
        "window": window,
        "sinks": ScoreMods(sinks=meta(hq, dtype=dtype)),  # GPT-OSS
        "alibi": ScoreMods(alibi_slopes=meta(hq, dtype=FP32)),  # Falcon, BLOOM
        # T5's position bias per head, and a padding bias over the keys.
        "biases": ScoreMods(biases=(meta(1, hq, lq, lk, dtype=dtype), meta(b, 1, 1, lk,
                                                                           dtype=dtype))),
        "gemma2": ScoreMods(softcap=50.0, window_left=4095),
        "gpt-oss": ScoreMods(sinks=meta(hq, dtype=dtype), window_left=127),
        "everything": ScoreMods(softcap=30.0, biases=(meta(1, hq, lq, lk, dtype=dtype),),
                                alibi_slopes=meta(hq, dtype=FP32), window_left=4095,
                                sinks=meta(hq, dtype=dtype)),
    }
    return mods[name]


VARIANTS = ("", "softcap", "window", "sinks", "alibi", "biases", "gemma2", "gpt-oss",
            "everything")


def _mask(kind: str, b: int, lq: int, lk: int, dtype: torch.dtype):
    if kind == "bool":
        return meta(b, 1, lq, lk, dtype=torch.bool)
    if kind == "additive":
        return meta(b, 1, lq, lk, dtype=dtype)
    return None


def _attention(model: str, dtype, mask: str, lq: int, lk: int, b: int = 1,
               variant: str = "", layout: str = "blhd", tf32: bool = False) -> Scenario:
    """`tf32`: fp32 as when PyTorch's matmul precision allows TF32."""
    hq, hkv, d = ATTENTION_MODELS[model]

    def call():
        q = heads_view(b, lq, hq, d, dtype)
        k, v = heads_view(b, lk, hkv, d, dtype), heads_view(b, lk, hkv, d, dtype)
        with _fp32_precision(tf32):
            attention.attention(q, k, v, _mask(mask, b, lq, lk, dtype), mask == "causal",
                                d ** -0.5, _variant(variant, b, hq, lq, lk, dtype),
                                layout=layout)

    return Scenario(_name("attention", model, dtype, "tf32" if tf32 else "", mask, variant,
                          f"Lq={lq} Lk={lk}"), call)


def attention_scenarios(full: bool) -> Iterator[Scenario]:
    if full:
        for model, dtype, mask in itertools.product(ATTENTION_MODELS, (BF16, FP16, FP32), MASKS):
            yield _attention(model, dtype, mask, 2048, 2048)
            yield _attention(model, dtype, mask, 1, 4096)
            if dtype == FP32:
                yield _attention(model, dtype, mask, 2048, 2048, tf32=True)
                yield _attention(model, dtype, mask, 1, 4096, tf32=True)
        for model, dtype, variant in itertools.product(ATTENTION_MODELS, (BF16, FP16, FP32),
                                                       VARIANTS[1:]):
            yield _attention(model, dtype, "causal", 2048, 2048, variant=variant)
            yield _attention(model, dtype, "bool", 1, 4096, variant=variant)
            yield _attention(model, dtype, "additive", 2048, 2048, variant=variant)
        for lq in (4, 1000):  # speculative decode; a ragged prompt
            yield _attention("llama3-8b", BF16, "causal", lq, lq if lq > 16 else 4096)
        yield _attention("llama3-8b", BF16, "causal", 2048, 2048, layout="bhld")
        return
    for mask in ("causal", "additive"):  # base-2 and natural-unit scores
        yield _attention("llama3-8b", BF16, mask, 2048, 2048)
    yield _attention("gemma2-9b", BF16, "causal", 2048, 2048, variant="gemma2")  # head dim 256
    yield _attention("gpt2", FP16, "bool", 1024, 1024, variant="everything")  # head dim 64
    yield _attention("llama3-8b", BF16, "bool", 1, 4096)
    yield _attention("gemma2-9b", BF16, "causal", 1, 4096, variant="gemma2")
    for lq, lk in ((2048, 2048), (1, 4096)):  # fp32 on TF32 tensor cores
        yield _attention("llama3-8b", FP32, "additive", lq, lk, tf32=True)


def _paged(model: str, dtype, int8: bool, mask: str, lq: int, tokens: int = 4096,
           b: int = 8, variant: str = "") -> Scenario:
    hq, hkv, d = ATTENTION_MODELS[model]
    block_size, width = 16, tokens // 16

    def call():
        pool_dtype = torch.int8 if int8 else dtype
        k_pool = meta(b * width, block_size, hkv, d, dtype=pool_dtype)
        v_pool = meta(b * width, block_size, hkv, d, dtype=pool_dtype)
        scales = [meta(b * width, block_size, hkv, dtype=FP32) for _ in range(2)] if int8 \
            else [None, None]
        capacity = width * block_size
        paged_attention.paged_attention(
            heads_view(b, lq, hq, d, dtype), k_pool, v_pool, meta(b, width, dtype=torch.int32),
            meta(b, dtype=torch.int32), d ** -0.5, mask == "causal", *scales,
            _mask(mask, b, lq, capacity, dtype), _variant(variant, b, hq, lq, capacity, dtype),
            layout="blhd")

    return Scenario(_name("paged", model, dtype, "int8" if int8 else "", mask, variant,
                          f"Lq={lq}"), call)


def paged_scenarios(full: bool) -> Iterator[Scenario]:
    if full:
        for model, dtype, int8, mask in itertools.product(
                ATTENTION_MODELS, (BF16, FP16, FP32), (False, True), MASKS):
            yield _paged(model, dtype, int8, mask, 1)
        for model, dtype, variant in itertools.product(ATTENTION_MODELS, (BF16, FP16, FP32),
                                                       VARIANTS[1:]):
            yield _paged(model, dtype, False, "causal", 1, variant=variant)
            yield _paged(model, dtype, True, "additive", 1, variant=variant)
        yield _paged("llama3-8b", BF16, False, "causal", 4)
        return
    yield _paged("llama3-8b", BF16, False, "causal", 1)
    yield _paged("llama3-8b", BF16, True, "additive", 1)
    yield _paged("gemma2-9b", FP16, False, "bool", 1, variant="gemma2")
    yield _paged("gpt2", BF16, False, "causal", 1, variant="everything")


# DeepSeek-V3's MLA: query heads, kv_lora_rank (the latent), rope dim.
LATENT_MODELS = {"deepseek-v3": (128, 512, 64), "deepseek-v2-lite": (16, 512, 64)}


def _latent(model: str, dtype, int8: bool, mask: str, lq: int, tokens: int = 4096,
            b: int = 8, paged: bool = True) -> Scenario:
    """MLA over its latent cache: decode over the paged latent pools, or the contiguous latent
    of a prompt (prefill)."""
    h, rank, rope = LATENT_MODELS[model]
    block_size, width = 16, tokens // 16

    def call():
        q_lat, q_rot = heads_view(b, lq, h, rank, dtype), heads_view(b, lq, h, rope, dtype)
        pool_dtype = torch.int8 if int8 else dtype
        if not paged:
            c_kv, k_rot = meta(b, 1, tokens, rank, dtype=dtype), meta(b, 1, tokens, rope,
                                                                      dtype=dtype)
            latent_attention.latent_attention(q_lat, q_rot, c_kv, k_rot,
                                              _mask(mask, b, lq, tokens, dtype),
                                              mask == "causal", 0.1)
            return
        scales = [meta(b * width, block_size, 1, dtype=FP32) for _ in range(2)] if int8 \
            else [None, None]
        latent_attention.paged_latent_attention(
            q_lat, q_rot, meta(b * width, block_size, 1, rank, dtype=pool_dtype),
            meta(b * width, block_size, 1, rope, dtype=pool_dtype),
            meta(b, width, dtype=torch.int32), meta(b, dtype=torch.int32), 0.1,
            mask == "causal", *scales, _mask(mask, b, lq, width * block_size, dtype))

    return Scenario(_name("latent" if paged else "latent contiguous", model, dtype,
                          "int8" if int8 else "", mask, f"Lq={lq}"), call)


def latent_scenarios(full: bool) -> Iterator[Scenario]:
    if full:
        for model, dtype, int8, mask in itertools.product(
                LATENT_MODELS, (BF16, FP16, FP32), (False, True), MASKS):
            yield _latent(model, dtype, int8, mask, 1)
        for model, dtype, mask in itertools.product(LATENT_MODELS, (BF16, FP16, FP32), MASKS):
            yield _latent(model, dtype, False, mask, 1024, 1024, b=1, paged=False)
        return
    yield _latent("deepseek-v3", BF16, False, "causal", 1)
    yield _latent("deepseek-v3", BF16, True, "additive", 1)
    yield _latent("deepseek-v2-lite", BF16, False, "causal", 1024, 1024, b=1, paged=False)


# --- MoE --------------------------------------------------------------------------------------

# Experts, hidden, intermediate, top-k.
MOE_MODELS = {
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "qwen1.5-moe": (60, 2048, 1408, 4),
    "olmoe": (64, 2048, 1024, 8),
}


def _moe(model: str, dtype, tokens: int, act: str = "silu", group: int | None = None,
         tf32: bool = False) -> Scenario:
    """The routed experts of one layer of `model` at `tokens` tokens (fp32 with `tf32`: as when
    PyTorch's matmul precision allows TF32)."""
    e, h, i, k = MOE_MODELS[model]

    def call():
        x = meta(tokens, h, dtype=dtype)
        ids, weights = meta(tokens, k, dtype=torch.int64), meta(tokens, k, dtype=FP32)
        with _fp32_precision(tf32):
            if group is None:
                moe.fused_moe(x, ids, weights, meta(e, 2 * i, h, dtype=dtype),
                              meta(e, h, i, dtype=dtype), act)
                return
            gate_up = _int4(e, 2 * i, h, group, dtype)
            down = _int4(e, h, i, group, dtype)
            moe.fused_moe_w4a16(x, ids, weights, *gate_up, *down, group, act)

    return Scenario(_name("moe", model, dtype, "tf32" if tf32 else "", act,
                          f"int4 g{group}" if group else "", f"T={tokens}"), call)


def _int4(e: int, n: int, k: int, group: int, dtype) -> tuple[torch.Tensor, ...]:
    kp = -(-k // group) * group
    return (meta(e, n, kp // 2, dtype=torch.uint8), meta(e, n, kp // group, dtype=dtype),
            meta(e, n, kp // group, dtype=dtype))


def moe_scenarios(full: bool) -> Iterator[Scenario]:
    if full:
        for model, dtype, tokens in itertools.product(MOE_MODELS, (BF16, FP16, FP32),
                                                      (1, 16, 256, 2048)):
            yield _moe(model, dtype, tokens)
            if dtype == FP32:
                yield _moe(model, dtype, tokens, tf32=True)
            for group in (32, 64, 128):
                yield _moe(model, dtype, tokens, group=group)
        for act in ("gelu", "gelu_tanh"):
            yield _moe("olmoe", BF16, 256, act)
        return
    # Decode and prefill, int4 experts and float: BLOCK_M 16, 64 and 128 (`moe.choose_block_m`).
    for tokens in (1, 2048, 4096):
        yield _moe("mixtral-8x7b", BF16, tokens, group=128)
    yield _moe("mixtral-8x7b", BF16, 4096)
    yield _moe("mixtral-8x7b", FP32, 4096, tf32=True)  # the pruner's fallback on sm_80
    yield _moe("olmoe", BF16, 2048)
    yield _moe("olmoe", FP16, 64, "gelu")  # float, many small experts


# --- W4A16 ------------------------------------------------------------------------------------

# Llama-3-8B's linear layers, N x K.
W4A16_LAYERS = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096),
                "down": (4096, 14336)}


def _w4a16(layer: str, dtype, m: int, group: int = 128, bias: bool = False,
           tf32: bool = False) -> Scenario:
    """W4A16 at one layer of Llama-3-8B, down the path the wrapper takes on CUDA (fp32 with
    `tf32`: as when PyTorch's matmul precision allows TF32)."""
    n, k = W4A16_LAYERS[layer]

    def call():
        kp = -(-k // group) * group
        with _fp32_precision(tf32):
            w4a16.w4a16_matmul(
                meta(m, k, dtype=dtype), meta(n, kp // 2, dtype=torch.uint8),
                meta(n, kp // group, dtype=dtype), meta(n, kp // group, dtype=dtype), group,
                meta(n, dtype=dtype) if bias else None,
                path=w4a16.choose_path(m, torch.device("cuda"), dtype))

    return Scenario(_name("w4a16", layer, dtype, "tf32" if tf32 else "", f"g{group}",
                          "bias" if bias else "", f"M={m}"), call)


def w4a16_scenarios(full: bool) -> Iterator[Scenario]:
    if full:
        for layer, dtype, m, group, bias in itertools.product(
                W4A16_LAYERS, (BF16, FP16, FP32), (1, 4, 16, 17, 64, 256, 1000, 4096),
                (32, 64, 128), (False, True)):
            yield _w4a16(layer, dtype, m, group, bias)
            if dtype == FP32:
                yield _w4a16(layer, dtype, m, group, bias, tf32=True)
        return
    for layer, m in itertools.product(("q/o", "down"), (1, 64, 512, 4096)):
        yield _w4a16(layer, BF16, m)
    yield _w4a16("k/v", FP16, 1, 64, bias=True)
    yield _w4a16("q/o", FP16, 256, 32)
    for m in (1, 512):
        yield _w4a16("q/o", FP32, m)
        yield _w4a16("q/o", FP32, m, tf32=True)


# --- softmax ----------------------------------------------------------------------------------


def _softmax(rows: tuple[int, ...], n: int, dtype, flag: str = "", out_dtype=None) -> Scenario:
    def call():
        x = meta(*rows, n, dtype=dtype)
        mask = meta(*rows[:-2], 1, rows[-1], n, dtype=torch.bool) if flag == "mask" else None
        bias = meta(*rows[:-2], 1, rows[-1], n, dtype=dtype) if flag == "bias" else None
        softmax.softmax(x, -1, n ** -0.5, bias, mask, float("-inf"), False, flag == "safe",
                        out_dtype or dtype)

    shape = "x".join(map(str, (*rows, n)))
    return Scenario(_name("softmax", dtype, shape, flag, f"-> {out_dtype}" if out_dtype else ""),
                    call)


def softmax_scenarios(full: bool) -> Iterator[Scenario]:
    def scores(s: int) -> tuple[int, ...]:  # the rows of attention probabilities [1, 32, S, S]
        return (1, 32, s)

    if full:
        for dtype, s, flag in itertools.product((BF16, FP16, FP32),
                                                (128, 256, 512, 1024, 2048, 4096, 8192),
                                                ("", "mask", "bias", "safe")):
            yield _softmax(scores(s), s, dtype, flag)
        for dtype, vocab in itertools.product((BF16, FP32), (32000, 128256, 151936)):
            yield _softmax((8,), vocab, dtype)  # logits of 8 sequences
        yield _softmax(scores(2048), 2048, BF16, out_dtype=FP32)
        return
    for flag in ("", "mask", "bias"):
        yield _softmax(scores(2048), 2048, BF16, flag)
    yield _softmax(scores(8192), 8192, FP16, "safe")
    yield _softmax((8,), 128256, FP32)
    yield _softmax((8,), 32000, BF16)


# --- the second length of a bucket --------------------------------------------------------------

RETUNE = [
    ("attention prefill", _attention("llama3-8b", BF16, "causal", 1000, 1000),
     _attention("llama3-8b", BF16, "causal", 1017, 1017)),
    ("w4a16 splitk", _w4a16("q/o", BF16, 40), _w4a16("q/o", BF16, 48)),
    ("w4a16 tiled", _w4a16("q/o", BF16, 600), _w4a16("q/o", BF16, 700)),
    ("moe", _moe("olmoe", BF16, 600), _moe("olmoe", BF16, 700)),
]

FAMILIES = {
    "attention": attention_scenarios,
    "paged": paged_scenarios,
    "latent": latent_scenarios,
    "moe": moe_scenarios,
    "w4a16": w4a16_scenarios,
    "softmax": softmax_scenarios,
}


def scenarios(full: bool, families: list[str] | None = None) -> list[Scenario]:
    return [s for f in (families or FAMILIES) for s in FAMILIES[f](full)]
