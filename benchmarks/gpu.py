"""One command for the first GPU: the GPU tests at full sizes and every benchmark, within 8
minutes, with the tables written into benchmarks/RESULTS.md and a JSON beside it.

    python -m benchmarks.gpu            # on a CUDA machine
    python -m benchmarks.gpu --plan     # anywhere: what it would run, and a check that it can

Each step is a subprocess with a time budget (the budgets add up to BUDGET_S); a step that
runs over is stopped and reported as such, and the run goes on. The steps:

- tests: the kernel tests on CUDA tensors (the same files CI runs under the interpreter, here
  with autotuning and the real compiler), `test_full_sizes.py` at model shapes, the launch
  counts with real launches, and CUDA-graph capture;
- softmax, attention (prefill vs each SDPA backend, decode), w4a16 (vs bf16 F.linear, ATen's
  and torchao's int4 kernels), moe (vs transformers' experts implementations), decode (per-token
  latency vs transformers' static cache + torch.compile): the scripts of `benchmarks/`, in their
  `--quick` form, GPU tables only.

The results replace the previous GPU section of RESULTS.md (between the markers below): the
device, driver, CUDA, torch, Triton and transformers versions and the date, a line per step
(passed / failed / over budget, seconds), then each table. RESULTS-gpu.json holds the same with
the raw rows.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_JSON = ROOT / "benchmarks" / "RESULTS-gpu.json"
BEGIN, END = "<!-- benchmarks.gpu: begin -->", "<!-- benchmarks.gpu: end -->"
BUDGET_S = 480

TEST_FILES = [
    "tests/backends/test_full_sizes.py",
    "tests/backends/test_launch_counts.py",
    "tests/backends/test_tuning.py",
    "tests/backends/test_w4a16_kernel.py",
    "tests/backends/test_softmax_op.py",
    "tests/backends/test_attention_kernel.py",
    "tests/backends/test_paged_attention.py",
    "tests/backends/test_moe_kernel.py",
    "tests/backends/test_moe_w4a16.py",
]


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # run as `python -m module *args`
    args: tuple[str, ...]
    budget_s: int
    what: str


STEPS = [
    Step("tests", "pytest", ("-q", "-p", "no:cacheprovider", *TEST_FILES), 150,
         "kernel tests on CUDA, full-size checks, launch counts, graph capture"),
    Step("softmax", "benchmarks.softmax", ("--quick",), 30,
         "attnopt::softmax vs torch.softmax, the eager form and Inductor"),
    Step("attention", "benchmarks.attention", ("--quick", "--gpu-only"), 70,
         "prefill TFLOP/s vs each SDPA backend and Inductor; decode GB/s vs SDPA"),
    Step("w4a16", "benchmarks.w4a16", ("--quick", "--gpu-only"), 80,
         "int4 GEMV/GEMM per path vs bf16 F.linear, ATen int4 (tinygemm), torchao"),
    Step("moe", "benchmarks.moe", ("--quick", "--gpu-only"), 70,
         "fused MoE (float and int4) vs transformers' eager, grouped_mm, batched_mm"),
    Step("decode", "benchmarks.decode", ("--quick", "--model", "small"), 80,
         "ms/token: eager vs static cache + torch.compile vs attnopt's paged cache"),
]


def environment() -> dict[str, str]:
    import torch
    import transformers
    import triton

    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "transformers": transformers.__version__,
           "cuda": str(torch.version.cuda)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"sm_{props.major}{props.minor}",
                   sms=str(props.multi_processor_count),
                   memory=f"{props.total_memory / 2**30:.0f} GiB")
    else:
        env["device"] = "none (CPU only)"
    with contextlib.suppress(OSError):  # no git: no commit line
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True).stdout.strip()
    return env


def plan() -> int:
    """Print the steps and check that each could run here: the modules import, each script
    takes the flags given, the test files exist, the budgets fit, RESULTS.md can take the
    section."""
    import torch

    problems = []
    total = sum(s.budget_s for s in STEPS)
    print(f"python -m benchmarks.gpu: {len(STEPS)} steps, {total} s budget in all "
          f"(limit {BUDGET_S} s); tables into {RESULTS.relative_to(ROOT)} and "
          f"{RESULTS_JSON.relative_to(ROOT)}\n")
    helps = {s.name: _help(s) for s in STEPS}  # started together: each imports torch
    for step in STEPS:
        print(f"  {step.name:<10} {step.budget_s:>4} s  python -m {step.module} "
              f"{' '.join(step.args)}\n             {step.what}")
        problems += _check_step(step, helps[step.name])
    if total > BUDGET_S:
        problems.append(f"the budgets add up to {total} s, over {BUDGET_S} s")
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if (BEGIN in text) != (END in text):
        problems.append(f"{RESULTS.name} has one of the GPU section markers but not the other")
    if not os.access(RESULTS.parent, os.W_OK):
        problems.append(f"cannot write to {RESULTS.parent}")
    cuda = torch.cuda.is_available()
    print(f"\nCUDA here: {'yes, ' + torch.cuda.get_device_name() if cuda else 'no'}"
          f"{'' if cuda else ' (the run itself needs a CUDA device)'}")
    for p in problems:
        print(f"problem: {p}")
    print("plan: ok" if not problems else f"plan: {len(problems)} problem(s)")
    return 1 if problems else 0


def _help(step: Step) -> subprocess.Popen | None:
    if step.module == "pytest":
        return None
    return subprocess.Popen([sys.executable, "-m", step.module, "--help"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_step(step: Step, helping: subprocess.Popen | None) -> list[str]:
    """What keeps `step` from running here: a missing test file, a module that does not import
    or does not take the step's flags."""
    if helping is None:
        missing = [f for f in TEST_FILES if not (ROOT / f).exists()]
        if importlib.util.find_spec("pytest") is None:
            missing.append("pytest (pip install pytest)")
        return [f"{step.name}: {f} is missing" for f in missing]
    out, err = helping.communicate(timeout=300)
    if helping.returncode:
        last = (err.strip().splitlines() or [""])[-1]
        return [f"{step.name}: `python -m {step.module} --help` failed: {last}"]
    missing = [a for a in step.args if a.startswith("--") and a not in out]
    return [f"{step.name}: `python -m {step.module}` does not take {missing}"] if missing else []


