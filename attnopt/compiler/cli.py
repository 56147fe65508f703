"""The `attnopt` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnopt",
        description="Graph-rewriting torch.compile backend: fused attention, softmax, MoE and "
        "int4 linear kernels. Use it as torch.compile(model, backend='attnopt').",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo", help="compile a small built-in Llama-style model and show what attnopt did",
        description="Build a small Llama-style model locally (random weights, no downloads), "
        "compile it with attnopt, and print the rewrites, the max error against eager PyTorch, "
        "and eager / torch.compile / attnopt timings.")
    demo.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    demo.add_argument("--seq", type=int, default=512, help="sequence length (default 512)")
    demo.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    demo.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    demo.add_argument("--quantize", choices=("w4a16",), default=None,
                      help="also turn the linear layers into int4-weight GEMMs (W4A16)")
    demo.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                      help="what compiles the rewritten graph (default inductor)")
    demo.add_argument("--report-dir", metavar="DIR",
                      help="write the HTML and JSON compile report into DIR")
    demo.add_argument("--no-baseline", action="store_true",
                      help="skip the default torch.compile baseline (saves its compile time)")
    demo.add_argument("--runs", type=int, default=20, help="timed runs per variant (default 20)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from attnopt.demo import run_demo

        return run_demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
