"""The torch.compile backend: `torch.compile(model, backend="attnopt", options={...})`.

Registered only through the `torch_dynamo_backends` entry point (pyproject.toml), so importing
attnopt never collides with that registration.
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any
from unittest import mock

import torch
import torch.fx as fx
from functorch.compile import make_boxed_func
from torch._guards import detect_fake_mode
from torch._inductor import config as inductor_config
from torch.utils._pytree import tree_flatten

from attnopt.backends.ops import inductor_decompositions, triton_usable
from attnopt.compiler.capture import capture, per_parameter_set
from attnopt.compiler.options import Options
from attnopt.compiler.pipeline import collectives_note, run_pipeline
from attnopt.compiler.reinplace import reinplace_input_updates
from attnopt.compiler.report import CompileReport, add_report, next_graph_id
from attnopt.compiler.whole_block import forward_backend_context, whole_block_capture
from attnopt.passes import PIPELINE


class VerificationError(AssertionError):
    """The rewritten graph gave different results from the original (options verify+strict)."""


def attnopt_backend(
    gm: fx.GraphModule,
    example_inputs: list,
    options: Mapping[str, Any] | Options | None = None,
    mode: str | None = None,
) -> Callable:
    """Rewrite the graph Dynamo captured and hand it to the inner compiler.

    `mode` is accepted for torch.compile compatibility and passed to nothing: attnopt has no
    modes; use `options`.
    """
    opts = Options.parse(options)
    _check_kernels(opts, example_inputs)
    return per_parameter_set(lambda inputs: _compile(gm, inputs, opts), example_inputs)


# Dynamo enters this around every call of attnopt-compiled code, tracing included: data-dependent
# expert loops are captured whole (compiler/whole_block.py).
attnopt_backend.backend_ctx_ctor = whole_block_capture
forward_backend_context()


def _compile(gm: fx.GraphModule, example_inputs: list, opts: Options) -> Callable:
    report = CompileReport(graph_id=next_graph_id(), passes=[], options=opts.as_dict(),
                           inner=opts.inner, notes=_graph_breaks())
    passes = [p for p in PIPELINE if opts.passes is None or p.name in opts.passes]

    def compile_forward(aten: fx.GraphModule, args: list, training: bool, frozen: int) -> Callable:
        report.training, report.frozen_weights = training, frozen
        report.passes = run_pipeline(aten, passes, opts, training=training, frozen=not training)
        if note := collectives_note(aten.graph):
            report.notes.append(note)
        return _inner_compile(aten, args, opts, report, is_backward=False, inference=not training)

    def compile_backward(aten: fx.GraphModule, args: list) -> Callable:
        return _inner_compile(aten, args, opts, report, is_backward=True, inference=False)

    compiled = capture(gm, example_inputs, compile_forward, compile_backward)
    if opts.verify:
        compiled = _verify(gm, compiled, example_inputs, report, opts.strict)
    add_report(report)
    if opts.report_dir:
        report.write(opts.report_dir)
    return compiled


_breaks_seen: Counter[str] = Counter()


def _graph_breaks() -> list[str]:
    """The graph breaks Dynamo recorded since the last graph it handed over, one note each.
    Dynamo records a break before it compiles the graph that ends at it, so these name where
    this graph was cut: a pattern that spans the cut (an attention, an expert loop) lies in
    two graphs, and no pass sees it whole."""
    from torch._dynamo.utils import counters

    current = counters["graph_break"]
    if any(current[reason] < n for reason, n in _breaks_seen.items()):  # torch._dynamo.reset
        _breaks_seen.clear()
    new = [reason for reason, n in current.items() if n > _breaks_seen[reason]]
    _breaks_seen.clear()
    _breaks_seen.update(current)
    return [f"graph break before this graph was compiled: {_break_summary(reason)} (a "
            "pattern across it, an attention or an expert loop, is split between graphs)"
            for reason in new]


def _break_summary(reason: str) -> str:
    """Dynamo's reason in one line: its first line, and the op or call it names."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    context = next((line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("Developer debug context:")), "")
    return f"{lines[0]} ({context})" if context and lines else (lines[0] if lines else reason)


def _check_kernels(opts: Options, example_inputs: list) -> None:
    if opts.kernels != "triton":
        return
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            reason = triton_usable(t.device)
            if reason:
                raise ValueError(f"attnopt: option kernels='triton' cannot be honoured: {reason}. "
                                 "Use kernels='auto' to pick per device.")


