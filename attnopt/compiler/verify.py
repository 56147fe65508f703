"""Run an exported ONNX model in ONNX Runtime and compare it with PyTorch, output by output.

Two references: eager PyTorch (the model before attnopt touched it), and attnopt's own rewritten
graph run in PyTorch with the reference kernels (`backends/reference.py`), which compute what
each attnopt op means in fp32. The ONNX model must match the second within `TOLERANCE`: it is
the same graph. It matches the first as closely only when nothing was quantized.

CUDAExecutionProvider is used when it is available (`pip install attnopt[gpu]`, which brings
onnxruntime-gpu), CPUExecutionProvider otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)

# Largest max|ONNX - reference| / max|reference| accepted, by output dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
ATTNOPT_OPS = (torch.ops.attnopt.softmax.default, torch.ops.attnopt.attention.default,
               torch.ops.attnopt.attention_with_past.default,
               torch.ops.attnopt.latent_attention.default,
               torch.ops.attnopt.w4a16_linear.default, torch.ops.attnopt.moe.default,
               torch.ops.attnopt.moe_w4a16.default)


@dataclass(frozen=True)
class Difference:
    reference: str  # what the ONNX output was compared with
    output: str
    max_abs: float
    max_rel: float  # max_abs / max|reference|
    cosine: float  # of the flattened outputs
    tolerance: float | None  # None: reported, not checked

    @property
    def ok(self) -> bool:
        return self.tolerance is None or self.max_rel <= self.tolerance


@dataclass
class Verification:
    provider: str
    inputs: str  # the inputs' names and shapes
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.differences)


def providers() -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def run_onnx(path: str | os.PathLike, args: tuple, kwargs: Mapping[str, Any]
             ) -> tuple[list[np.ndarray], str]:
    """The ONNX model's outputs on these inputs, and the provider that ran it. A tensor kwarg
    feeds the input of its name; the other tensors (positional, or nested in a kwarg: a past
    K/V tuple) feed the remaining inputs in order. Non-tensor inputs were fixed at export."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # shape-merge notices are not the user's concern
    session = onnxruntime.InferenceSession(os.fspath(path), options, providers=providers())
    named = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    nested = [v for v in kwargs.values() if not isinstance(v, torch.Tensor)]
    positional = iter(t for t in pytree.tree_leaves((args, nested))
                      if isinstance(t, torch.Tensor))
    feeds = {}
    for graph_input in session.get_inputs():
        tensor = named.pop(graph_input.name, None)
        if tensor is None:
            tensor = next(positional, None)
        if tensor is None:
            raise ValueError(f"{path} takes an input {graph_input.name!r} that the example "
                             f"inputs do not provide; give inputs shaped like the export's")
        feeds[graph_input.name] = tensor.detach().cpu().numpy()
    return session.run(None, feeds), session.get_providers()[0]


@contextmanager
def reference_kernels(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """`gm` with every attnopt op on its reference implementation, for the duration."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATTNOPT_OPS]
    saved = [n.kwargs for n in nodes]
    for node in nodes:
        node.kwargs = {**node.kwargs, "impl": "reference"}
    gm.recompile()
    try:
        yield gm
    finally:
        for node, kwargs in zip(nodes, saved, strict=True):
            node.kwargs = kwargs
        gm.recompile()


def compare(path: str | os.PathLike, names: list[str], args: tuple, kwargs: Mapping[str, Any],
            eager: torch.nn.Module, rewritten: fx.GraphModule, *, check_eager: bool
            ) -> Verification:
    """Run the ONNX model at `path` and both references on the same inputs."""
    got, provider = run_onnx(path, args, kwargs)
    with torch.no_grad():
        expected_eager = _tensors(eager(*args, **kwargs))
        with reference_kernels(rewritten):
            expected_attnopt = _tensors(rewritten(*args, **kwargs))
    shapes = [_shapes(name, value) for name, value in kwargs.items()]
    shapes += [f"input {list(t.shape)}" for t in pytree.tree_leaves(args)
               if isinstance(t, torch.Tensor)]
    result = Verification(provider, ", ".join(s for s in shapes if s))
    for label, expected, checked in (("eager PyTorch", expected_eager, check_eager),
                                     ("attnopt in PyTorch", expected_attnopt, True)):
        if len(expected) != len(got):
            raise ValueError(f"{path} has {len(got)} outputs, {label} gives {len(expected)}")
        for name, e, g in zip(names, expected, got, strict=True):
            result.differences.append(_difference(label, name, e, torch.from_numpy(g),
                                                  TOLERANCE.get(e.dtype) if checked else None))
    return result


def _shapes(name: str, value: Any) -> str:
    """`input_ids [3, 11]`; the tensors nested in an input as a count when they share a shape
    (`past_key_values 4 x [3, 2, 11, 16]`); "" for an input that holds none."""
    tensors = _tensors(value)
    shapes = {tuple(t.shape) for t in tensors}
    if len(tensors) == 1:
        return f"{name} {list(tensors[0].shape)}"
    if len(shapes) == 1:
        return f"{name} {len(tensors)} x {list(shapes.pop())}"
    return ", ".join(f"{name}[{i}] {list(t.shape)}" for i, t in enumerate(tensors))


def _tensors(output: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def _difference(label: str, name: str, expected: torch.Tensor, got: torch.Tensor,
                tolerance: float | None) -> Difference:
    e, g = expected.detach().double().flatten(), got.double().flatten()
    max_abs = (g - e).abs().max().item() if e.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    cosine = torch.nn.functional.cosine_similarity(g, e, dim=0).item() if e.numel() else 1.0
    return Difference(label, name, max_abs, max_abs / max(scale, 1e-30), cosine, tolerance)
