"""`python -m benchmarks.gpu`, the one command for the first GPU: on this CPU machine its
`--plan` lists every step and checks that each could run (modules import, scripts take their
flags, test files exist, budgets fit in 8 minutes); the run itself refuses without CUDA; and
its RESULTS.md writer replaces its own section and nothing else."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_plan_lists_and_checks_every_step():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--plan"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("plan: ok")
    for step in gpu.STEPS:
        assert f"python -m {step.module} {' '.join(step.args)}" in proc.stdout
    assert sum(s.budget_s for s in gpu.STEPS) <= gpu.BUDGET_S == 480


def test_plan_reports_what_cannot_run(monkeypatch, capsys):
    monkeypatch.setattr(gpu, "STEPS", [
        gpu.Step("softmax", "benchmarks.softmax", ("--quick", "--no-such-flag"), 300, "x"),
        gpu.Step("missing", "benchmarks.no_such_module", (), 300, "y"),
    ])
    assert gpu.plan() == 1
    out = capsys.readouterr().out
    assert "softmax: `python -m benchmarks.softmax` does not take ['--no-such-flag']" in out
    assert "missing: `python -m benchmarks.no_such_module --help` failed" in out
    assert "the budgets add up to 600 s, over 480 s" in out
    assert out.rstrip().endswith("plan: 3 problem(s)")


def test_the_run_needs_cuda(capsys):
    if torch.cuda.is_available():
        return  # on a GPU machine the run is the real thing, not a test
    assert gpu.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_results_section_is_replaced_not_appended(tmp_path, monkeypatch):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nThe CPU tables stay.\n")
    monkeypatch.setattr(gpu, "RESULTS", results)
    monkeypatch.setattr(gpu, "RESULTS_JSON", tmp_path / "RESULTS-gpu.json")
    out = tmp_path / "out"
    out.mkdir()
    env = {"device": "NVIDIA H100", "torch": "2.13.0", "date": "2026-01-01"}
    step = {"step": "softmax", "status": "passed", "seconds": 12.0, "budget s": 30,
            "summary": ""}
    for ms in (1.5, 0.75):  # a first and a second GPU run
        (out / "softmax-NVIDIA_H100.md").write_text(f"### softmax\n\n| ms |\n|---|\n| {ms} |\n")
        (out / "softmax-NVIDIA_H100.json").write_text(json.dumps({"rows": [{"ms": ms}]}))
        gpu.write_results(env, [step], out)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nThe CPU tables stay.\n")
    assert text.count(gpu.BEGIN) == text.count(gpu.END) == 1
    assert "| 0.75 |" in text and "| 1.5 |" not in text
    assert "### GPU: softmax" in text and "| softmax | passed | 12.0 | 30 |" in text
    saved = json.loads((tmp_path / "RESULTS-gpu.json").read_text())
    assert saved["tables"]["softmax-NVIDIA_H100"]["rows"] == [{"ms": 0.75}]
    assert saved["env"] == env
