"""Decoding: per-token latency against context length, for one model and three ways to run it.

- eager: transformers as it is, with its DynamicCache (cat([past, new]) every step);
- static+compile: transformers' StaticCache and `torch.compile` with Inductor (mode
  "reduce-overhead", CUDA graphs, on a GPU), what transformers recommends for fast decoding;
- attnopt: `torch.compile(backend="attnopt")` with `attnopt.cache.PagedKVCache`, whose decode
  graph reads the paged cache in place (`attnopt::paged_attention`).

Both caches are sized for the longest context (`--max-context` + the steps), as a server would
size them. For each context length L: prefill L random tokens, then time `--steps` decode steps
(teacher-forced, the same tokens for every method) and report the median ms per token, tokens/s,
each method's ratio to eager and attnopt's to static+compile, and each decode step's logits
against eager's (max |Δ|) — a method that is fast but wrong shows here. "graphs" is the number
of graphs Dynamo compiled for the whole run, all lengths (prefill graphs included): decoding must
add none as the context grows. "cache MiB" / "ideal MiB" compare what each cache holds after
the timed steps with exactly what its tokens take.

"bytes/token" is what one cached token takes in one layer.

    python -m benchmarks.decode                   # CPU: a small Llama, contexts up to 2k
    python -m benchmarks.decode --model 1b        # GPU: a 1B-class Llama, contexts up to 32k
    python -m benchmarks.decode --model mla       # DeepSeek-V3 attention (MLA), 4 layers
    python -m benchmarks.decode --quick           # two short contexts, a check that it runs

`--model mla` is DeepSeek-V3's attention at full width (16 of its 128 heads, kv_lora_rank 512,
rope 64, nope and value 128, q_lora_rank 384 here; MLPs dense and small). Every method caches
the latent (transformers' DeepSeek does too: 576 numbers per token and layer); they differ in
what a step does with it: eager and static+compile expand every cached token through kv_b_proj
into per-head K/V, attnopt absorbs kv_b_proj and reads the latent pools in place
(`attnopt::paged_latent_attention`). Its attention is transformers' "eager" implementation,
which the attention pass reads at one query on CPU (SDPA's CPU decomposition of a value head
dim other than the key's, at one query, is not matched yet).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch._dynamo.utils import counters

from attnopt.cache import PagedKVCache
from attnopt.compat import with_cache
from benchmarks.common import write_table

# name: (config class, its fields). "1b" is TinyLlama-1.1B's shape (GQA 32/4, head dim 64);
# "mla" DeepSeek-V3's attention with 16 heads (see the module doc).
MODELS = {
    "small": (transformers.LlamaConfig, dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, attn_implementation="sdpa")),
    "1b": (transformers.LlamaConfig, dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, attn_implementation="sdpa")),
    "mla": (transformers.DeepseekV3Config, dict(
        hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=384, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, first_k_dense_replace=4,
        attn_implementation="eager")),
}
CPU_CONTEXTS = (128, 512, 1024, 2048)
GPU_CONTEXTS = (1024, 4096, 8192, 16384, 32768)
METHODS = ("eager", "static+compile", "attnopt")


def build(name: str, max_positions: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    config_class, fields = MODELS[name]
    config = config_class(vocab_size=32000, max_position_embeddings=max_positions, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(device=device, dtype=dtype).eval()


def runner(method: str, model: torch.nn.Module, capacity: int, batch: int) -> tuple[
        Callable, Callable[[], transformers.Cache]]:
    """(forward, fresh cache) for one method."""
    config, dtype, device = model.config, model.dtype, model.device
    if method == "eager":
        return model.forward, lambda: transformers.DynamicCache(config=config)
    if method == "static+compile":
        mode = "reduce-overhead" if device.type == "cuda" else None
        return (torch.compile(model.forward, mode=mode),
                lambda: transformers.StaticCache(config=config, max_cache_len=capacity))
    return (torch.compile(model.forward, backend="attnopt"),
            lambda: PagedKVCache(config, max_tokens=batch * capacity, max_seq_len=capacity,
                                 batch_size=batch, dtype=dtype, device=device))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode(forward: Callable, cache: transformers.Cache, tokens: torch.Tensor, context: int,
           steps: int) -> tuple[list[float], list[torch.Tensor]]:
    """Prefill tokens[:, :context], then decode tokens[:, context:context + steps] one at a time:
    each step's milliseconds and logits."""
    device = tokens.device
    with torch.no_grad():
        forward(input_ids=tokens[:, :context], **with_cache(forward, cache),
                position_ids=torch.arange(context, device=device)[None])
        times, logits = [], []
        for i in range(context, context + steps):
            sync()
            start = time.perf_counter()
            out = forward(input_ids=tokens[:, i:i + 1], **with_cache(forward, cache),
                          position_ids=torch.tensor([[i]], device=device))
            sync()
            times.append((time.perf_counter() - start) * 1e3)
            logits.append(out.logits[:, -1].float().clone())
    return times, logits


