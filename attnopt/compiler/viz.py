"""Drawing a pictured subgraph as inline SVG: boxes labelled name / op / dtype[shape], arrows
from producer to consumer, top to bottom.

The layout is grandalf's Sugiyama layout (pure Python, no Graphviz binary): nodes are put on
layers so every edge points down, edges longer than one layer get dummy nodes to bend through,
node orders per layer are improved by barycenter sweeps to reduce crossings, and x coordinates
come from Brandes-Köpf alignment (the mean of the middle two of four aligned placements).
`dot` works the same way; the pictures are a few dozen nodes, so each takes milliseconds.

The SVG carries classes, not colours: the page's stylesheet says how a replaced node, an added
node, a refused candidate, a context node and the culprit look, and the arrow head is one
`<marker id="arrow">` the page defines once (`ARROW_DEFS`).
"""

from __future__ import annotations

import html
import itertools
from dataclasses import dataclass, field

from grandalf.graphs import Edge, Graph, Vertex
from grandalf.layouts import SugiyamaLayout

from attnopt.compiler.subgraph import PictureNode, Subgraph

CHAR_W, LINE_H, PAD = 6.7, 14.0, 7.0  # 11px monospace text: width per character, line height
MAX_CHARS = 52  # longer labels are cut with "…" (the full text is the box's tooltip)
BOX_H = 3 * LINE_H + 2 * PAD
NAME_CLASS = (' class="nm"', "", "")  # per label line: the name is bold
X_GAP, Y_GAP, COMPONENT_GAP, MARGIN = 22.0, 34.0, 40.0, 4.0

ARROW_DEFS = ('<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>'
              '<marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" '
              'markerHeight="7" orient="auto"><path d="M0,0L8,4L0,8z" fill="#777"/></marker>'
              '</defs></svg>')


@dataclass
class _Box:
    """grandalf's vertex view: it reads w and h and writes xy, the box's centre."""

    w: float
    h: float
    xy: tuple[float, float] = (0.0, 0.0)


@dataclass
class _Route:
    """grandalf's edge view: it hands over the points the edge passes, centre to centre."""

    points: list[tuple[float, float]] = field(default_factory=list)

    def setpath(self, points: list[tuple[float, float]]) -> None:
        self.points = list(points)


def _labels(node: PictureNode) -> list[str]:
    value = f"{node.dtype}{node.shape}" if node.dtype or node.shape else "(no tensor)"
    return [node.name, node.op, value]


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 1] + "…"


def layout(sub: Subgraph) -> tuple[dict[str, _Box], list[tuple[str, str, _Route]], float, float]:
    """Boxes by node name (top-left at xy), (source, target, route) per edge, and the picture's
    width and height."""
    vertices = {}
    for n in sub.nodes:
        v = Vertex(n.name)
        v.view = _Box(max(len(_cut(t)) for t in _labels(n)) * CHAR_W + 2 * PAD, BOX_H)
        vertices[n.name] = v
    edges = []
    for n in sub.nodes:
        for src in n.inputs:
            e = Edge(vertices[src], vertices[n.name])
            e.view = _Route()
            edges.append((src, n.name, e))
    x_offset, height = MARGIN, 0.0
    for component in Graph(list(vertices.values()), [e for _, _, e in edges]).C:
        sugiyama = SugiyamaLayout(component)
        sugiyama.xspace, sugiyama.yspace = X_GAP, Y_GAP
        sugiyama.dw = sugiyama.dh = 2.0  # dummy nodes are bends, not boxes: keep them thin
        sugiyama.init_all(optimize=True)  # optimize: inputs sit just above their first reader
        sugiyama.draw()
        boxes = [v.view for v in component.sV]
        left = min(b.xy[0] - b.w / 2 for b in boxes)
        for b in boxes:  # from centre to top-left, components side by side
            b.xy = (b.xy[0] - b.w / 2 - left + x_offset, b.xy[1] - b.h / 2 + MARGIN)
        for e in component.sE:
            e.view.points = [(x - left + x_offset, y + MARGIN) for x, y in e.view.points]
        x_offset = max(b.xy[0] + b.w for b in boxes) + COMPONENT_GAP
        height = max(height, *(b.xy[1] + b.h for b in boxes))
    boxes = {name: v.view for name, v in vertices.items()}
    routes = [(src, dst, e.view) for src, dst, e in edges]
    width = max(x_offset - COMPONENT_GAP, MARGIN) + MARGIN  # an empty picture is a margin
    return boxes, routes, width, height + MARGIN


def _path(route: _Route, src: _Box, dst: _Box) -> str:
    """The route from the bottom of `src` to the top of `dst` through its bends, as cubic
    curves that leave and enter every point vertically (so arrows point down)."""
    points = list(route.points)
    points[0] = (points[0][0], src.xy[1] + src.h)
    points[-1] = (points[-1][0], dst.xy[1])
    d = [f"M{points[0][0]:.0f},{points[0][1]:.0f}"]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        mid = (y0 + y1) / 2
        d.append(f"C{x0:.0f},{mid:.0f} {x1:.0f},{mid:.0f} {x1:.0f},{y1:.0f}")
    return "".join(d)


def svg(sub: Subgraph, region_class: str, label: str) -> str:
    """The picture as an `<svg>` element. Region nodes get class `region_class` ("old" for a
    replaced region, "new" for what replaced it, "cand" for a refused candidate), context nodes
    "ctx", marked nodes also "fail"; each node group has `data-node` = its name."""
    boxes, routes, width, height = layout(sub)
    parts = [f'<svg class="g" role="img" aria-label="{html.escape(label)}" width="{width:.0f}" '
             f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">']
    parts += [f'<path d="{_path(route, boxes[src], boxes[dst])}"/>' for src, dst, route in routes]
    for n in sub.nodes:
        box, lines = boxes[n.name], _labels(n)
        classes = "n " + ("ctx" if n.context else region_class) + (
            " fail" if n.name in sub.marked else "")
        spans = "".join(
            f'<tspan x="{PAD:.0f}" y="{PAD + (i + 0.8) * LINE_H:.0f}"{cls}>{html.escape(_cut(t))}'
            "</tspan>" for i, (t, cls) in enumerate(zip(lines, NAME_CLASS, strict=True)))
        parts.append(
            f'<g class="{classes}" data-node="{html.escape(n.name)}" '
            f'transform="translate({box.xy[0]:.0f},{box.xy[1]:.0f})">'
            f'<title>{html.escape(" | ".join(lines))}</title>'
            f'<rect width="{box.w:.0f}" height="{box.h:.0f}" rx="4"/><text>{spans}</text></g>')
    parts.append("</svg>")
    return "".join(parts)
