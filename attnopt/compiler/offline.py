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
length), static where it does not. torch.export specialises a size of 1, and models branch on it
(transformers' masks do on a batch of one), so an example whose tensors all have a batch of one
is exported as two copies of its row: rows are independent in inference, so the graph is the
one a batch of one would give, with the batch dim dynamic. Other dims of size 1 stay static:
give at least two tokens.

A transformers model returns its KV cache (a DynamicCache, which torch.export cannot output)
unless `use_cache=False`; when the forward takes `use_cache` and the inputs do not set it, the
model's configs say False while it is exported, so the rewritten graph is called with the same
inputs as the example, without `use_cache`.

`with_past=True` exports a transformers causal LM's decoding step instead, its KV cache as
inputs and outputs (`compiler/past.py`); the example inputs are then a prompt, whose K/V become
the example past.
"""

from __future__ import annotations

import inspect
import logging
import operator
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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
    args: tuple  # the example inputs it was exported with (a batch of one as two rows)
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
    args, kwargs = batch_of_two(tuple(args), dict(kwargs or {}))
    step = input_names = None
    if with_past:
        step = DecoderWithPast(model)
        traced, args, kwargs = step, (), step.inputs_after(args, kwargs)
        input_names, shapes = step.input_names(kwargs), step.dynamic_dims(kwargs)
    else:
        traced, shapes = model, dynamic_dims(args, kwargs)
    with torch.no_grad(), quiet_exporters(), _without_kv_cache(traced, args, kwargs):
        program = torch.export.export(traced, args, kwargs, dynamic_shapes=shapes,
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
    return Rewritten(gm, report, args, kwargs, shapes,
                     output_names(program.call_spec.out_spec), input_names, step)


def batch_of_two(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The example inputs with a batch of one given as two copies of its row (see the module
    doc); unchanged unless every tensor input has a leading dim of size 1."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != 1 for t in tensors):
        return args, kwargs

    def twice(x: Any) -> Any:
        return x.expand(2, *x.shape[1:]).contiguous() if isinstance(x, torch.Tensor) else x

    return pytree.tree_map(twice, args), pytree.tree_map(twice, kwargs)


@contextmanager
def _without_kv_cache(model: torch.nn.Module, args: tuple,
                      kwargs: Mapping[str, Any]) -> Iterator[None]:
    """`use_cache=False` in every config of `model` for the duration, if its forward takes
    `use_cache` and the inputs leave it unset (transformers fills an unset use_cache from the
    config; see the module doc). Otherwise nothing changes."""
    try:
        signature = inspect.signature(model.forward)
        given = signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):  # a forward without a signature, or inputs it rejects
        given, signature = {}, None
    configs = {}
    if signature is not None and "use_cache" in signature.parameters and "use_cache" not in given:
        configs = {id(m.config): m.config for m in model.modules()
                   if getattr(getattr(m, "config", None), "use_cache", None) is not None}
    saved = {key: config.use_cache for key, config in configs.items()}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for key, config in configs.items():
            config.use_cache = saved[key]


@contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence, for the duration, what the exporters print that is not the user's concern:
    torch.onnx's op registry warns once per torchvision op that torchvision is not installed,
    and torch's own pytree code raises a FutureWarning about its deprecated LeafSpec."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec",
                                    category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


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
