"""What each compile did: counts, one record per pass, diffs and a self-contained HTML page."""

from __future__ import annotations

import difflib
import html
import itertools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from attnopt.compiler.graph import node_names

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
        Path(path).write_text(_html(self))

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


# --- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
table.counts td,table.counts th{padding:2px 10px;text-align:left}
.cols{display:flex;gap:1em} .col{flex:1;min-width:0}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:12px;margin:0}
.del{background:#fdd} .add{background:#dfd} .err{color:#a00;white-space:pre-wrap}
.rej{color:#8a5a00} .muted{color:#777} summary{cursor:pointer;margin:1em 0 .3em}
"""


def _graph_block(lines: list[str], highlight: set[str], cls: str) -> str:
    out = []
    for line in lines:
        name = line.split(" = ", 1)[0]
        text = html.escape(line)
        out.append(f'<span class="{cls}">{text}</span>' if name in highlight else text)
    return "<pre>" + "\n".join(out) + "</pre>"


def _diff_block(diff: str) -> str:
    lines = diff.splitlines()[2:]  # the ---/+++ header says nothing the page does not
    cls = {"-": "del", "+": "add", "@": "muted"}
    return "<pre>" + "\n".join(
        f'<span class="{cls[line[0]]}">{html.escape(line)}</span>' if line[:1] in cls
        else html.escape(line) for line in lines) + "</pre>"


def _html(r: CompileReport) -> str:
    counts = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in r.counts.items())
    body = [
        f"<h1>attnopt report: graph {r.graph_id}</h1>",
        f"<p>{'training' if r.training else 'inference'} graph, {r.frozen_weights} frozen "
        f"weights, inner compiler <b>{html.escape(r.inner)}</b></p>",
        f'<table class="counts">{counts}</table>',
        "".join(f"<p class='muted'>note: {html.escape(n)}</p>" for n in r.notes),
    ]
    for p in r.passes:
        removed, added = p.changed()
        status = "failed, rolled back" if p.error else f"{p.rewrites} rewrites"
        if p.skipped:
            status = f"skipped ({p.skipped})"
        body.append(f"<h2>pass {html.escape(p.name)}: {status}</h2>")
        body.append(f"<p class='muted'>nodes {p.nodes_before} → {p.nodes_after}, "
                    f"{p.seconds * 1e3:.1f} ms</p>")
        if p.error:
            body.append(f"<p class='err'>{html.escape(p.error)}</p>")
        if p.rejected:
            items = "".join(f"<li>{html.escape(x)}</li>" for x in p.rejected)
            body.append(f"<p>Rejected candidates:</p><ul class='rej'>{items}</ul>")
        if p.notes:
            items = "".join(f"<li>{html.escape(x)}</li>" for x in p.notes)
            body.append(f"<p>Notes:</p><ul>{items}</ul>")
        if removed or added:
            body.append("<h3>changes</h3>" + _diff_block(r.diff(p.name)))
            body.append(
                "<details open><summary>whole graph, before and after</summary>"
                "<div class='cols'><div class='col'><h3>before</h3>"
                + _graph_block(p.before, removed, "del")
                + "</div><div class='col'><h3>after</h3>"
                + _graph_block(p.after, added, "add") + "</div></div></details>")
        else:
            body.append("<p class='muted'>graph unchanged</p>")
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>attnopt graph {r.graph_id}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>")
