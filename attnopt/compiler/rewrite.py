"""A pass that is a named table of rules (pattern, check, rewrite), applied in one sweep."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch._prims_common import (
    compute_elementwise_output_logical_to_physical_perm,
    is_non_overlapping_and_dense_or_false,
)

from attnopt.compiler.graph import insert_call
from attnopt.compiler.layout import same
from attnopt.compiler.options import Options
from attnopt.compiler.pattern import Refusal, Rule, erase_unused, root_targets
from attnopt.compiler.subgraph import describe, nodes_between

aten = torch.ops.aten


class PatternPass:
    """Visits nodes from the graph's outputs backwards, so a rule anchored at the outermost node
    (a cast after a softmax, say) is tried before the inner node could be taken alone. Rules are
    indexed by their anchor's target: one sweep, linear in graph size.

    Every candidate is accounted for: a rule's refusal gives its reason, and `explain(node)`,
    asked afterwards of every node that no refusal covers, names the candidates no rule
    matched at all (a softmax in a spelling the pass does not know, a linear whose weight is
    cast first) with the reason they were left alone; it returns None for other nodes."""

    def __init__(self, name: str, counts_as: str, rules: Sequence[Rule],
                 needs_frozen_weights: bool = False,
                 applies: Callable[[Options], str | None] = lambda options: None,
                 explain: Callable[[fx.Node], str | None] | None = None) -> None:
        self.name, self.counts_as, self.rules = name, counts_as, tuple(rules)
        self.needs_frozen_weights = needs_frozen_weights
        self.not_applicable = applies
        self.explain = explain
        self._index: dict[Any, list[Rule]] = defaultdict(list)
        for rule in self.rules:
            for target in dict.fromkeys(root_targets(rule.pattern)):
                self._index[target].append(rule)

    def _candidates(self, node: fx.Node) -> list[Rule]:
        if node.op != "call_function":
            return []
        packet = getattr(node.target, "overloadpacket", None)
        return self._index.get(node.target, []) + self._index.get(packet, [])

    def apply(self, gm: fx.GraphModule, ctx: Any) -> int:
        graph, rewrites = gm.graph, 0
        explained: set[fx.Node] = set()  # inside a candidate already refused with its reason
        refused: list[tuple[fx.Node, Refusal]] = []
        for node in reversed(list(graph.nodes)):
            if getattr(node, "_erased", False):
                continue
            refusal = None
            for rule in self._candidates(node):
                match, why = rule.find(node, ctx)
                if match is None:
                    refusal = refusal or why
                    continue
                replaced, previous = describe(match.nodes), node.prev  # for the report's picture
                with graph.inserting_before(node):
                    new = rule.rewrite(match, graph, ctx)
                    # Checked before `_same_layout`, which may give `new` the node's own value.
                    if not (reason := _changes_value_type(node, new)):
                        new = _same_layout(graph, new, node)
                if reason:  # a bug in a rule: never silent
                    _erase_between(graph, previous, node)
                    refusal = refusal or Refusal(f"{rule.name}: {reason}", match.nodes)
                    continue
                new.meta.setdefault("stack_trace", node.meta.get("stack_trace"))
                new.meta["attnopt_rule"] = f"{self.name}.{rule.name}"
                added = nodes_between(previous, node)
                node.replace_all_uses_with(new)
                erase_unused(graph, match.nodes)
                ctx.rewritten(new.meta["attnopt_rule"], replaced, added)
                rewrites += 1
                break
            else:
                if refusal and node not in explained:
                    refused.append((node, refusal))
                    explained.update(refusal.nodes)
        # A candidate one rule refused may have been taken by another rule anchored further in
        # (the batched form inside a refused written-out one): then it was not left alone.
        for node, refusal in refused:
            if not any(getattr(n, "_erased", False) for n in refusal.nodes):
                ctx.reject(node, refusal.reason, refusal.nodes)
        if self.explain is not None:
            for node in graph.nodes:
                if node.op == "call_function" and node not in explained and (
                        reason := self.explain(node)):
                    ctx.reject(node, reason)
        if rewrites:
            # Producers only the replaced nodes read (a mask's where(), say) are dead now.
            graph.eliminate_dead_code()
        return rewrites


def _changes_value_type(old: fx.Node, new: fx.Node) -> str | None:
    """Why `new` cannot stand in for `old`: another dtype, rank or size (compared without
    guards), or None. The rules' checks should make this impossible; this is the backstop."""
    a, b = old.meta.get("val"), new.meta.get("val")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    if a.dtype != b.dtype or a.dim() != b.dim() or not all(map(same, a.shape, b.shape)):
        return (f"the rewrite would give {b.dtype} {list(b.shape)} where the graph has "
                f"{a.dtype} {list(a.shape)}")
    return None


def _erase_between(graph: fx.Graph, before: fx.Node, node: fx.Node) -> None:
    """Erase the nodes a rewrite inserted between `before` and `node`, last first."""
    while node.prev is not before:
        graph.erase_node(node.prev)


# The dim orders (outermost first) of the [B, H, L, D] output layouts an op's `layout` argument
# names (`reference.OUT_LAYOUTS`).
_OUT_LAYOUT_ORDERS = {(0, 1, 2, 3): "bhld", (0, 2, 1, 3): "blhd"}


def _out_layout(t: torch.Tensor) -> str | None:
    """The name of t's 4-D dense layout if an attention op can write it, else None."""
    if t.dim() != 4 or not is_non_overlapping_and_dense_or_false(t):
        return None
    order, _ = compute_elementwise_output_logical_to_physical_perm(t)
    return _OUT_LAYOUT_ORDERS.get(tuple(order))


def _takes_layout(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(a.name == "layout" for a in schema.arguments)


def _same_layout(graph: fx.Graph, new: fx.Node, old: fx.Node) -> fx.Node:
    """Downstream views were traced against the replaced node's strides (SDPA's flash kernels
    return [B, H, L, D] laid out as [B, L, H, D], say), so a replacement with other strides gets
    copied into the old layout, unless it takes a `layout` argument and can write it."""
    before, after = old.meta.get("val"), new.meta.get("val")
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return new
    if before.stride() == after.stride() or before.numel() <= 1:
        return new
    if (layout := _out_layout(before)) and _takes_layout(new):
        # The op writes that layout itself (attnopt::attention's `layout`): no copy after it.
        new.update_kwarg("layout", layout)
        new.meta["val"] = before
        return new
    if is_non_overlapping_and_dense_or_false(before):
        # Dense in some dim order: copy into that order and permute back. No size is written
        # into the graph, so symbolic sizes (dynamic shapes, torch.export) stay symbolic.
        order, _ = compute_elementwise_output_logical_to_physical_perm(before)
        physical = insert_call(graph, aten.permute.default, (new, order))
        dense = insert_call(graph, aten.clone.default, (physical,),
                            {"memory_format": torch.contiguous_format})
        inverse = [order.index(d) for d in range(len(order))]
        return insert_call(graph, aten.permute.default, (dense, inverse))
    buffer = insert_call(graph, aten.empty_strided.default, (before.shape, before.stride()),
                         {"dtype": before.dtype, "device": before.device})
    return insert_call(graph, aten.copy.default, (buffer, new))
