"""`attnopt quantize MODEL -o OUT`: int4 weights once, offline, into a checkpoint directory
(`attnopt.save_quantized`; load it with `attnopt.load_quantized`), optionally with the
quantized model as ONNX beside it."""

from __future__ import annotations

import argparse
import copy
import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import Progress
from rich.text import Text

from attnopt.commands import UsageError, models, show, steps
from attnopt.commands.outputs import check_target, publish, staged
from attnopt.commands.terminal import console as make_console
from attnopt.quantization import quantize_model, save_quantized

# MODEL's own copies of the float weights the int4 checkpoint replaces: everything else in the
# directory (config, tokenizer, a sentence-transformers model's modules.json and the folders it
# names, README) is copied into OUT, so that OUT is used where MODEL was. Top level only: a
# sentence-transformers `2_Dense/model.safetensors` is a module of its own, kept.
FLOAT_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                 "pytorch_model*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.h5",
                 "*.msgpack", "*.gguf", "*.onnx", "*.onnx.data", "*.onnx_data",
                 "onnx", "openvino")  # the last two: folders of the float model exported
# Not the model's: its git history and the hub's download cache.
NOT_THE_MODEL = (".git", ".cache")
# The quantized model as ONNX takes the passes that keep its int4 layers as they are: fusing
# sibling int4 linears, attention, softmax; never compile-time RTN of what quantize_model left.
ONNX_PASSES = ("attention", "softmax", "linear_fusion")


def run(args: argparse.Namespace) -> int:
    console = make_console()
    out = Path(args.output)
    check_target(out, args.force, what="-o directory", kind="directory")
    if Path(args.model).exists() and out.resolve() in (Path(args.model).resolve(),
                                                       *Path(args.model).resolve().parents):
        raise UsageError(f"-o {out} would replace MODEL {args.model} (or a directory holding "
                         "it) with its quantized copy; choose another -o directory")
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
            _copy_model_files(loaded.directory, target)
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


def _copy_model_files(source: Path, target: Path) -> None:
    """Every file and folder of `source` but its float weights, `NOT_THE_MODEL` and what the
    checkpoint already wrote (model.safetensors, quantization_config.json)."""
    for path in sorted(source.iterdir()):
        name = path.name
        if (name in NOT_THE_MODEL or (target / name).exists()
                or any(fnmatch(name, pattern) for pattern in FLOAT_WEIGHTS)):
            continue
        if path.is_dir():
            shutil.copytree(path, target / name, symlinks=False)
        else:
            shutil.copy2(path, target / name)
