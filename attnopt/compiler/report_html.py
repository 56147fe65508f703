"""The HTML page of a CompileReport: one self-contained file (inline CSS and SVG, no script,
nothing fetched when it is viewed).

First an overview: one row per pass linking to its section, and every rejected candidate with
its reason. Then per pass: for each rewrite a picture of the region it replaced beside what
replaced it, for each rejected candidate a picture of the near-match with the node it was
refused at outlined, then the text diff and the whole graph before and after, both collapsed.

The page costs text linear in the graph (the collapsed panes) plus one small picture per
rewrite or rejection: a graph is drawn only where a pass touched it, never whole.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from attnopt.compiler.subgraph import Rewrite, Subgraph
from attnopt.compiler.viz import ARROW_DEFS, svg

if TYPE_CHECKING:
    from attnopt.compiler.report import CompileReport, PassRecord

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1600px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1em;margin:1.2em 0 .3em} a{color:#0645ad}
table{border-collapse:collapse} td,th{padding:2px 10px;text-align:left}
table.counts th{text-align:right}
table.passes td,table.passes th{border-bottom:1px solid #e4e4e4}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} th{white-space:nowrap}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:12px;margin:0;max-height:70vh}
.cols{display:flex;gap:1em} .col{flex:1;min-width:0}
.del{background:#fdd} .add{background:#dfd} .err{color:#a00;white-space:pre-wrap}
.rej{color:#8a5a00} .muted{color:#777} summary{cursor:pointer;margin:1em 0 .3em}
.pic{content-visibility:auto;contain-intrinsic-size:auto 320px}
.pair{display:flex;flex-wrap:wrap;gap:.5em 1.5em;align-items:flex-start}
figure{margin:0;max-width:100%;overflow-x:auto} figcaption{color:#555;font-size:12px}
.to{align-self:center;font-size:1.6em;color:#999}
.sw{display:inline-block;padding:0 .5em;margin-right:.4em;border:1px solid;border-radius:3px}
svg.g{font:11px ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace}
svg.g path{fill:none;stroke:#999;stroke-width:1.2;marker-end:url(#arrow)}
rect{stroke-width:1.2}
.ctx rect,.sw.ctx{fill:#f4f4f4;background:#f4f4f4;stroke:#aaa;border-color:#aaa;
  stroke-dasharray:4 3;border-style:dashed}
.ctx text{fill:#666} .nm{font-weight:bold}
.old rect,.sw.old{fill:#fdd;background:#fdd;stroke:#c55;border-color:#c55}
.new rect,.sw.new{fill:#dfd;background:#dfd;stroke:#4a4;border-color:#4a4}
.cand rect,.sw.cand{fill:#fff1cc;background:#fff1cc;stroke:#c90;border-color:#c90}
.fail rect,.sw.fail{stroke:#d00;border-color:#d00;stroke-width:3.5;border-width:3px}
"""

_LEGEND = ("<p class='muted'>In the pictures: <span class='sw old'>replaced</span>"
           "<span class='sw new'>what replaced it</span><span class='sw cand'>refused candidate"
           "</span><span class='sw fail'>the node it was refused at</span><span class='sw ctx'>"
           "one hop outside: inputs and users</span> (boxes read name, op, dtype[shape]).</p>")


def page(r: CompileReport) -> str:
    body = [
        ARROW_DEFS,
        f"<h1>attnopt report: graph {r.graph_id}</h1>",
        f"<p>{'training' if r.training else 'inference'} graph, {r.frozen_weights} frozen "
        f"weights, inner compiler <b>{html.escape(r.inner)}</b></p>",
        "<table class='counts'><tr>" + "".join(f"<th>{k}</th>" for k in r.counts)
        + "</tr><tr>" + "".join(f"<td class='num'>{v}</td>" for v in r.counts.values())
        + "</tr></table>",
        "".join(f"<p class='muted'>note: {html.escape(n)}</p>" for n in r.notes),
        _overview(r),
    ]
    body += [_pass_section(r, i, p) for i, p in enumerate(r.passes)]
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>attnopt graph {r.graph_id}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>")


def _status(p: PassRecord) -> str:
    if p.skipped:
        return f"skipped ({p.skipped})"
    return "failed, rolled back" if p.error else f"{p.rewrites} rewrites"


def _overview(r: CompileReport) -> str:
    rows = []
    for i, p in enumerate(r.passes):
        numbers = ["", "", "", ""] if p.skipped else [
            str(p.rewrites), str(len(p.rejected)), f"{p.nodes_before} → {p.nodes_after}",
            f"{p.seconds * 1e3:.1f} ms"]
        result = "failed, rolled back" if p.error else ("skipped: " + p.skipped if p.skipped
                                                        else "ok")
        rows.append(f"<tr><td><a href='#pass-{i}'>{html.escape(p.name)}</a></td>"
                    + "".join(f"<td class='num'>{x}</td>" for x in numbers)
                    + f"<td>{html.escape(result)}</td></tr>")
    rejected = [f"<li><a href='#rej-{i}-{j}'>{html.escape(p.name)}</a>: {html.escape(text)}</li>"
                for i, p in enumerate(r.passes) for j, text in enumerate(p.rejected)]
    return ("<h2 id='overview'>Overview</h2><table class='passes'><tr><th>pass</th>"
            "<th>rewrites</th><th>rejected</th><th>nodes before → after</th><th>time</th>"
            "<th>result</th></tr>" + "".join(rows) + "</table>"
            + f"<h3>Rejected candidates ({len(rejected)})</h3>"
            + (f"<ol class='rej'>{''.join(rejected)}</ol>" if rejected
               else "<p class='muted'>none</p>")
            + _LEGEND)


