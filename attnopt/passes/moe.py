"""moe: the routed experts of a mixture-of-experts block become one `attnopt::moe`.

The op's inputs are what every form shares: the hidden states x [T, H], the router's top-k
expert ids and weights [T, k], and the stacked expert weights gate_up [E, 2I, H] and
down [E, H, I] (frozen constants; views of the model's tensors where it stores them
transposed), with optional per-expert biases and the expert's form (`reference.ExpertForm`:
activation, gate/up layout, where the routing weight applies). Its output is
Σ_j w[t, j] · expert_e(x[t]). The router itself (softmax then top-k, or top-k then softmax,
renormalised or not) stays in the graph: it is cheap, and every model spells it differently.

The forms, one module each:
- `moe_transformers`: transformers v5's `grouped_mm` and `batched_mm` experts (Mixtral, Qwen,
  OLMoE, GPT-OSS with its biases, interleaved gate/up and clamped SwiGLU);
- `moe_loop`: loops over the experts with data-dependent token sets (the classic ModuleList
  loop, transformers' `eager` experts, GPT-OSS's and DBRX's own loops);
- `moe_sorted`: pairs sorted by expert and split into runs by data-dependent sizes (JetMoE);
- `moe_dense`: every expert computed on every token, weighted by scores that are provably zero
  outside the top-k (Llama-4's bmm experts, an all-experts einsum);
- `moe_audit`: after the rewrites, every router top-k and expert-like structure left in the
  graph gets one line in `rejected` saying why, and a graph cut through an MoE block a note.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.compiler.options import Options
from attnopt.compiler.rewrite import PatternPass
from attnopt.passes import moe_audit, moe_dense, moe_loop, moe_sorted, moe_transformers

aten = torch.ops.aten


class MoePass:
    """The pattern forms (a rule table), then the expert loops and sorted runs (anchored at their
    last index_add), then the audit."""

    name = counts_as = "moe"
    needs_frozen_weights = True

    def __init__(self) -> None:
        self.forms = PatternPass("moe", counts_as="moe", rules=[
            *moe_transformers.RULES, *moe_dense.RULES], needs_frozen_weights=True)

    def not_applicable(self, options: Options) -> str | None:
        return None

    def apply(self, gm: fx.GraphModule, ctx) -> int:
        rewrites = self.forms.apply(gm, ctx) + self._loops(gm, ctx)
        moe_audit.audit(gm, ctx)
        return rewrites

    def _loops(self, gm: fx.GraphModule, ctx) -> int:
        rewrites = 0
        for node in reversed(list(gm.graph.nodes)):
            if node.target is aten.index_add.default and not getattr(node, "_erased", False) \
                    and not any(u.target is aten.index_add.default for u in node.users):
                steps = moe_loop.loop_steps(node)
                if isinstance(steps, list):
                    steps = moe_loop.steps_problem(steps) or steps
                if isinstance(steps, str):
                    ctx.reject(node, steps)
                elif steps:
                    moe_loop.rewrite_loop(gm, node, steps, ctx)
                    rewrites += 1
                elif isinstance(found := moe_sorted.match(node), str):
                    ctx.reject(node, found)
                elif found:
                    moe_sorted.rewrite(gm, node, *found, ctx)
                    rewrites += 1
        if rewrites:
            gm.graph.eliminate_dead_code()
            moe_loop.drop_dead_nonzeros(gm.graph)
        return rewrites


moe_pass = MoePass()
