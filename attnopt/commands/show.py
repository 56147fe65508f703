"""Terminal output shared by the commands: what each pass did, per-layer quantization error, and
ONNX Runtime against PyTorch."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from attnopt.compiler.report import CompileReport
from attnopt.compiler.verify import Verification
from attnopt.quantization import QuantizationSummary


def passes(console: Console, report: CompileReport) -> None:
    table = Table(title="What attnopt rewrote")
    for column in ("pass", "rewrites", "nodes", "ms", "rejected / error"):
        table.add_column(column, justify="right" if column in ("rewrites", "ms") else "left")
    for p in report.passes:
        why = p.error.splitlines()[0] if p.error else (
            f"skipped: {p.skipped}" if p.skipped else "; ".join(p.rejected) or "-")
        table.add_row(p.name, str(p.rewrites), f"{p.nodes_before} → {p.nodes_after}",
                      f"{p.seconds * 1e3:.0f}", escape(why))
    console.print(table)
    console.print("counts: " + ", ".join(f"{k}={v}" for k, v in report.counts.items()))


def quantization(console: Console, summary: QuantizationSummary, rows: int = 8) -> None:
    """The layers with the largest weight error first; `rows` of them."""
    header, *layers = summary.table()
    layers.sort(key=lambda row: -float(row[2]))
    table = Table(title=f"int4 layers ({summary.method}, groups of {summary.group_size}), "
                        f"largest weight error first")
    for column in header:
        table.add_column(column, justify="left" if column == "layer" else "right",
                         overflow="fold")
    for row in layers[:rows]:
        table.add_row(*map(escape, row))
    if len(layers) > rows:
        table.add_row(f"... {len(layers) - rows} more", *[""] * (len(header) - 1))
    console.print(table)
    errors = [layer.weight_error for layer in summary.layers]
    kept = Counter(glob for _, glob in summary.skipped)
    console.print(Text(f"{len(errors)} linear layers in int4, mean weight error "
                       f"{sum(errors) / max(len(errors), 1):.4f}; kept in float: "
                       + (", ".join(f"{n} by {glob!r}" for glob, n in kept.items()) or "none")))


def verification(console: Console, result: Verification) -> None:
    table = Table(title=f"ONNX Runtime ({result.provider}) against PyTorch on "
                        f"{escape(result.inputs)}")
    for column in ("reference", "output", "max abs err", "max rel err", "cosine", "limit"):
        table.add_column(column, justify="left" if column in ("reference", "output") else "right",
                         overflow="fold")
    for d in result.differences:
        limit = "-" if d.tolerance is None else f"{d.tolerance:.0e}"
        style = None if d.ok else "red"
        table.add_row(d.reference, escape(d.output), f"{d.max_abs:.3g}", f"{d.max_rel:.3g}",
                      f"{d.cosine:.6f}", limit, style=style)
    console.print(table)
    if result.ok:
        console.print("[green]verified[/]: the ONNX model computes what attnopt's graph computes")
    else:
        console.print("[red]verification failed[/]: relative error above the limit")


def diff(console: Console, text: str) -> None:
    """A unified diff, coloured on a terminal, lines never cropped."""
    styles = {"-": "red", "+": "green", "@": "cyan"}
    for line in text.splitlines():
        console.print(Text(line, style=styles.get(line[:1], "")), soft_wrap=True)
