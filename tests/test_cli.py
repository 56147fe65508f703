"""The `attnopt` command as a new user runs it."""

import subprocess
import sys

import pytest


def attnopt(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "attnopt.compiler.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_demo():
    out = attnopt("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "backend='attnopt'" in out.stdout


@pytest.mark.slow
def test_demo_reports_rewrites_error_and_timings(tmp_path):
    out = attnopt("demo", "--runs", "3", "--seq", "32", "--report-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr + out.stdout
    text = out.stdout
    assert "attention" in text and "counts:" in text and "attention=2" in text
    assert "max abs error vs eager" in text
    for variant in ("eager", "torch.compile (inductor)", "attnopt (inner=inductor)"):
        assert variant in text
    assert (tmp_path / "graph0.html").exists()
