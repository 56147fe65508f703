"""Runs the passes in order over one ATen graph.

Before and after each pass the graph is rendered (for the diff and the HTML report). A pass that
raises, or that leaves a graph that does not lint, is rolled back to its snapshot and recorded as
failed; the compile goes on unless `strict`. Passes stay linear in graph size.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch.fx as fx

from attnopt.compiler.graph import count_ops, render
from attnopt.compiler.options import Options
from attnopt.compiler.report import PassRecord
from attnopt.compiler.subgraph import Rewrite, Subgraph, describe


@dataclass
class PassContext:
    options: Options
    training: bool  # a forward graph whose saved tensors feed a backward graph
    frozen: bool  # weights are constants in the graph (inference graphs only)
    # The graph is for torch.export / ONNX (the offline path), not for running compiled: rewrites
    # that only help an exporter (the kv_cache pass's DynamicCache rule) apply then.
    exporting: bool = False
    rejected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # For the report's pictures: one per rewrite, and one per rejected line (same order).
    rewrites: list[Rewrite] = field(default_factory=list)
    refused: list[Subgraph] = field(default_factory=list)

    def reject(self, node: fx.Node, reason: str, candidate: Sequence[fx.Node] = ()) -> None:
        """`candidate`: the nodes of the near-match, when the pass knows them."""
        self.rejected.append(f"{node.name}: {reason}")
        self.refused.append(describe(dict.fromkeys((*candidate, node)), marked=(node,)))

    def rewritten(self, rule: str, replaced: Subgraph, added: Sequence[fx.Node]) -> None:
        """`replaced`: the matched region, described before the graph changed; `added`: the
        nodes the rewrite inserted, once they replace it."""
        self.rewrites.append(Rewrite(rule, replaced, describe(added)))

    def note(self, text: str) -> None:
        self.notes.append(text)


class GraphPass(Protocol):
    name: str
    counts_as: str  # the CompileReport.counts key its rewrites add to
    needs_frozen_weights: bool  # weight rewrites run only on inference graphs

    def not_applicable(self, options: Options) -> str | None:
        """Why the options turn this pass off (quantize not requested, say), or None."""

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> int: ...


def run_pipeline(
    gm: fx.GraphModule, passes: Sequence[GraphPass], options: Options, *, training: bool,
    frozen: bool, exporting: bool = False,
) -> list[PassRecord]:
    records = []
    for p in passes:
        ctx = PassContext(options, training=training, frozen=frozen, exporting=exporting)
        before = render(gm.graph)
        nodes_before = count_ops(gm.graph)
        start = time.perf_counter()
        rewrites, error = 0, None
        skipped = p.not_applicable(options)
        if skipped is None and p.needs_frozen_weights and not frozen:
            skipped = "weights are not frozen (a training graph)"
        if skipped is None:
            saved, collectives = _snapshot(gm), _collectives(gm.graph)
            try:
                rewrites = p.apply(gm, ctx)
                gm.graph.lint()
                if _collectives(gm.graph) != collectives:
                    raise RuntimeError("the pass removed, added or reordered a collective "
                                       "(all_reduce, all_gather, wait_tensor, ...)")
                gm.recompile()
            except Exception as e:
                if options.strict:
                    raise
                _restore(gm, saved)
                rewrites = 0
                error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
        records.append(PassRecord(
            name=p.name, rewrites=rewrites, rejected=ctx.rejected, nodes_before=nodes_before,
            nodes_after=count_ops(gm.graph), seconds=time.perf_counter() - start, error=error,
            notes=ctx.notes if error is None else [], skipped=skipped,
            counts_as=p.counts_as, before=before, after=render(gm.graph),
            rewritten=ctx.rewrites if error is None else [], refused=ctx.refused,
        ))
    return records


def _collectives(graph: fx.Graph) -> list[fx.Node]:
    """The graph's communication, in order: functional collectives and their waits (what
    tensor-parallel models hold). No pass may remove, add or reorder one: a rank that skipped
    or reordered an all_reduce would hang or mix its peers' data."""
    return [n for n in graph.nodes if n.op == "call_function" and getattr(
        n.target, "namespace", None) in ("_c10d_functional", "c10d_functional")]


def collectives_note(graph: fx.Graph) -> str | None:
    """What the report says of the collectives every pass left in place, or None if none."""
    names = [n.target._opname for n in _collectives(graph)]
    if not names:
        return None
    counts = ", ".join(f"{name} x{names.count(name)}" for name in dict.fromkeys(names))
    return f"{len(names)} collectives kept as they were, in order: {counts}"


@dataclass
class _Snapshot:
    graph: fx.Graph
    attrs: set[str]


def _snapshot(gm: fx.GraphModule) -> _Snapshot:
    # Copy the graph, not the module: constants (the weights) are shared, never duplicated.
    graph = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    value, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(value).meta = dict(old_output.meta)
    return _Snapshot(graph, set(gm.__dict__) | set(gm._buffers) | set(gm._modules))


def _restore(gm: fx.GraphModule, snap: _Snapshot) -> None:
    for name in (set(gm._buffers) | set(gm._modules) | set(gm.__dict__)) - snap.attrs:
        delattr(gm, name)
    gm.graph = snap.graph
    gm.recompile()
