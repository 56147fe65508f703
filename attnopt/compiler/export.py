"""The rewritten graph as an ONNX model: torch.export of the rewritten module, then the dynamo
ONNX exporter with the attnopt ops translated by `backends/onnx.py`.

    rewritten = export_onnx(model, "model.onnx", kwargs={"input_ids": ids},
                            options={"quantize": "w4a16"})

Batch and sequence dims stay dynamic (see `compiler/offline.py`). Weights are stored inside the
.onnx file, or beside it in `<name>.onnx.data` for models over ONNX's 2 GB protobuf limit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from attnopt.compiler.offline import Rewritten, quiet_exporters, rewrite_model
from attnopt.compiler.options import Options


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | Options | None = None,
    *,
    with_past: bool = False,
) -> Rewritten:
    """Rewrite `model` with attnopt's passes (`rewrite_model`) and save it as ONNX at `path`.
    Returns the rewrite, whose `report` says what each pass did. `with_past`: export a
    transformers causal LM's decoding step with its KV cache as inputs and outputs, given a
    prompt as the inputs (`compiler/past.py`)."""
    rewritten = rewrite_model(model, args, kwargs, options, with_past=with_past)
    save_onnx(rewritten, path)
    return rewritten


def save_onnx(rewritten: Rewritten, path: str | os.PathLike) -> Path:
    """Export an already rewritten graph to ONNX at `path`; returns the path."""
    from attnopt.backends.onnx import OPSET, TRANSLATIONS, optimize

    missing = sorted({str(n.target) for n in rewritten.module.graph.nodes
                      if isinstance(n.target, torch._ops.OpOverload)
                      and n.target.namespace == "attnopt" and n.target not in TRANSLATIONS})
    if missing:
        raise ValueError(f"{', '.join(missing)} has no ONNX translation yet; leave out the pass "
                         "that makes it (option passes, or --passes on the command line)")
    with torch.no_grad(), quiet_exporters():
        program = torch.export.export(rewritten.module, rewritten.args, rewritten.kwargs,
                                      dynamic_shapes=rewritten.shapes, strict=False)
        onnx_program = torch.onnx.export(
            program, dynamo=True, custom_translation_table=TRANSLATIONS, opset_version=OPSET,
            input_names=rewritten.input_names, output_names=rewritten.output_names,
            optimize=False, verbose=False)
        optimize(onnx_program.model)
        onnx_program.save(Path(path))
    return Path(path)
