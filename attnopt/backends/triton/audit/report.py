"""What the audit concludes from the compiled jobs: the problems of each job, a summary per
kernel × arch, and the tables (markdown) that go into the logs and benchmarks/RESULTS.md.

A job fails when a GPU would reject or slow it:

- it does not compile;
- its shared memory exceeds the arch's opt-in maximum per block (Triton raises OutOfResources
  at launch; the autotuner silently drops such a config, a fixed launch crashes);
- its registers times its threads exceed the 64K registers of an SM (the launch fails);
- it is a 16-bit job (fp16/bf16 tensors) and ptxas spills registers to local memory;
- it is a 16-bit job with a `tl.dot` whose PTX holds no tensor-core instruction.

fp32 jobs that spill, and fp32 products without tensor cores (`input_precision="ieee"` runs on
FMA units), are reported, not failed: full-precision fp32 is a correctness choice.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from attnopt.backends.triton.audit.capture import GPUS, Job, Launch
from attnopt.backends.triton.audit.compile import Result

SM_REGISTERS = 65536
_CONFIG_PREFIXES = ("BLOCK_", "GROUP_M", "SPLIT_LEN")


def is_16bit(job: Job) -> bool:
    signature, *_ = job.decode()
    return any(t in ("*fp16", "*bf16") for t in signature.values())


def config_label(job: Job) -> str:
    """Block sizes, warps and stages of a job, e.g. "BLOCK_M=128 BLOCK_N=64 w4 s3"."""
    signature, constexprs, _, options = job.decode()
    names = list(signature)
    # Keys of more than one index are elements of a tuple argument (a bias's strides), never
    # a block size.
    blocks = [f"{names[key[0]]}={v}" for key, v in sorted(constexprs.items())
              if len(key) == 1 and names[key[0]].startswith(_CONFIG_PREFIXES)]
    warps, stages = options.get("num_warps", 4), options.get("num_stages", 3)
    return " ".join([*blocks, f"w{warps}", f"s{stages}"])


def problems(job: Job, result: Result) -> list[tuple[str, str]]:
    """(kind, detail) for each reason this job would fail or spill on its GPU; empty: fine."""
    if result.error:
        return [("compile error", result.error)]
    found = []
    limit = GPUS[job.arch][3]
    if result.shared > limit:
        found.append(("smem overflow",
                      f"{result.shared / 1024:.0f} KB shared > {limit / 1024:.0f} KB"))
    warps = job.decode()[3].get("num_warps", 4)
    if result.registers * warps * 32 > SM_REGISTERS:
        found.append(("register overflow", f"{result.registers} registers x {warps * 32} threads"))
    if is_16bit(job):
        if result.spills:
            found.append(("spills", f"{result.spill_stores} B stored / "
                                    f"{result.spill_loads} B loaded per thread"))
        if any(a in ("bf16", "f16") for a, _, _ in result.dots) and not result.tensor_cores:
            found.append(("no tensor cores", "16-bit tl.dot without mma/wgmma in the PTX"))
    return found


@dataclass
class KernelSummary:
    kernel: str
    arch: int
    jobs: int = 0
    configs: set[str] = field(default_factory=set)
    max_registers: int = 0
    spilling_16bit: int = 0
    spilling_fp32: int = 0
    max_spill: int = 0
    max_shared: int = 0
    dot_jobs: int = 0
    wgmma: int = 0
    mma: int = 0
    fp32_fma_dots: int = 0
    failing: int = 0
    compile_seconds: float = 0.0  # CPU seconds

    def row(self) -> dict:
        tc = "-" if not self.dot_jobs else ", ".join(
            f"{name} {n}/{self.dot_jobs}" for name, n in
            (("wgmma", self.wgmma), ("mma", self.mma), ("none", self.fp32_fma_dots)) if n)
        return {
            "kernel": self.kernel, "arch": f"sm_{self.arch}", "compile jobs": self.jobs,
            "configs": len(self.configs), "max regs": self.max_registers,
            "spilling jobs (16-bit / fp32)": f"{self.spilling_16bit} / {self.spilling_fp32}",
            "max spill B": self.max_spill,
            "max smem KB": f"{self.max_shared / 1024:.0f} / {GPUS[self.arch][3] / 1024:.0f}",
            "tensor cores": tc, "failing jobs": self.failing,
            "compile CPU s": round(self.compile_seconds),
        }


@dataclass
class Audit:
    tier: str
    launches: list[Launch]
    results: dict[Job, Result]
    retune: list[dict] = field(default_factory=list)

    def jobs(self) -> dict[Job, list[Launch]]:
        by_job: dict[Job, list[Launch]] = defaultdict(list)
        for launch in self.launches:
            by_job[launch.job].append(launch)
        return by_job

    def failures(self) -> list[dict]:
        out = []
        for job, launches in self.jobs().items():
            for kind, detail in problems(job, self.results[job]):
                out.append({"kernel": job.name, "arch": job.arch, "config": config_label(job),
                            "problem": kind, "detail": detail,
                            "scenarios": sorted({x.scenario for x in launches}),
                            "autotuned": launches[0].config is not None})
        return out

    def summaries(self) -> list[KernelSummary]:
        table: dict[tuple[str, int], KernelSummary] = {}
        for job in self.jobs():
            r = self.results[job]
            s = table.setdefault((job.name, job.arch), KernelSummary(job.name, job.arch))
            s.jobs += 1
            s.configs.add(config_label(job))
            s.compile_seconds += r.cpu_seconds or r.seconds
            s.failing += bool(problems(job, r))
            if r.error:
                continue
            s.max_registers = max(s.max_registers, r.registers)
            if r.spills:
                if is_16bit(job):
                    s.spilling_16bit += 1
                else:
                    s.spilling_fp32 += 1
            s.max_spill = max(s.max_spill, r.spills)
            s.max_shared = max(s.max_shared, r.shared)
            if r.dots:
                s.dot_jobs += 1
                if r.tensor_cores == "wgmma":
                    s.wgmma += 1
                elif r.tensor_cores == "mma":
                    s.mma += 1
                else:
                    s.fp32_fma_dots += 1
        return sorted(table.values(), key=lambda s: (s.kernel, s.arch))

    def job_rows(self) -> list[dict]:
        """One row per compile job: its config, figures and problems."""
        rows = []
        for job, launches in self.jobs().items():
            r = self.results[job]
            rows.append({
                "kernel": job.name, "arch": job.arch, "config": config_label(job),
                "16-bit": is_16bit(job), "registers": r.registers, "spill bytes": r.spills,
                "shared": r.shared, "tensor cores": r.tensor_cores,
                "dots": [" x ".join(d[:2]) + f" ({d[2]})" for d in r.dots],
                "error": r.error, "problems": [k for k, _ in problems(job, r)],
                "scenarios": sorted({x.scenario for x in launches}),
            })
        return sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["config"]))

    def to_json(self) -> str:
        return json.dumps({
            "tier": self.tier,
            "launches": len(self.launches),
            "summary": [s.row() for s in self.summaries()],
            "jobs": self.job_rows(),
            "failures": self.failures(),
            "retune": self.retune,
        }, indent=1)


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def failure_digest(failures: list[dict]) -> list[dict]:
    """Failures grouped by kernel, arch and kind of problem, with the configs involved."""
    groups: dict[tuple, dict] = {}
    for f in failures:
        g = groups.setdefault((f["kernel"], f["arch"], f["problem"]), {
            "kernel": f["kernel"], "arch": f"sm_{f['arch']}", "problem": f["problem"],
            "jobs": 0, "configs": set()})
        g["jobs"] += 1
        g["configs"].add(f["config"])
    return [{**g, "configs": "; ".join(sorted(g["configs"]))} for g in groups.values()]
