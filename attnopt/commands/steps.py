"""The steps the commands share, each turning a library error into a message a user can act
on: options from the command line, rewriting a loaded model, writing and checking ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from attnopt.commands import CommandError, UsageError, describe
from attnopt.commands.models import LoadedModel
from attnopt.compiler.offline import Rewritten, rewrite_model
from attnopt.compiler.options import Options
from attnopt.compiler.past import DecoderWithPast
from attnopt.compiler.verify import Verification, compare


def options(args: argparse.Namespace, **extra: Any) -> Options:
    """The compile options the command line asks for (only the flags the command has)."""
    given = {"quantize": getattr(args, "quantize", None), **extra}
    if getattr(args, "group_size", None) is not None:
        given["group_size"] = args.group_size
    if getattr(args, "skip", None):
        given["skip"] = ("lm_head", *args.skip)
    if getattr(args, "passes", None):
        given["passes"] = [p.strip() for p in args.passes.split(",") if p.strip()]
    try:
        return Options.parse(given)
    except ValueError as e:
        raise UsageError(str(e).removeprefix("attnopt: ")) from None


def rewrite(loaded: LoadedModel, opts: Options, *, with_past: bool = False) -> Rewritten:
    try:
        return rewrite_model(loaded.model, loaded.args, loaded.kwargs, opts, with_past=with_past)
    except Exception as e:  # torch.export reports untraceable models with many exception types
        raise CommandError(
            f"torch.export could not capture {loaded.description} ({describe(e)}). attnopt "
            "exports with torch.export(strict=False); what it cannot trace (control flow on "
            "tensor values, say) must be rewritten in the model, see torch.export's docs") from e


def save_onnx(rewritten: Rewritten, path: Path) -> None:
    from attnopt.compiler.export import save_onnx

    try:
        save_onnx(rewritten, path)
    except Exception as e:  # the exporter raises its own error types per stage
        raise CommandError(f"the ONNX export failed ({describe(e)})") from e


def verify(path: Path, rewritten: Rewritten, loaded: LoadedModel, eager: Any,
           *, quantized: bool) -> Verification:
    """Run the ONNX model on the inputs kept for verification against `eager` (the float
    model) and the rewritten graph. Only the latter is checked when weights were quantized.
    A decoding step with past K/V runs as the step after the verification prompt, whose K/V
    `eager` computes."""
    args, kwargs = loaded.verify_args, loaded.verify_kwargs
    if rewritten.step is not None:
        eager = DecoderWithPast(eager)
        args, kwargs = (), eager.inputs_after(args, kwargs)
    try:
        return compare(path, rewritten.output_names, args, kwargs, eager, rewritten.module,
                       check_eager=not quantized)
    except Exception as e:  # ONNX Runtime raises its own error types
        raise CommandError(f"running {path.name} in ONNX Runtime failed ({describe(e)})"
                           ) from e

