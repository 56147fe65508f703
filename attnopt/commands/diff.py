"""`attnopt diff MODEL`: what each pass changed in a model's graph, without exporting it."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from attnopt.commands import models, show, steps
from attnopt.commands.outputs import check_target, publish, staged
from attnopt.commands.terminal import console as make_console


def run(args: argparse.Namespace) -> int:
    console = make_console()
    for flag, path in (("--html", args.html), ("--json", args.json)):
        if path:  # a report is regenerated at will: replacing one needs no --force
            check_target(Path(path), force=True, what=f"{flag} path")
    opts = steps.options(args)
    loaded = models.load(args.model)
    console.print(f"[bold]attnopt diff[/]: {escape(loaded.description)}")
    report = steps.rewrite(loaded, opts).report
    show.passes(console, report)
    diff = report.diff()
    if diff:
        show.diff(console, diff)
    else:
        console.print("the passes changed nothing")
    for path, write in ((args.html, report.write_html), (args.json, report.write_json)):
        if path:
            with staged(Path(path)) as tmp:
                write(tmp / "report")
                publish(tmp / "report", Path(path))
            console.print(f"wrote {path}")
    return 0
