"""Compile recorded jobs for their GPU on this (CPU-only) machine and read off what matters.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole
toolchain, ptxas included (the wheel ships it), so each job yields what the GPU would load:

- registers and spill bytes per thread, from `ptxas -v` (Triton prints its log when
  TRITON_DUMP_PTXAS_LOG is set; it runs ptxas with -v always);
- shared memory per block, `metadata.shared`, which Triton checks against the device's opt-in
  maximum before a launch (and raises OutOfResources above it);
- the products: each `tt.dot` in the TTIR with its operand types and input precision, and
  whether the PTX uses tensor cores: `wgmma.mma_async` (Hopper warpgroup MMA) or
  `mma.sync` (Ampere-style warp MMA, also valid on Hopper).

Results are cached on disk, one JSON per job, keyed by the kernel's source hash (Triton's
`cache_key`, which covers the jit functions it calls), the specialization, the arch and the
toolchain (`backend.hash()`, which includes the ptxas version), so an unchanged kernel is never
compiled twice, in one run or across runs. Jobs run in a process pool (compiles are
single-threaded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import re
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from attnopt.backends.triton.audit.capture import Job

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_TTIR_DOT_TYPES = re.compile(r": tensor<[\dx]*x(\w+)[^>]*> \* tensor<[\dx]*x(\w+)")
_TTIR_PRECISION = re.compile(r"inputPrecision = (\w+)")


@dataclasses.dataclass
class Result:
    """What one compile gave; `error` is set (and the figures are 0) when it failed."""

    error: str | None = None
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    dots: list[list[str]] = dataclasses.field(default_factory=list)  # [a type, b type, precision]
    tensor_cores: str = ""  # "wgmma", "mma" or "" (none)
    seconds: float = 0.0  # wall time of the compile
    cpu_seconds: float = 0.0  # CPU time, ptxas included: what sizes the CI tier

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def analyse(asm: dict, shared: int, ptxas_log: str) -> Result:
    """The figures of one compiled kernel from its TTIR, PTX and ptxas log."""
    regs = [int(r) for r in _PTXAS_REGS.findall(ptxas_log)]
    spills = [(int(s), int(loads)) for s, loads in _PTXAS_SPILLS.findall(ptxas_log)]
    dots = []
    for line in asm["ttir"].splitlines():
        if " tt.dot " in line and (types := _TTIR_DOT_TYPES.search(line)):
            # The TTIR leaves out the default precision, "ieee" (exact fp32 products).
            precision = _TTIR_PRECISION.search(line)
            dots.append([*types.groups(), precision.group(1) if precision else "ieee"])
    ptx = asm["ptx"]
    tc = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else ""
    return Result(registers=max(regs, default=0),
                  spill_stores=sum(s for s, _ in spills), spill_loads=sum(x for _, x in spills),
                  shared=shared, dots=dots, tensor_cores=tc)


def _kernel(name: str):
    from triton.runtime.jit import _triton_jit_function_registry

    importlib.import_module(name.split(":", 1)[0])
    return _triton_jit_function_registry[name]


def compile_job(job: Job) -> Result:
    """Compile `job` for its arch (never from Triton's cache: ptxas must run to report)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = job.decode()
    start, cpu_start = time.perf_counter(), _cpu_time()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), knobs.nvidia.scope(), knobs.compilation.scope():
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            src = ASTSource(_kernel(job.kernel), signature, constexprs, attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                      options=options)
    except Exception as err:  # a compile error is a finding, reported with its first line
        text = str(err).strip().splitlines()
        return Result(error=f"{type(err).__name__}: {text[0] if text else ''}"[:300],
                      seconds=time.perf_counter() - start, cpu_seconds=_cpu_time() - cpu_start)
    result = analyse(compiled.asm, compiled.metadata.shared, log.getvalue())
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = _cpu_time() - cpu_start
    return result


def _cpu_time() -> float:
    """CPU seconds of this process and of its finished children (ptxas)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


# Part of every cache key: bump it when `analyse`, `Result` or `Job.decode` change.
ANALYSIS_VERSION = 3


def cache_key(job: Job) -> str:
    """A key that changes with the kernel's source (and its callees'), the job, the toolchain
    and the analysis."""
    import triton

    text = "\n".join([_kernel(job.kernel).cache_key, job.kernel, str(job.arch), job.spec,
                      triton.__version__, _backend_hash(job.arch), str(ANALYSIS_VERSION)])
    return hashlib.sha256(text.encode()).hexdigest()


_backend_hashes: dict[int, str] = {}


def _backend_hash(arch: int) -> str:
    if arch not in _backend_hashes:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        _backend_hashes[arch] = make_backend(GPUTarget("cuda", arch, 32)).hash()
    return _backend_hashes[arch]


def default_cache_dir() -> Path:
    env = os.environ.get("ATTNOPT_AUDIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "attnopt" / "audit"


def _init_worker(triton_cache: str) -> None:
    # Triton still writes what it compiles to its cache: a throwaway directory, not the user's.
    os.environ["TRITON_CACHE_DIR"] = triton_cache
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def compile_all(jobs: list[Job], cache_dir: Path, workers: int,
                progress=None) -> dict[Job, Result]:
    """Results of `jobs` (deduplicated), from the cache where present, compiled otherwise."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict[Job, Result] = {}
    todo: dict[Job, Path] = {}
    for job in dict.fromkeys(jobs):
        path = cache_dir / f"{cache_key(job)}.json"
        if path.exists():
            results[job] = Result(**json.loads(path.read_text()))
        else:
            todo[job] = path
    if not todo:
        return results
    with tempfile.TemporaryDirectory(prefix="attnopt-audit-triton-") as scratch, \
            ProcessPoolExecutor(max_workers=max(1, workers), initializer=_init_worker,
                                initargs=(scratch,)) as pool:
        futures = {job: pool.submit(compile_job, job) for job in todo}
        for i, (job, future) in enumerate(futures.items(), 1):
            result = future.result()
            results[job] = result
            # Written atomically, so that an interrupted run never leaves half a result.
            tmp = todo[job].with_suffix(".tmp")
            tmp.write_text(json.dumps(dataclasses.asdict(result)))
            tmp.replace(todo[job])
            if progress:
                progress(i, len(todo), job, result)
    return results
