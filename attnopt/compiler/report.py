"""What each compile did: counts, one record per pass, diffs and a self-contained HTML page
(`report_html.py`)."""

from __future__ import annotations

import difflib
import itertools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from attnopt.compiler.graph import node_names
from attnopt.compiler.report_html import page
from attnopt.compiler.subgraph import Rewrite, Subgraph

COUNT_KEYS = ("attention", "softmax", "moe", "w4a16_linear", "linear_fusion", "kv_cache")


@dataclass
class PassRecord:
    name: str
    rewrites: int
    rejected: list[str]  # one human-readable reason per candidate that almost matched
    nodes_before: int
    nodes_after: int
    seconds: float
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # what the pass measured (layer errors, say)
    skipped: str | None = None  # why the pass did not run (an option, a training graph)
    counts_as: str | None = field(default=None, repr=False)
    before: list[str] = field(default_factory=list, repr=False)  # rendered graph
    after: list[str] = field(default_factory=list, repr=False)
    # The pictures: the region and its replacement per rewrite, and each rejected candidate
    # (refused[i] pictures rejected[i]). Passes that do not record these have none.
    rewritten: list[Rewrite] = field(default_factory=list, repr=False)
    refused: list[Subgraph] = field(default_factory=list, repr=False)

    def changed(self) -> tuple[set[str], set[str]]:
        """(names of nodes this pass removed, names of nodes it added)."""
        old, new = node_names(self.before), node_names(self.after)
        return old - new, new - old

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in
                ("name", "rewrites", "rejected", "nodes_before", "nodes_after", "seconds", "error",
                 "notes", "skipped")}


@dataclass
class CompileReport:
    COUNT_KEYS: ClassVar[tuple[str, ...]] = COUNT_KEYS

    graph_id: int
    passes: list[PassRecord]
    options: dict[str, Any]
    training: bool = False
    frozen_weights: int = 0  # parameters frozen into constants
    inner: str = "inductor"
    notes: list[str] = field(default_factory=list)
    verify_max_abs_error: float | None = None

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(COUNT_KEYS, 0)
        for p in self.passes:
            if p.counts_as:
                counts[p.counts_as] += p.rewrites
        return counts

    @property
    def rejected(self) -> list[str]:
        return [r for p in self.passes for r in p.rejected]

    def pass_record(self, pass_name: str) -> PassRecord:
        for p in self.passes:
            if p.name == pass_name:
                return p
        raise KeyError(f"no pass {pass_name!r} in this report; passes: "
                       f"{[p.name for p in self.passes]}")

    def diff(self, pass_name: str | None = None) -> str:
        """Unified diff of the graph before/after one pass, or across the whole pipeline."""
        if not self.passes:
            return ""
        if pass_name is None:
            before, after, label = self.passes[0].before, self.passes[-1].after, "pipeline"
        else:
            rec = self.pass_record(pass_name)
            before, after, label = rec.before, rec.after, rec.name
        return "\n".join(difflib.unified_diff(
            before, after, f"graph{self.graph_id} before {label}",
            f"graph{self.graph_id} after {label}", lineterm=""))

    def summary(self) -> str:
        lines = [f"attnopt graph {self.graph_id} ({'training' if self.training else 'inference'}"
                 f", {self.frozen_weights} frozen weights, inner={self.inner})",
                 "  counts: " + ", ".join(f"{k}={v}" for k, v in self.counts.items())]
        for p in self.passes:
            status = f"FAILED ({p.error.splitlines()[0]})" if p.error else f"{p.rewrites} rewrites"
            if p.skipped:
                lines.append(f"  {p.name}: skipped ({p.skipped})")
                continue
            lines.append(f"  {p.name}: {status}, nodes {p.nodes_before} -> {p.nodes_after}, "
                         f"{p.seconds * 1e3:.1f} ms")
            lines += [f"    rejected {r}" for r in p.rejected]
            lines += [f"    {n}" for n in p.notes]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary

    def as_dict(self) -> dict[str, Any]:
        return {
            "graph_id": self.graph_id, "counts": self.counts, "training": self.training,
            "frozen_weights": self.frozen_weights, "inner": self.inner, "notes": self.notes,
            "verify_max_abs_error": self.verify_max_abs_error,
            "options": {k: list(v) if isinstance(v, tuple) else v
                        for k, v in self.options.items()},
            "passes": [p.as_dict() for p in self.passes],
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2, default=str))

    def write_html(self, path: str | Path) -> None:
        Path(path).write_text(page(self))

    def write(self, directory: str | Path) -> Path:
        """Write graph<N>.html and graph<N>.json into `directory`; returns the HTML path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.write_json(d / f"graph{self.graph_id}.json")
        self.write_html(d / f"graph{self.graph_id}.html")
        return d / f"graph{self.graph_id}.html"


# --- the registry behind attnopt.reports() ------------------------------------------------------

_lock = threading.Lock()
_reports: list[CompileReport] = []
_ids = itertools.count()


def next_graph_id() -> int:
    return next(_ids)


def add_report(report: CompileReport) -> None:
    with _lock:
        _reports.append(report)


def reports() -> list[CompileReport]:
    """One CompileReport per graph compiled by the attnopt backend, oldest first."""
    with _lock:
        return list(_reports)


def clear_reports() -> None:
    with _lock:
        _reports.clear()
