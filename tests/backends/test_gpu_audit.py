"""The GPU compile audit (`attnopt.backends.triton.audit`) as a test: every Triton kernel the op
wrappers launch, at model shapes, with every config its autotuner can keep, compiled for A100
(sm_80) and H100 (sm_90) on this CPU-only machine with the real toolchain (ptxas included).

Per kernel × arch, a job fails on a compile error, shared memory over the arch's limit,
registers × threads over 64K, spills in a 16-bit job, or a 16-bit tl.dot without tensor-core
instructions (`audit.report`). The standard tier runs here (about 250 compiles; results are
cached in ~/.cache/attnopt/audit, so a second run takes seconds); ATTNOPT_AUDIT_FULL=1 runs
every dtype, flag and shape (thousands of compiles). The audit's table is printed (pytest -s,
or the log of a failure) and kept in benchmarks/RESULTS.md.

Every kernel passes on both archs, with no known failure left: a finding fails its test, and
is fixed in the kernel or its config pruner (`attention.prune_prefill`, `moe.keep_configs`),
never by marking it expected.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from attnopt.backends.triton.audit import capture, compile, report

# Triton 3.9's notice that its FP-fusion default will change (the audit uses the JIT's default).
pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
ROOT = Path(__file__).resolve().parents[2]
FULL = bool(os.environ.get("ATTNOPT_AUDIT_FULL"))
ARCHS = (80, 90)
KERNELS = {
    "_attn_fwd", "_decode_split_kernel", "_decode_merge_kernel",
    "_paged_split_kernel", "_paged_merge_kernel", "_latent_split_kernel",
    "_align_kernel", "_gate_up_kernel", "_down_kernel", "_sum_kernel",
    "_splitk_kernel", "_tiled_kernel", "_dequant_kernel", "softmax_kernel",
}


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "attnopt.backends.triton.audit", "--json", str(out), "--quiet",
           "--workers", str(max(2, os.cpu_count() or 1)), *(["--full"] if FULL else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=36000 if FULL else 1800)
    print(proc.stdout)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: some job failed
    return json.loads(out.read_text())


def test_every_kernel_is_audited_on_every_arch(audit):
    seen = {(row["kernel"], row["arch"]) for row in audit["summary"]}
    assert seen == {(k, f"sm_{a}") for k in KERNELS for a in ARCHS}


@pytest.mark.parametrize(("kernel", "arch"), [(k, a) for k in sorted(KERNELS) for a in ARCHS])
def test_kernel_compiles_without_spills_or_overflow(audit, kernel, arch):
    failures = [f for f in audit["failures"] if (f["kernel"], f["arch"]) == (kernel, arch)]
    assert not failures, "\n".join(
        f"{f['problem']}: {f['detail']} [{f['config']}] in {f['scenarios'][0]}"
        for f in failures)


@pytest.mark.parametrize("kernel", sorted(
    {"_attn_fwd", "_splitk_kernel", "_tiled_kernel", "_gate_up_kernel", "_down_kernel"}))
def test_a_second_length_in_a_bucket_does_not_tune_again(audit, kernel):
    rows = [r for r in audit["retune"] if r["kernel"] == kernel]
    assert rows
    assert not any(r["retunes"] for r in rows), rows


def test_the_audit_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "attnopt.backends.triton.audit"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr and "Traceback" not in proc.stderr


# --- the checker itself, on small kernels whose figures are known -------------------------------


@triton.jit
def _dot(a, b, c, BLOCK: tl.constexpr, IEEE: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    x, y = tl.load(a + tile), tl.load(b + tile)
    tl.store(c + tile, tl.dot(x, y, input_precision="ieee" if IEEE else "tf32"))


def _job(arch: int, dtype: str, block: int = 64, ieee: bool = False, warps: int = 4,
         maxnreg: int | None = None) -> capture.Job:
    spec = {
        "signature": [["a", f"*{dtype}"], ["b", f"*{dtype}"], ["c", "*fp32"],
                      ["BLOCK", "constexpr"], ["IEEE", "constexpr"]],
        "constexprs": [[[3], block], [[4], ieee]],
        "attrs": [[[i], [["tt.divisibility", 16]]] for i in range(3)],
        "options": [["num_warps", warps]] + ([["maxnreg", maxnreg]] if maxnreg else []),
    }
    return capture.Job(f"{__name__}:_dot", arch, json.dumps(spec))


# Compiled in a process without the interpreter: once a kernel has run under it, Triton's
# language module is not fit to compile in the same process.
CHECKED = {
    "hopper": (90, "bf16", 64, False, 4, None),
    "ampere": (80, "fp16", 64, False, 4, None),
    "ieee": (90, "fp32", 64, True, 4, None),
    "squeezed": (80, "fp16", 128, False, 4, 32),  # 128x128 fp32 products in 32 registers
}
COMPILE = """
import dataclasses, json
from attnopt.backends.triton.audit import compile
from tests.backends import test_gpu_audit as t
print(json.dumps({name: dataclasses.asdict(compile.compile_job(t._job(*args)))
                  for name, args in t.CHECKED.items()}))
