"""GPU compile audit: every Triton kernel the op wrappers launch, compiled for A100 (sm_80) and
H100 (sm_90) on a machine without a GPU, with registers, spills, shared memory and tensor-core
use per kernel × arch.

    python -m attnopt.backends.triton.audit            # standard tier (CI), both archs
    python -m attnopt.backends.triton.audit --full     # every dtype, flag and model shape

Three steps: `scenarios` calls the op wrappers at real model shapes on meta tensors;
`capture` records, under a stand-in GPU, each launch as the JIT would compile it (for an
autotuned kernel: every config its pruner keeps); `compile` compiles each distinct job with
the real toolchain (cached on disk); `report` says which jobs fail and why. The interpreter
(TRITON_INTERPRET=1) must be off: under it the kernels are not JIT functions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from attnopt.backends.triton.audit import capture, compile, report, scenarios

ARCHS = (80, 90)


def capture_launches(full: bool, archs=ARCHS, families=None) -> tuple[list, list[dict]]:
    """The recorded launches of every scenario on every arch, and the tuning keys of the
    `scenarios.RETUNE` pairs (same key: the second length needs no tuning run)."""
    from attnopt.backends.triton import interpreting

    if interpreting():
        raise RuntimeError("the compile audit needs the Triton JIT: unset TRITON_INTERPRET")
    launches, retune = [], []
    chosen = scenarios.scenarios(full, families)
    for arch in archs:
        with capture.fake_gpu(arch) as rec:
            for s in chosen:
                with capture.scenario(s.name):
                    s.call()
            launches += rec.launches
            if arch == archs[-1]:
                retune = _retune(rec)
    return launches, retune


def _retune(rec) -> list[dict]:
    rows = []
    for name, first, second in scenarios.RETUNE:
        keys = []
        for s in (first, second):
            start = len(rec.launches)
            with capture.scenario(s.name):
                s.call()
            keys.append({(x.job.name, x.tuning_key) for x in rec.launches[start:]
                         if x.tuning_key is not None})
            del rec.launches[start:]
        for kernel in sorted({k for k, _ in keys[0] | keys[1]}):
            a = sorted(key for k, key in keys[0] if k == kernel)
            b = sorted(key for k, key in keys[1] if k == kernel)
            rows.append({"case": name, "kernel": kernel, "first": first.name,
                         "second": second.name, "retunes": a != b})
    return rows


def run(full: bool = False, archs=ARCHS, families=None, workers: int = 2,
        cache_dir: Path | None = None, progress: Callable | None = None) -> report.Audit:
    launches, retune = capture_launches(full, archs, families)
    results = compile.compile_all([x.job for x in launches],
                                  cache_dir or compile.default_cache_dir(), workers, progress)
    return report.Audit("full" if full else "standard", launches, results, retune)