def cache_bytes(cache: transformers.Cache) -> tuple[float, float, int]:
    """(held, ideal) MiB: what the cache holds and what exactly its tokens take; and the bytes
    one token takes in one layer."""
    if isinstance(cache, PagedKVCache):
        per_token = cache._bytes_per_token(cache.layers[0])
        return cache.bytes_allocated() / 2**20, cache.bytes_ideal() / 2**20, per_token
    held = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    length = int(cache.get_seq_length())
    per_token = sum(t[0, :, :1].nbytes for layer in cache.layers
                    for t in (layer.keys, layer.values)) // len(cache.layers)
    batch = cache.layers[0].keys.shape[0]
    return held / 2**20, batch * length * per_token * len(cache.layers) / 2**20, per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default=None)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    name = args.model or ("1b" if cuda else "small")
    contexts = (128, 256) if args.quick else GPU_CONTEXTS if cuda else CPU_CONTEXTS
    steps = 4 if args.quick else args.steps
    capacity = max(contexts) + steps
    model = build(name, capacity, dtype, device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (args.batch, capacity), generator=g)
    tokens = tokens.to(device)

    results: dict[str, dict[int, tuple[float, list[torch.Tensor]]]] = {}
    graphs: dict[str, int] = {}
    memory: dict[tuple[str, int], tuple[float, float, int]] = {}
    for method in METHODS:
        torch._dynamo.reset()
        counters.clear()
        forward, new_cache = runner(method, model, capacity, args.batch)
        results[method] = {}
        for context in contexts:
            cache = new_cache()
            decode(forward, cache, tokens, context, 2)  # compile, warm up
            cache = new_cache()
            times, logits = decode(forward, cache, tokens, context, steps)
            results[method][context] = (statistics.median(times), logits)
            memory[method, context] = cache_bytes(cache)
        graphs[method] = counters["stats"]["unique_graphs"]
        print(f"{method}: done ({graphs[method]} graphs)", flush=True)

    rows = []
    for context in contexts:
        eager_ms, eager_logits = results["eager"][context]
        static_ms = results["static+compile"][context][0]
        for method in METHODS:
            ms, logits = results[method][context]
            err = max((a - b).abs().max().item() for a, b in zip(logits, eager_logits,
                                                                   strict=True))
            rows.append({
                "context": context, "method": method, "ms/token": ms,
                "tokens/s": 1e3 * args.batch / ms, "vs eager": eager_ms / ms,
                "vs static+compile": static_ms / ms, "max |Δlogit|": f"{err:.1e}",
                "graphs": graphs[method] if context == contexts[-1] else "",
                "cache MiB": memory[method, context][0],
                "ideal MiB": memory[method, context][1],
                "bytes/token": memory[method, context][2],
            })
    columns = ["context", "method", "ms/token", "tokens/s", "vs eager", "vs static+compile",
               "max |Δlogit|", "graphs", "cache MiB", "ideal MiB", "bytes/token"]
    kind = "DeepSeek-V3 MLA" if name == "mla" else "Llama"
    title = f"decode, {kind} {name}, batch {args.batch}, {str(dtype).removeprefix('torch.')}"
    print(write_table(title, rows, columns, args.out))


if __name__ == "__main__":
    main()