def _pass_section(r: CompileReport, i: int, p: PassRecord) -> str:
    out = [f"<section id='pass-{i}'><h2>pass {html.escape(p.name)}: {_status(p)}</h2>"]
    if not p.skipped:
        out.append(f"<p class='muted'>nodes {p.nodes_before} → {p.nodes_after}, "
                   f"{p.seconds * 1e3:.1f} ms</p>")
    if p.error:
        out.append(f"<p class='err'>{html.escape(p.error)}</p>")
    if p.notes:
        items = "".join(f"<li>{html.escape(x)}</li>" for x in p.notes)
        out.append(f"<p>Notes:</p><ul>{items}</ul>")
    out += [_rewrite_picture(i, j, len(p.rewritten), rw) for j, rw in enumerate(p.rewritten)]
    unpictured = 0 if p.error else p.rewrites - len(p.rewritten)
    if unpictured > 0:
        out.append(f"<p class='muted'>{unpictured} rewrites of this pass are not pictured (the "
                   "pass does not record its rewrites); the text diff below has them.</p>")
    refused = p.refused + [None] * (len(p.rejected) - len(p.refused))
    out += [_rejected_picture(i, j, text, sub)
            for j, (text, sub) in enumerate(zip(p.rejected, refused, strict=False))]
    removed, added = p.changed()
    if removed or added:
        out.append(_text_panes(r, p, removed, added, open_diff=unpictured > 0))
    elif not p.skipped:
        out.append("<p class='muted'>graph unchanged</p>")
    return "".join(out) + "</section>"


def _caption(what: str, sub: Subgraph) -> str:
    left_out = f", {sub.users_left_out} more users not drawn" if sub.users_left_out else ""
    n = len(sub.region)
    return f"<figcaption>{what}: {n} node{'s' if n != 1 else ''}{left_out}</figcaption>"


def _rewrite_picture(i: int, j: int, n: int, rw: Rewrite) -> str:
    rule = html.escape(rw.rule)
    return (f"<div class='pic' id='rw-{i}-{j}'><h3>rewrite {j + 1} of {n}: {rule}</h3>"
            "<div class='pair'><figure>" + _caption("replaced", rw.replaced)
            + svg(rw.replaced, "old", f"{rw.rule}: the region replaced")
            + "</figure><span class='to'>→</span><figure>" + _caption("by", rw.added)
            + svg(rw.added, "new", f"{rw.rule}: what replaced it") + "</figure></div></div>")


def _rejected_picture(i: int, j: int, text: str, sub: Subgraph | None) -> str:
    anchor, _, reason = text.partition(": ")
    picture = ("<figure>" + _caption("candidate", sub)
               + svg(sub, "cand", f"candidate refused at {anchor}") + "</figure>"
               if sub is not None else "")
    return (f"<div class='pic' id='rej-{i}-{j}'><h3>rejected at <code>{html.escape(anchor)}"
            f"</code></h3><p class='rej'>{html.escape(reason)}</p>{picture}</div>")


def _text_panes(r: CompileReport, p: PassRecord, removed: set[str], added: set[str],
                open_diff: bool) -> str:
    lines = r.diff(p.name).splitlines()[2:]  # the ---/+++ header says nothing the page does not
    minus = sum(1 for line in lines if line[:1] == "-")
    plus = sum(1 for line in lines if line[:1] == "+")
    cls = {"-": "del", "+": "add", "@": "muted"}
    diff = "<pre>" + "\n".join(
        f'<span class="{cls[line[0]]}">{html.escape(line)}</span>' if line[:1] in cls
        else html.escape(line) for line in lines) + "</pre>"
    return (f"<details{' open' if open_diff else ''}><summary>text diff: −{minus} +{plus} lines"
            f"</summary>{diff}</details>"
            f"<details><summary>whole graph, before and after ({len(p.before)} → "
            f"{len(p.after)} lines)</summary><div class='cols'><div class='col'><h3>before</h3>"
            + _graph_block(p.before, removed, "del")
            + "</div><div class='col'><h3>after</h3>"
            + _graph_block(p.after, added, "add") + "</div></div></details>")


def _graph_block(lines: list[str], highlight: set[str], cls: str) -> str:
    out = []
    for line in lines:
        text = html.escape(line)
        out.append(f'<span class="{cls}">{text}</span>' if line.split(" = ", 1)[0] in highlight
                   else text)
    return "<pre>" + "\n".join(out) + "</pre>"
