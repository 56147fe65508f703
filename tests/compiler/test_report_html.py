"""The HTML report read back as a tree: an overview with one row per pass and links that
resolve, a picture per rewrite (replaced region beside its replacement, nodes labelled with op,
dtype and shape) and per rejected candidate (the node it was refused at marked), whole-graph
panes collapsed, and a 2,000-node graph's page built in linear time and size."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from html.parser import HTMLParser

import torch

from attnopt.compiler.options import Options
from attnopt.compiler.pipeline import run_pipeline
from attnopt.compiler.report import CompileReport, PassRecord
from attnopt.passes import PIPELINE
from tests.graphs import aten_graph


@dataclass
class El:
    tag: str
    attrs: dict[str, str | None]
    children: list[El | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self, tag: str | None = None, **attrs: str):
        """Elements below (self included) with this tag and attributes; `cls` matches one class."""
        wanted_cls = attrs.pop("cls", None)
        if ((tag is None or self.tag == tag) and (wanted_cls is None or wanted_cls in self.classes)
                and all(self.attrs.get(k) == v for k, v in attrs.items())):
            yield self
        for c in self.children:
            if isinstance(c, El):
                yield from c.iter(tag, **({"cls": wanted_cls} if wanted_cls else {}), **attrs)

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class _TreeBuilder(HTMLParser):
    VOID = frozenset({"meta", "br", "hr", "img", "input", "link"})

    def __init__(self) -> None:
        super().__init__()
        self.root = El("root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        el = El(tag, dict(attrs))
        self.stack[-1].children.append(el)
        if tag not in self.VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(El(tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(page: str) -> El:
    builder = _TreeBuilder()
    builder.feed(page)
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements"
    return builder.root


def pictured(svg: El) -> dict[str, tuple[set[str], str]]:
    """node name -> (its classes, its label text) in one picture."""
    return {g.attrs["data-node"]: (g.classes, " | ".join(t.text() for t in g.iter("tspan")))
            for g in svg.iter("g") if "data-node" in g.attrs}


def report_of(fn, *inputs: torch.Tensor) -> CompileReport:
    """The report the backend would make, from the real passes on `fn`'s ATen graph."""
    gm = aten_graph(fn, *inputs)
    passes = run_pipeline(gm, PIPELINE, Options.parse({}), training=False, frozen=True)
    return CompileReport(graph_id=0, passes=passes, options={}, inner="eager")


def written_softmax(s):
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def near_miss(s):
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(1, keepdim=True)  # (for 2-D input, dim 1 *is* dim -1)


def both(s):
    return torch.tanh(written_softmax(s)) + near_miss(s)


def labels_of(gm_node) -> str:
    val = gm_node.meta["val"]
    return f"{str(val.dtype).removeprefix('torch.')}[{', '.join(map(str, val.shape))}]"


def test_overview_has_one_row_per_pass_and_every_link_resolves(tmp_path):
    report = report_of(both, torch.randn(3, 4, 5))
    report.write_html(tmp_path / "r.html")
    root = parse((tmp_path / "r.html").read_text())
    (table,) = root.iter("table", cls="passes")
    rows = list(table.iter("tr"))[1:]
    cells = {(row := [c.text() for c in r.iter("td")])[0]: row[1:] for r in rows}
    assert list(cells) == [p.name for p in report.passes]
    assert cells["softmax"][:2] == ["1", "1"] and cells["softmax"][-1] == "ok"
    assert cells["quantize"][0] == "0"  # runs (it counts int4 linears that arrive) and finds none

    ids = {el.attrs["id"] for el in root.iter() if "id" in el.attrs}
    links = [a.attrs["href"] for a in root.iter("a") if (a.attrs.get("href") or "")[:1] == "#"]
    assert len(links) == len(report.passes) + len(report.rejected)
    assert all(href[1:] in ids for href in links)
    # The overview comes before the first pass section, and lists the rejection with its reason.
    page = (tmp_path / "r.html").read_text()
    assert page.index("id='overview'") < page.index("<section")
    (rejected,) = root.iter("ol", cls="rej")
    assert "amax over [-1] but sum over [1]: not a softmax over one dim" in rejected.text()
    assert "<script" not in page and "http" not in page  # self-contained: nothing fetched