"""


@pytest.fixture(scope="module")
def checked() -> dict[str, compile.Result]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    return {name: compile.Result(**r) for name, r in results.items()}


def test_checker_sees_tensor_cores_and_their_absence(checked):
    hopper, ampere, ieee = checked["hopper"], checked["ampere"], checked["ieee"]
    assert (hopper.error, ampere.error, ieee.error) == (None, None, None)
    assert hopper.tensor_cores == "wgmma" and hopper.dots == [["bf16", "bf16", "tf32"]]
    assert ampere.tensor_cores == "mma" and ampere.dots == [["f16", "f16", "tf32"]]
    assert ieee.tensor_cores == "" and ieee.dots == [["f32", "f32", "ieee"]]
    assert 0 < hopper.registers <= 255 and hopper.shared > 0
    assert report.problems(_job(*CHECKED["hopper"]), hopper) == []
    assert report.problems(_job(*CHECKED["ieee"]), ieee) == []  # fp32: reported, not failed
    no_mma = compile.Result(registers=64, dots=[["bf16", "bf16", "tf32"]])
    assert [k for k, _ in report.problems(_job(90, "bf16"), no_mma)] == ["no tensor cores"]


def test_checker_sees_spills_and_overflows(checked):
    squeezed = checked["squeezed"]
    assert squeezed.error is None and squeezed.spills > 0 and squeezed.registers <= 32
    assert "spills" in [k for k, _ in report.problems(_job(*CHECKED["squeezed"]), squeezed)]
    big = compile.Result(registers=255, shared=200 * 1024, dots=[["f16", "f16", "tf32"]],
                         tensor_cores="mma")
    kinds = [k for k, _ in report.problems(_job(80, "fp16", warps=16), big)]
    assert kinds == ["smem overflow", "register overflow"]  # 200 KB > 163 KB; 255 x 512 > 64K
    assert report.problems(_job(90, "fp16", warps=8), big) == []  # H100: 227 KB; 255 x 256


CAPTURE = """
import json, torch
from attnopt.backends.triton import softmax
from attnopt.backends.triton.audit import capture
with capture.fake_gpu(90) as rec:
    x = torch.empty(3, 17, device="meta", dtype=torch.float16)
    softmax.softmax(x[1:], -1, 1.0, None, None, float("-inf"), False, False, x.dtype)
print(json.dumps([[x.job.spec, x.grid] for x in rec.launches]))
"""


def test_capture_specializes_as_the_jit_does():
    # In a process without the interpreter (here the kernels are interpreted functions).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", CAPTURE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ((spec, grid),) = json.loads(proc.stdout.splitlines()[-1])
    signature, constexprs, attrs, _ = capture.Job("softmax", 90, spec).decode()
    names = list(signature)
    # x[1:] starts 17 fp16 elements (34 bytes) in: not 16-byte aligned; the output is.
    assert attrs[(names.index("x_ptr"),)] == []
    assert attrs[(names.index("out_ptr"),)] == [["tt.divisibility", 16]]
    assert constexprs[(names.index("sx3"),)] == 1  # a unit stride becomes a constant
    assert signature["N"] == "i32" and attrs[(names.index("N"),)] == []  # 17
    assert signature["D1"] == "constexpr" and constexprs[(names.index("D1"),)] == 1
    assert grid == [2]
