"""`attnopt demo --generate N`: greedy decoding on a built-in transformers Llama, eager with its
DynamicCache against attnopt with `PagedKVCache`: the tokens (which must be equal), the time
per token (the median of `--runs` generations after two warm-up ones, as the forward demo
times), how many graphs were compiled and what the cache holds."""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from torch._dynamo.utils import counters

import attnopt
from attnopt.cache import PagedKVCache
from attnopt.compat import with_cache
from attnopt.demo import median_seconds
from attnopt.models.llama import LlamaConfig

BLOCK_SIZE = 16


def _build(args: argparse.Namespace, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    ours = LlamaConfig(num_layers=args.layers)  # the forward demo's sizes
    config = transformers.LlamaConfig(
        vocab_size=ours.vocab_size, hidden_size=ours.hidden_size,
        intermediate_size=ours.intermediate_size, num_hidden_layers=ours.num_layers,
        num_attention_heads=ours.num_heads, num_key_value_heads=ours.num_kv_heads,
        max_position_embeddings=args.seq + args.generate, pad_token_id=0,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _generate(model: torch.nn.Module, inputs: dict, new_tokens: int,
              cache: PagedKVCache | None = None) -> torch.Tensor:
    """The generated ids (greedy), into `cache` emptied first, or a new DynamicCache."""
    if cache is not None:
        cache.reset()
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, disable_compile=True, **with_cache(model, cache))


def run_decode_demo(args: argparse.Namespace, console: Console) -> int:
    dtype = getattr(torch, args.dtype)
    model = _build(args, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    if args.batch > 1:  # left padding on the last sequence, as a batch of prompts has
        ids[-1, :args.seq // 4], mask[-1, :args.seq // 4] = 0, 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    n = args.generate
    console.print(f"[bold]attnopt demo --generate {n}[/]: transformers Llama, {args.layers} "
                  f"layers, hidden {model.config.hidden_size}, GQA "
                  f"{model.config.num_attention_heads}:{model.config.num_key_value_heads}, "
                  f"{args.dtype}, {args.batch} prompt(s) of {args.seq} tokens, "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def paged_cache() -> PagedKVCache:
        return PagedKVCache(model.config, max_tokens=args.batch * (args.seq + n + BLOCK_SIZE),
                            max_seq_len=args.seq + n, block_size=BLOCK_SIZE,
                            batch_size=args.batch, dtype=dtype)

    with torch.no_grad():
        expected = _generate(model, inputs, n)
        eager_s = median_seconds(lambda: _generate(model, inputs, n), args.runs)
        torch._dynamo.reset()
        attnopt.clear_reports()
        counters.clear()
        eager_forward = model.forward
        model.forward = torch.compile(eager_forward, backend="attnopt",
                                      options={"inner": args.inner})
        try:
            start = time.perf_counter()
            _generate(model, inputs, n, paged_cache())  # compiles
            first_s = time.perf_counter() - start
            cache = paged_cache()  # a second cache: nothing recompiles for it
            attnopt_s = median_seconds(lambda: _generate(model, inputs, n, cache), args.runs)
            got = _generate(model, inputs, n, cache)
        finally:
            model.forward = eager_forward
    graphs = counters["stats"]["unique_graphs"]
    generations = args.runs + 4  # the first, two warm-ups, the timed runs, the checked one

    reports = attnopt.reports()
    totals = {k: sum(r.counts[k] for r in reports) for k in attnopt.CompileReport.COUNT_KEYS}
    console.print("counts: " + ", ".join(f"{k}={v}" for k, v in totals.items()))
    same = torch.equal(got, expected)
    console.print(f"greedy tokens equal to eager's: {'yes' if same else '[red]NO[/]'}; "
                  f"graphs compiled: {graphs} (prefill and decode, for all {generations} "
                  "generations)")
    console.print(f"paged cache: {cache.bytes_allocated() / 2**10:.0f} KiB in blocks of "
                  f"{BLOCK_SIZE} tokens for {cache.bytes_ideal() / 2**10:.0f} KiB of tokens "
                  f"({cache.seq_lens_host()[0]} per sequence)")

    timing = Table(title=f"{n} new tokens, prefill included, median of {args.runs} runs")
    for col in ("variant", "ms / token", "speed vs eager", "first call s"):
        timing.add_column(col, justify="right" if col != "variant" else "left")
    timing.add_row("eager (DynamicCache)", f"{eager_s / n * 1e3:.2f}", "1.00x", "-")
    timing.add_row(f"attnopt (PagedKVCache, inner={args.inner})", f"{attnopt_s / n * 1e3:.2f}",
                   f"{eager_s / attnopt_s:.2f}x", f"{first_s:.1f}")
    console.print(timing)
    if not same:
        console.print("[red]generated tokens differ from eager[/]")
        return 1
    return 0