def test_each_rewrite_pictured_replaced_region_beside_replacement(tmp_path):
    s = torch.randn(3, 4, 5)
    gm_before = aten_graph(written_softmax, s)
    report = report_of(written_softmax, s)
    softmax = report.pass_record("softmax")
    assert softmax.rewrites == len(softmax.rewritten) == 1
    report.write_html(tmp_path / "r.html")
    root = parse((tmp_path / "r.html").read_text())

    (block,) = [el for el in root.iter("div", cls="pic") if el.attrs["id"].startswith("rw-")]
    before, after = block.iter("svg", cls="g")
    old, new = pictured(before), pictured(after)
    removed, added = softmax.changed()
    replaced = {name for name, (cls, _) in old.items() if "old" in cls}
    assert replaced == removed == {"amax", "sub", "exp", "sum_1", "div"}
    assert {name for name, (cls, _) in new.items() if "new" in cls} == added
    # One hop of context, drawn as such on both sides: the input and the graph's output.
    assert {name for name, (cls, _) in old.items() if "ctx" in cls} == {"s_1", "output"}
    assert {name for name, (cls, _) in new.items() if "ctx" in cls} == {"s_1", "output"}
    nodes = {n.name: n for n in gm_before.graph.nodes}
    for name in replaced:  # labelled name | op | dtype[shape], as the graph has them
        target = nodes[name].target
        op = f"aten.{target._schema.name.split('::')[1]}"
        op += "" if target._overloadname == "default" else f".{target._overloadname}"
        assert old[name][1] == f"{name} | {op} | {labels_of(nodes[name])}"
    (new_node,) = added
    assert new[new_node][1] == f"{new_node} | attnopt.softmax | float32[3, 4, 5]"
    # One arrow per (input, reader) pair among the pictured nodes: s→amax, s→sub, amax→sub,
    # sub→exp, exp→sum, exp→div, sum→div, div→output; and s→softmax→output after.
    assert (len(list(before.iter("path"))), len(list(after.iter("path")))) == (8, 2)


def test_rejected_candidate_pictured_with_the_refusing_node_marked(tmp_path):
    report = report_of(near_miss, torch.randn(3, 4, 5))
    assert report.rejected == ["div: amax over [-1] but sum over [1]: not a softmax over one dim"]
    report.write_html(tmp_path / "r.html")
    root = parse((tmp_path / "r.html").read_text())
    (block,) = [el for el in root.iter("div", cls="pic") if el.attrs["id"].startswith("rej-")]
    assert "amax over [-1] but sum over [1]" in block.text()
    (picture,) = block.iter("svg", cls="g")
    nodes = pictured(picture)
    assert {name for name, (cls, _) in nodes.items() if "fail" in cls} == {"div"}
    assert {name for name, (cls, _) in nodes.items() if "cand" in cls} == {
        "amax", "sub", "exp", "sum_1", "div"}  # the whole near-match, not only its anchor
    assert nodes["sum_1"][1] == "sum_1 | aten.sum.dim_IntList | float32[3, 1, 5]"


def test_whole_graph_panes_are_collapsed(tmp_path):
    report = report_of(both, torch.randn(3, 4, 5))
    report.write_html(tmp_path / "r.html")
    root = parse((tmp_path / "r.html").read_text())
    details = list(root.iter("details"))
    panes = [d for d in details if "whole graph" in next(d.iter("summary")).text()]
    assert len(panes) == sum(1 for p in report.passes if any(p.changed()))  # 1: softmax
    assert all("open" not in d.attrs for d in details)
    (pane,) = panes
    assert any("del" in s.classes and s.text().startswith("div = aten.div")
               for s in pane.iter("span"))


def test_rewrites_a_pass_did_not_picture_are_said_and_the_diff_opened(tmp_path):
    record = PassRecord("handmade", rewrites=1, rejected=["x: no reason recorded"],
                        nodes_before=1, nodes_after=1, seconds=0.0,
                        before=["x = input()", "a = aten.relu(x)", "return a"],
                        after=["x = input()", "b = aten.tanh(x)", "return b"])
    report = CompileReport(graph_id=3, passes=[record], options={})
    report.write_html(tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    root = parse(page)
    assert "1 rewrites of this pass are not pictured" in page
    diff, panes = root.iter("details")
    assert "open" in diff.attrs and "open" not in panes.attrs
    (rejected,) = [el for el in root.iter("div", cls="pic") if el.attrs["id"] == "rej-0-0"]
    assert not list(rejected.iter("svg")) and "no reason recorded" in rejected.text()


def layered_model(blocks: int, width: int = 30):
    """`blocks` blocks of `width` elementwise ops and one softmax, every fifth softmax over the
    wrong dim (a rejected candidate): about (width + 8) * blocks nodes."""
    def fn(x):
        for b in range(blocks):
            for k in range(width // 2):
                x = torch.tanh(x * (1.0 + 0.001 * k))
            x = x + (near_miss(x) if b % 5 == 4 else written_softmax(x))
        return x
    return fn


def test_a_2000_node_report_is_built_in_linear_size(tmp_path):
    x = torch.randn(3, 4, 5)
    report = report_of(layered_model(56), x)
    softmax = report.pass_record("softmax")
    assert count_ops_before(report) >= 2000
    start = time.perf_counter()
    report.write_html(tmp_path / "r.html")
    seconds = time.perf_counter() - start
    page = (tmp_path / "r.html").read_text()
    pictures = page.count("<svg class=")
    assert softmax.rewrites == 45 and len(softmax.rejected) == 11
    assert pictures == 2 * softmax.rewrites + len(softmax.rejected)
    # The page is the collapsed text panes (linear in the graph) plus small pictures; no whole
    # graph is drawn. About 1.3 MB here: bound it loosely.
    assert len(page) < 4_000_000
    print(f"\n2,000-node report: {count_ops_before(report)} nodes, {pictures} pictures, "
          f"{len(page) / 1e6:.2f} MB, written in {seconds:.2f} s")


def count_ops_before(report: CompileReport) -> int:
    return report.passes[0].nodes_before
