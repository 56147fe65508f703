"""`attnopt export MODEL -o model.onnx`: attnopt's rewritten graph as an ONNX model."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from attnopt.commands import UsageError, models, show, steps
from attnopt.commands.outputs import check_target, publish, staged
from attnopt.commands.terminal import console as make_console
from attnopt.compiler import past


def run(args: argparse.Namespace) -> int:
    console = make_console()
    out = Path(args.output)
    if out.suffix != ".onnx":
        raise UsageError(f"-o {out}: the output must be a file ending in .onnx")
    check_target(out, args.force, what="-o path")
    if args.quantize is None and (args.group_size is not None or args.skip):
        raise UsageError("--group-size and --skip choose how --quantize w4a16 quantizes; add "
                         "--quantize w4a16 or drop them")
    opts = steps.options(args)
    loaded = models.load(args.model)
    if args.with_past and (reason := past.unsupported(loaded.model)):
        raise UsageError(f"--with-past: {reason}")
    what = ", one decoding step with past K/V" if args.with_past else ""
    console.print(f"[bold]attnopt export[/]: {escape(loaded.description)}{what}")
    rewritten = steps.rewrite(loaded, opts, with_past=args.with_past)
    show.passes(console, rewritten.report)
    with staged(out) as tmp:
        steps.save_onnx(rewritten, tmp / out.name)
        if args.verify:
            result = steps.verify(tmp / out.name, rewritten, loaded, loaded.model,
                                  quantized=opts.quantize is not None
                                  or models.holds_int4(loaded.model))
            show.verification(console, result)
            if not result.ok:
                console.print(f"{out} not written")
                return 1
        written = sorted(tmp.iterdir())  # model.onnx, and model.onnx.data past 2 GB
        for path in written:
            publish(path, out.parent / path.name)
    size = sum((out.parent / p.name).stat().st_size for p in written)
    console.print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    return 0
