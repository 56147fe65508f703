"""`backends/triton/tuning.py`: bucketed keys tune once per bucket, CUDA-graph capture never
benchmarks, per-arch config lists, device properties read once. The autotuner runs here under
the interpreter on a small kernel with two configs and a counting benchmark function, so the
tuning decisions are real and the kernel's output is checked each time."""

import pytest
import torch
import triton
import triton.language as tl

from attnopt.backends.triton import tuning


@triton.jit
def _scale_kernel(out, x, n, n_bucket, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + offs, tl.load(x + offs, mask=offs < n) * 3.0, mask=offs < n)


CONFIGS = [triton.Config({"BLOCK": 16}, num_warps=1, num_stages=1),
           triton.Config({"BLOCK": 32}, num_warps=1, num_stages=1)]


class Bench:
    """Stands in for the GPU timer: counts the benchmarks and makes BLOCK 32 the faster."""

    def __init__(self):
        self.runs = 0

    def __call__(self, kernel_call, quantiles):
        self.runs += 1
        kernel_call()
        return [1.0, 1.0, 1.0] if self.runs % 2 == 0 else [2.0, 2.0, 2.0]


@pytest.fixture
def tuned():
    bench = Bench()
    tuner = tuning.ServingAutotuner(_scale_kernel, _scale_kernel.arg_names,
                                    {"sm80": CONFIGS, "sm90": CONFIGS}, key=["n_bucket"],
                                    prune=None, do_bench=bench)

    def call(n):
        x = torch.randn(n)
        out = torch.empty(n)
        tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](out, x, n, tuning.bucket(n))
        torch.testing.assert_close(out, x * 3)

    return tuner, bench, call


def test_bucket():
    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 100, 128, 129)] == [1, 1, 2, 4, 128, 128, 256]


def test_a_second_length_in_the_bucket_does_not_tune_again(tuned):
    tuner, bench, call = tuned
    call(100)
    assert bench.runs == 2  # both configs, once
    call(120)  # same bucket (128)
    call(128)
    assert bench.runs == 2
    call(300)  # a new bucket tunes
    assert bench.runs == 4
    assert len(tuner.cache) == 2


def test_no_benchmark_during_cuda_graph_capture(tuned, monkeypatch):
    tuner, bench, call = tuned
    call(100)
    monkeypatch.setattr(tuning, "capturing", lambda: True)
    call(110)  # tuned bucket: its config, no benchmark
    call(1000)  # new bucket: the first config runs (the output is checked), nothing is tuned
    assert bench.runs == 2
    assert tuner.best_config == CONFIGS[0]
    assert (1024, "torch.float32", "torch.float32") not in tuner.cache  # tuned later
    monkeypatch.setattr(tuning, "capturing", lambda: False)
    call(1000)
    assert bench.runs == 4
    assert (1024, "torch.float32", "torch.float32") in tuner.cache


def test_configs_per_arch_and_prune(monkeypatch):
    sm80 = [CONFIGS[0]]
    seen = []

    def prune(configs, named_args):
        seen.append((list(configs), named_args["n"]))
        return configs

    tuner = tuning.ServingAutotuner(_scale_kernel, _scale_kernel.arg_names,
                                    {"sm80": sm80, "sm90": CONFIGS}, key=["n_bucket"],
                                    prune=prune)
    for capability, expected in (((8, 0), sm80), ((8, 9), sm80), ((9, 0), CONFIGS)):
        monkeypatch.setattr(tuner, "_arch", lambda c=capability: tuning.arch_of(c))
        tuner.nargs = {"n": 7}
        assert tuner.prune_configs({}) == expected
        assert seen[-1] == (expected, 7)
    with pytest.raises(ValueError, match="sm90"):
        tuning.autotune({"sm80": CONFIGS}, key=["n_bucket"],
                        interpreter_config=CONFIGS[0])(_scale_kernel)


def test_device_properties_are_read_once(monkeypatch):
    calls = []

    class Props:
        name, major, minor = "fake", 9, 0
        multi_processor_count, shared_memory_per_block_optin = 132, 232448

    def props(index):
        calls.append(index)
        return Props

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    tuning.clear_device_info()
    try:
        for _ in range(3):
            info = tuning.device_info(torch.device("cuda", 0))
        assert calls == [0]
        assert (info.sms, info.arch, info.smem_per_block) == (132, "sm90", 232448)
    finally:
        tuning.clear_device_info()


def test_tf32_follows_torch(monkeypatch):
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert not tuning.tf32_allowed()
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert tuning.tf32_allowed()
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