def _inner_compile(aten: fx.GraphModule, args: list, opts: Options, report: CompileReport, *,
                   is_backward: bool, inference: bool) -> Callable:
    if opts.inner == "eager":
        updates = reinplace_input_updates(aten)
        if updates:
            report.notes.append(f"inner eager: {updates} input updates written in place")
        return make_boxed_func(aten.forward)
    from torch._inductor.compile_fx import compile_fx_inner

    try:
        aten = _decompose_for_inductor(aten, args)
    except Exception as e:  # Inductor lowers or falls back on undecomposed ops: slower, correct
        if opts.strict:
            raise
        report.notes.append(f"Inductor decompositions not applied ({type(e).__name__}: {e}); "
                            "Inductor compiles the graph as it is")
    output = next(iter(reversed(aten.graph.nodes)))
    if inference:
        output.meta["user_visible_output_idxs"] = [
            i for i, n in enumerate(output.args[0]) if isinstance(n, fx.Node)]
    fake_mode = detect_fake_mode(args)
    # Frozen weights are real tensors in a graph of fake ones, as with Inductor's own freezing.
    allow_real = mock.patch.object(fake_mode, "allow_non_fake_inputs", True) if fake_mode \
        else nullcontext()
    _as_frozen_params(aten)
    # Keep every constant a tensor the compiled code reads (none inlined as literals): a small
    # parameter updated in place after compiling is then seen, as a large one is.
    with allow_real, inductor_config.patch(always_keep_tensor_constants=True):
        return compile_fx_inner(aten, args, is_backward=is_backward)


def _as_frozen_params(gm: fx.GraphModule) -> None:
    """Tell Inductor the graph's constants are frozen parameters, as its own freezing does.
    Its FX graph cache then keys them by shape and dtype (not by value, which would mean
    copying every weight to a Python list at each compile) and, on a cache hit in a later
    process, reads them from this graph instead of the artifact: the weights the model holds
    now, updated in place or another model's, never the ones the artifact was compiled with."""
    from torch._inductor.freezing_utils import record_has_frozen_params

    for node in gm.graph.find_nodes(op="get_attr"):
        value = operator.attrgetter(node.target)(gm)
        if isinstance(value, torch.Tensor):
            value._is_frozen_param = True  # type: ignore[attr-defined]
    record_has_frozen_params(gm)


def _decompose_for_inductor(aten: fx.GraphModule, args: list) -> fx.GraphModule:
    """Our passes see ATen ops as the model wrote them (softmax, SDPA, linear); Inductor wants
    them decomposed into what it can fuse. Retrace the rewritten graph with Inductor's
    decompositions. attnopt ops stay opaque calls, except CPU paths that are plain ATen math,
    which Inductor fuses better as that math."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = detect_fake_mode(args)
    if fake_mode is None:
        return aten
    with mock.patch.object(fake_mode, "allow_non_fake_inputs", True):
        table = {**select_decomp_table(), **inductor_decompositions()}
        traced = make_fx(aten, decomposition_table=table,
                         tracing_mode="real", _allow_non_fake_inputs=True)(*args)
    return traced


def _verify(gm: fx.GraphModule, compiled: Callable, example_inputs: list,
            report: CompileReport, strict: bool) -> Callable:
    """Run the original Dynamo graph and the compiled one on copies of the example inputs."""
    from torch._subclasses.fake_tensor import FakeTensor

    if any(isinstance(x, FakeTensor) for x in example_inputs):
        report.notes.append("verify skipped: example inputs are fake tensors")
        return compiled
    clone = lambda xs: [x.clone() if isinstance(x, torch.Tensor) else x for x in xs]
    with torch.no_grad():
        expected = tree_flatten(gm(*clone(example_inputs)))[0]
        got = tree_flatten(compiled(*clone(example_inputs)))[0]
    worst, ok = 0.0, True
    for e, g in zip(expected, got, strict=True):
        if not isinstance(e, torch.Tensor) or not e.is_floating_point():
            ok = ok and torch.equal(e, g) if isinstance(e, torch.Tensor) else ok
            continue
        worst = max(worst, (e.float() - g.float()).abs().max().item() if e.numel() else 0.0)
        tol = 1e-2 if e.dtype in (torch.float16, torch.bfloat16) else 1e-4
        ok = ok and torch.allclose(e.float(), g.float(), rtol=tol, atol=tol, equal_nan=True)
    report.verify_max_abs_error = worst
    if ok:
        return compiled
    message = (f"attnopt: graph {report.graph_id} differs from eager after rewriting "
               f"(max abs error {worst:.3g}); see the report's diff")
    if strict:
        raise VerificationError(message)
    warnings.warn(message + "; falling back to the original graph", stacklevel=2)
    report.notes.append("verify failed: the original graph is used instead")
    return gm
