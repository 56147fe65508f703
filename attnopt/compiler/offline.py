"""The offline path: torch.export a model, rewrite its ATen graph with the same passes the
backend runs, and hand back the rewritten graph (a module called like the model) with its
`CompileReport`.

    rewritten = rewrite_model(model, kwargs={"input_ids": ids}, options={"quantize": "w4a16"})
    rewritten.module(input_ids=other_ids)         # the rewritten graph, any batch and length
    print(rewritten.report.diff())

The passes expect the graph the backend's AOTAutograd capture makes (`compiler/capture.py`), so
the exported program is brought to that form first:

- Composite (CompositeImplicitAutograd) ops are decomposed and nothing else, as AOTAutograd does:
  `linear` becomes `t` + `addmm`/`mm`, `matmul` the expand/view/`bmm` chain the attention pass
  reads, `scaled_dot_product_attention` its CPU flash op. (torch.export keeps composites whole.)
- Parameters and buffers become constants (`get_attr`) under flat names, with
  `meta["attnopt_parameter"]` holding the qualified name, as the backend's frozen weights do:
  weight passes read them, `skip` globs and the report name layers by them.
- export's `_assert_tensor_metadata` checks are dropped: they restate dtypes the graph already
  fixes, and as extra readers of intermediates they would stop patterns from matching.

Every tensor dim is exported as `Dim.AUTO`: dynamic where the model allows it (batch, sequence
length), static where it does not. A size of 1 in an example input is specialised by
torch.export, so give examples with at least two rows and two tokens.

`with_past=True` exports a transformers causal LM's decoding step instead, its KV cache as
inputs and outputs (`compiler/past.py`); the example inputs are then a prompt, whose K/V become
the example past.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._guards import TracingContext, detect_fake_mode, tracing
from torch.export import Dim, ShapesCollection
from torch.utils import _pytree as pytree

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.compiler.options import Options
from attnopt.compiler.past import DecoderWithPast
from attnopt.compiler.pipeline import collectives_note, run_pipeline
from attnopt.compiler.report import CompileReport, next_graph_id
from attnopt.passes import PIPELINE

INNER = "none (offline: the rewritten graph is exported as it is)"


@dataclass
class Rewritten:
    """A model's rewritten ATen graph and what was done to it."""

    module: fx.GraphModule  # called like the model: same positional and keyword inputs
    report: CompileReport
    args: tuple  # the example inputs it was exported with
    kwargs: dict[str, Any]
    shapes: ShapesCollection = field(repr=False)  # the dynamic dims of those inputs
    output_names: list[str] = field(default_factory=list)  # one per output tensor, in order
    input_names: list[str] | None = None  # one per input tensor; None: the forward's names
    # with_past: the decoding step that was exported (`module` is called like it, on the
    # inputs its `inputs_after` makes of a prompt); None otherwise.
    step: DecoderWithPast | None = field(default=None, repr=False)


def rewrite_model(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | Options | None = None,
    *,
    with_past: bool = False,
) -> Rewritten:
    """Export `model` (in eval mode, as inference is what this is for) on the example inputs,
    run attnopt's passes over its ATen graph and return the rewritten graph with its report
    (also written to `report_dir` if set). The options `inner` and `verify` belong to the
    backend and are not used: nothing compiles the graph afterwards, and the offline check is
    ONNX Runtime against PyTorch (`compiler/verify.py`).

    `with_past`: `model` is a transformers causal LM and the inputs a prompt; what is exported
    is the decoding step after it, the KV cache as tensors (`compiler/past.py`)."""
    opts = Options.parse(options)
    kwargs = dict(kwargs or {})
    step = input_names = None
    if with_past:
        step = DecoderWithPast(model)
        model, args, kwargs = step, (), step.inputs_after(args, kwargs)
        input_names, shapes = step.input_names(kwargs), step.dynamic_dims(kwargs)
    else:
        shapes = dynamic_dims(args, kwargs)
    with torch.no_grad():
        program = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=shapes,
                                      strict=False)
        program = program.run_decompositions(composite_decompositions())
    gm = program.module()
    frozen = _freeze_constants(gm)
    report = CompileReport(graph_id=next_graph_id(), passes=[], options=opts.as_dict(),
                           frozen_weights=frozen, inner=INNER)
    passes = [p for p in PIPELINE if opts.passes is None or p.name in opts.passes]
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes])
    # The passes run as they do in the backend: inside the graph's fake mode.
    with tracing(TracingContext(fake_mode)), fake_mode:
        report.passes = run_pipeline(gm, passes, opts, training=False, frozen=True,
                                     exporting=True)
    if note := collectives_note(gm.graph):
        report.notes.append(note)
    _drop_unread_constants(gm)
    if opts.report_dir:
        report.write(opts.report_dir)
    return Rewritten(gm, report, tuple(args), kwargs, shapes,
                     output_names(program.call_spec.out_spec), input_names, step)


def dynamic_dims(args: tuple, kwargs: Mapping[str, Any]) -> ShapesCollection:
    """Every dim of every tensor input as Dim.AUTO (torch.export keeps it static if it must)."""
    shapes = ShapesCollection()
    for leaf in pytree.tree_leaves((args, dict(kwargs))):
        if isinstance(leaf, torch.Tensor):
            shapes[leaf] = dict.fromkeys(range(leaf.dim()), Dim.AUTO)
    return shapes


def composite_decompositions() -> dict:
    """The decompositions of CompositeImplicitAutograd ops, and of nothing else."""
    composite = torch._C.DispatchKey.CompositeImplicitAutograd
    table = torch.export.default_decompositions()
    return {op: fn for op, fn in table.items()
            if isinstance(op, torch._ops.OpOverload) and op.has_kernel_for_dispatch_key(composite)}


def _freeze_constants(gm: fx.GraphModule) -> int:
    """Point every get_attr at a flat-named buffer of `gm` holding the same tensor (the passes
    read constants as `getattr(gm, node.target)`), record the qualified name, drop export's dtype
    assertions. Returns the number of constants."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
        elif node.op == "get_attr":
            tensor = operator.attrgetter(node.target)(gm)
            if not isinstance(tensor, torch.Tensor):
                continue
            flat = "_frozen_" + node.target.replace(".", "_")
            while hasattr(gm, flat):  # `a.b_c` and `a_b.c` flatten alike
                flat += "_"
            gm.register_buffer(flat, tensor.detach(), persistent=False)
            node.meta["attnopt_parameter"] = node.target
            node.target = flat
            count += 1
    gm.delete_all_unused_submodules()
    gm.recompile()
    return count


def _drop_unread_constants(gm: fx.GraphModule) -> None:
    """Free the constants no node reads any more (float weights a pass replaced), so that an
    export of the rewritten graph does not carry them."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [b for b in gm._buffers if b not in read]:
        delattr(gm, name)


def output_names(spec: pytree.TreeSpec) -> list[str]:
    """`logits`, `last_hidden_state`, ...: the output's key paths, one name per tensor."""
    positions = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    leaves = pytree.tree_flatten_with_path(positions)[0]
    names = []
    for i, (path, _) in enumerate(leaves):
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", "")))) for k in path]
        names.append("_".join(p for p in parts if p) or f"output_{i}")
    return names