def run_step(step: Step, out: Path, deadline: float) -> dict:
    """Run one step in its own process group, stopped at its budget or the deadline."""
    budget = max(1.0, min(step.budget_s, deadline - time.monotonic()))
    cmd = [sys.executable, "-m", step.module, *step.args]
    if step.module != "pytest":
        cmd += ["--out", str(out)]
    print(f"== {step.name} ({budget:.0f} s): {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=budget)
        status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = f"over budget (stopped at {budget:.0f} s)"
    seconds = time.monotonic() - start
    print(output[-4000:], flush=True)
    summary = next((line for line in reversed(output.splitlines())
                    if step.module == "pytest" and (" passed" in line or " failed" in line)), "")
    return {"step": step.name, "command": " ".join(cmd[1:]), "budget s": step.budget_s,
            "seconds": round(seconds, 1), "status": status, "summary": summary,
            "tail": output[-2000:]}


def write_results(env: dict, steps: list[dict], out: Path) -> None:
    tables = sorted(out.glob("*.md"))
    lines = [BEGIN, f"## GPU run: {env['device']} — `python -m benchmarks.gpu`", "",
             ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| step | status | seconds | budget s | tests |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['budget s']} | "
              f"{s['summary']} |" for s in steps]
    lines.append("")
    for table in tables:
        lines += [table.read_text().replace("### ", "### GPU: ", 1), ""]
    lines.append(END)
    section = "\n".join(lines) + "\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
    raw = {t.stem: json.loads(t.with_suffix(".json").read_text()) for t in tables
           if t.with_suffix(".json").exists()}
    RESULTS_JSON.write_text(json.dumps({"env": env, "steps": steps, "tables": raw}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true",
                        help="print the steps and check they can run; run nothing")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS],
                        help="run only these steps")
    args = parser.parse_args(argv)
    if args.plan:
        return plan()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here. This command is for a GPU machine; "
              "`python -m benchmarks.gpu --plan` shows what it would run.", file=sys.stderr)
        return 2
    env = environment()
    deadline = time.monotonic() + BUDGET_S
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    with tempfile.TemporaryDirectory(prefix="attnopt-gpu-") as tmp:
        results = [run_step(step, Path(tmp), deadline) for step in steps]
        write_results(env, results, Path(tmp))
    print(f"wrote {RESULTS} and {RESULTS_JSON}")
    for r in results:
        print(f"  {r['step']:<10} {r['status']:<32} {r['seconds']:>6} s  {r['summary']}")
    return 0 if all(r["status"] == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
