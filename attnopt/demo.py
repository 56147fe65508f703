"""`attnopt demo`: the main job on a built-in model, end to end."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from rich.table import Table

import attnopt
from attnopt.commands.terminal import console as make_console
from attnopt.models.llama import LlamaConfig, TinyLlama


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """The median time of `runs` calls of `fn`, after two untimed warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed_compile(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_demo(args: argparse.Namespace) -> int:
    console = make_console()
    if args.generate:
        from attnopt.demo_decode import run_decode_demo

        return run_decode_demo(args, console)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = TinyLlama(LlamaConfig(num_layers=args.layers)).to(dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    console.print(f"[bold]attnopt demo[/]: Llama-style decoder, {args.layers} layers, "
                  f"hidden {model.config.hidden_size}, GQA {model.config.num_heads}:"
                  f"{model.config.num_kv_heads}, {args.dtype}, input {args.batch}x{args.seq}, "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    options = {"inner": args.inner, "quantize": args.quantize}
    if args.report_dir:
        options["report_dir"] = args.report_dir
    with torch.no_grad():
        expected = model(ids)
        rows = [("eager", median_seconds(lambda: model(ids), args.runs), None)]
        if not args.no_baseline:
            baseline = torch.compile(model)
            _, base_compile = _timed_compile(lambda: baseline(ids))
            rows.append(("torch.compile (inductor)",
                         median_seconds(lambda: baseline(ids), args.runs), base_compile))
            torch._dynamo.reset()  # attnopt compiles from a clean cache, as a user's would
        attnopt.clear_reports()
        fast = torch.compile(model, backend="attnopt", options=options)
        got, attnopt_compile = _timed_compile(lambda: fast(ids))
        rows.append((f"attnopt (inner={args.inner})",
                     median_seconds(lambda: fast(ids), args.runs), attnopt_compile))

    reports = attnopt.reports()
    rewrites = Table(title="What attnopt rewrote")
    for col in ("graph", "pass", "rewrites", "nodes", "ms", "rejected / error"):
        rewrites.add_column(col)
    for r in reports:
        for p in r.passes:
            why = p.error.splitlines()[0] if p.error else (
                f"skipped: {p.skipped}" if p.skipped else "; ".join(p.rejected) or "-")
            rewrites.add_row(str(r.graph_id), p.name, str(p.rewrites),
                             f"{p.nodes_before} → {p.nodes_after}", f"{p.seconds * 1e3:.1f}", why)
    console.print(rewrites)
    totals = {k: sum(r.counts[k] for r in reports) for k in attnopt.CompileReport.COUNT_KEYS}
    console.print("counts: " + ", ".join(f"{k}={v}" for k, v in totals.items()))

    error = (got.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    drift = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    console.print(f"max abs error vs eager: {error:.3g} (logits up to {scale:.3g}, "
                  f"relative {error / scale:.2g}; relative L2 {drift:.2g})")

    timing = Table(title=f"Forward time, median of {args.runs} runs")
    for col in ("variant", "ms", "speed vs eager", "compile s"):
        timing.add_column(col, justify="right" if col != "variant" else "left")
    eager_time = rows[0][1]
    for name, seconds, compile_s in rows:
        timing.add_row(name, f"{seconds * 1e3:.2f}", f"{eager_time / seconds:.2f}x",
                       "-" if compile_s is None else f"{compile_s:.1f}")
    console.print(timing)
    if args.report_dir:
        console.print(f"HTML report: {args.report_dir}/graph{reports[0].graph_id}.html")
    if args.quantize:  # int4 weights move the logits by a few percent (RTN, groups of 128)
        failed = drift > 0.2
    else:
        failed = error > (1e-4 if dtype == torch.float32 else 5e-2) * max(scale, 1.0)
    if failed:
        console.print("[red]error above tolerance[/]")
        return 1
    return 0
