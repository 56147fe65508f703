"""`attnopt quantize MODEL -o OUT`: int4 weights once, offline, into a checkpoint directory
(`attnopt.save_quantized`; load it with `attnopt.load_quantized`), optionally with the
quantized model as ONNX beside it."""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.text import Text

from attnopt.commands import UsageError, models, show, steps
from attnopt.commands.outputs import check_target, publish, staged
from attnopt.quantization import quantize_model, save_quantized
from attnopt.quantization.checkpoint import CONFIG

# What a transformers directory needs besides its weights to be rebuilt (config, tokenizer);
# copied into OUT so that `from_config` + `load_quantized` work from OUT alone.
SIDECARS = ("*.json", "*.txt", "*.model", "*.tiktoken")
# The quantized model as ONNX takes the passes that keep its int4 layers as they are: fusing
# sibling int4 linears, attention, softmax; never compile-time RTN of what quantize_model left.
ONNX_PASSES = ("attention", "softmax", "linear_fusion")


def run(args: argparse.Namespace) -> int:
    console = Console()
    out = Path(args.output)
    check_target(out, args.force, what="-o directory")
    if args.verify and not args.onnx:
        raise UsageError("--verify runs the exported model in ONNX Runtime: add --onnx")
    if args.calib is not None and args.method == "rtn":
        raise UsageError("--calib is read by --method awq, gptq and gptq+awq only; choose one "
                         "or drop --calib")
    opts = steps.options(args, quantize="w4a16", passes=list(ONNX_PASSES))
    texts = models.calibration_texts(Path(args.calib)) if args.calib else None
    loaded = models.load(args.model)
    header = (f"[bold]attnopt quantize[/]: {escape(loaded.description)}, "
              f"{args.method.upper()}, groups of {args.group_size}")
    calibration: list[Any] | None = None
    if texts:
        calibration = loaded.calibration(texts)
        header += f", calibrated on {len(calibration)} texts"
    elif args.method != "rtn":
        made = loaded.random_calibration()
        calibration = made.inputs
        header += (f", calibrated on {made.what} because no --calib was given "
                   f"({made.better} calibrates better)")
    console.print(header)
    float_model = copy.deepcopy(loaded.model) if args.verify else None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("quantizing", total=None)
        summary = quantize_model(
            loaded.model, group_size=args.group_size, method=args.method,
            calibration=calibration, skip=opts.skip,
            progress=lambda name, done, total: progress.update(
                task, completed=done, total=total, description=escape(name)))
    if not summary.layers:
        raise UsageError(f"{loaded.description} has no linear layer left to quantize: lm_head "
                         f"and --skip keep all {len(summary.skipped)} in float; check the globs")
    show.quantization(console, summary)
    with staged(out) as tmp:
        target = tmp / out.name
        save_quantized(loaded.model, target, summary)
        if loaded.directory is not None:
            _copy_sidecars(loaded.directory, target)
        if args.onnx:
            rewritten = steps.rewrite(loaded, opts)
            show.passes(console, rewritten.report)
            steps.save_onnx(rewritten, target / "model.onnx")
            if args.verify:
                result = steps.verify(target / "model.onnx", rewritten, loaded, float_model,
                                      quantized=True)
                show.verification(console, result)
                if not result.ok:
                    console.print(f"{out} not written")
                    return 1
        publish(target, out)
    files = sorted(out.iterdir())
    size = sum(p.stat().st_size for p in files) / 2**20
    console.print(Text(f"wrote {out}/ ({size:.1f} MiB): {', '.join(p.name for p in files)}"))
    return 0


def _copy_sidecars(source: Path, target: Path) -> None:
    for pattern in SIDECARS:
        for path in source.glob(pattern):
            if path.is_file() and path.name != CONFIG and not path.name.endswith(".index.json"):
                shutil.copy2(path, target / path.name)
