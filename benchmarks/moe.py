"""attnopt::moe (the routed experts of a sparse MoE block) against transformers' experts
implementations.

On a GPU (the fused Triton kernel): the expert layer of Mixtral-8x7B (E=8, top-2, H=4096,
I=14336) and a fine-grained one (DeepSeek-V2-Lite: E=64, top-6, H=2048, I=1408), bf16, at
1 .. 4096 tokens routed by a random softmax router (top-k, renormalised, as Mixtral's).
Columns: milliseconds of our op (impl="auto") and of transformers 5's `MixtralExperts` with
`experts_implementation` "eager" (a loop over the experts hit), "grouped_mm"
(`torch._grouped_mm` over expert-sorted rows) and "batched_mm" (one bmm over per-pair copies of
the expert weights, timed only where those copies fit in BATCHED_MM_MAX_BYTES); the speedup of
ours over each; and the GB/s of ours over the bytes of the experts actually chosen (plus x and
out) against the measured copy bandwidth: at 1 token the layer is a pure weight read, so that
ratio is how close the kernel gets to the memory roofline. Times are device times of a CUDA
graph replay where the call can be captured (ours, grouped_mm, batched_mm; eager syncs on the
host and is timed as called, against "ours eager ms", our op called without the graph). Every
baseline's output is compared with ours before it is timed.

On CPU: the op's CPU path (`moe_cpu.moe`) vs the same three implementations on small shapes,
fp32 and bf16.

Both tables also time `attnopt::moe_w4a16` on the same layer quantized to int4 (RTN, groups of
INT4_GROUP, as `quantize="w4a16"` does it): "w4a16 ms", its speedup over our float op
("w4a16 vs ours") and, on the GPU, its GB/s over the int4 bytes of the chosen experts against
the copy bandwidth. Its output is checked against our float op on the dequantized weights.

    python -m benchmarks.moe [--quick] [--out benchmarks/out]
    TRITON_INTERPRET=1 python -m benchmarks.moe --smoke   # the GPU table's code on tiny shapes
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch

import attnopt  # noqa: F401  (registers the ops)
from attnopt.backends import int4
from attnopt.passes.quantize import quantize_experts
from benchmarks.common import median_ms, write_table
from benchmarks.w4a16 import copy_gbs, device_ms, why

# name: (experts, top-k, hidden H, intermediate I)
GPU_SHAPES = {
    "Mixtral-8x7B": (8, 2, 4096, 14336),
    "E64 top-6 (DeepSeek-V2-Lite)": (64, 6, 2048, 1408),
}
CPU_SHAPES = {
    "E8 top-2 H1024 I2048": (8, 2, 1024, 2048),
    "E64 top-6 H512 I256": (64, 6, 512, 256),
}
IMPLS = ("eager", "grouped_mm", "batched_mm")
INT4_GROUP = 128
# batched_mm copies the weights of every (token, expert) pair: 3·I·H elements each.
BATCHED_MM_MAX_BYTES = 8 << 30
NA = "-"


def experts_module(w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int) -> torch.nn.Module:
    """transformers' MixtralExperts holding our weights (no copy); its forward dispatches on
    `config._experts_implementation`, which we switch between calls."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    e, two_i, h = w_gate_up.shape
    config = MixtralConfig(hidden_size=h, intermediate_size=two_i // 2, num_local_experts=e,
                           num_experts_per_tok=top_k, experts_implementation="eager")
    with torch.device("meta"):
        experts = MixtralExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(w_gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(w_down, requires_grad=False)
    return experts.eval()


def routing(t: int, e: int, k: int, device: str, seed: int = 0):
    """Mixtral's router on random logits: softmax in fp32, top-k, renormalised."""
    gen = torch.Generator(device=device).manual_seed(seed)
    probs = torch.randn(t, e, device=device, generator=gen).softmax(-1)
    weights, ids = probs.topk(k, -1)
    return ids, weights / weights.sum(-1, keepdim=True)


def layer(e: int, h: int, i: int, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    w_gate_up = (torch.randn(e, 2 * i, h, device=device) / h**0.5).to(dtype)
    w_down = (torch.randn(e, h, i, device=device) / i**0.5).to(dtype)
    return w_gate_up, w_down


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
    return bool(err < 2e-2)


def baseline(experts: torch.nn.Module, impl: str) -> Callable:
    def run(x, ids, weights):
        experts.config._experts_implementation = impl
        with torch.no_grad():
            return experts(x, ids, weights)

    return run


def time_baselines(experts, x, ids, weights, ours, timer) -> dict:
    """ms of each transformers implementation (NA where it fails, disagrees or would not fit)."""
    t, k = ids.shape
    h, i = experts.hidden_dim, experts.intermediate_dim
    times = {}
    for impl in IMPLS:
        times[impl] = NA
        if impl == "batched_mm" and t * k * 3 * h * i * x.element_size() > BATCHED_MM_MAX_BYTES:
            continue
        fn = baseline(experts, impl)
        try:
            if not close(fn(x, ids, weights), ours):
                print(f"  {impl} disagrees with attnopt::moe: not timed")
                continue
            # eager reads the routing on the host (nonzero, a loop): no CUDA graph for it
            times[impl] = median_ms(fn, x, ids, weights) if impl == "eager" else \
                timer(fn, x, ids, weights)
        except Exception as err:  # e.g. grouped_mm's stride rules on CPU
            print(f"  {impl}: {why(err)}")
    return times


def ratios(times: dict, ours_ms: float, ours_eager_ms: float) -> dict:
    """Speedups of ours over each; eager (not capturable) against our op called eagerly too."""
    ours = {impl: ours_eager_ms if impl == "eager" else ours_ms for impl in IMPLS}
    return {f"vs {impl}": times[impl] / ours[impl] if times[impl] != NA else NA
            for impl in IMPLS}


def _op(x, ids, weights, w_gate_up, w_down, impl):
    return torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down, "silu", impl)


def _op_w4a16(x, ids, weights, packed, impl):
    return torch.ops.attnopt.moe_w4a16(x, ids, weights, *packed, INT4_GROUP, "silu", impl)


def int4_layer(w_gate_up: torch.Tensor, w_down: torch.Tensor) -> tuple[list, list]:
    """The layer as the quantize pass packs it (qweight, scales, zeros of gate/up, then of
    down) and the float weights those codes decode to."""
    packed, deq = [], []
    for w in (w_gate_up, w_down):
        p = quantize_experts(w, INT4_GROUP, w.dtype)
        packed += [p.qweight, p.scales, p.zeros]
        deq.append(torch.stack([int4.dequantize(p.qweight[e], p.scales[e], p.zeros[e],
                                                INT4_GROUP, p.in_features, w.dtype)
                                for e in range(w.shape[0])]))
    return packed, deq


def time_int4(x, ids, weights, packed, deq, impl, timer) -> float | str:
    """ms of moe_w4a16 (NA if it fails or disagrees with our float op on its weights)."""
    try:
        got = _op_w4a16(x, ids, weights, packed, impl)
        if not close(got, _op(x, ids, weights, *deq, impl)):
            print("  moe_w4a16 disagrees with attnopt::moe on the dequantized weights")
            return NA
        return timer(_op_w4a16, x, ids, weights, packed, impl)
    except Exception as err:
        print(f"  moe_w4a16: {why(err)}")
        return NA


def gpu_rows(shapes: dict, tokens: list[int], dtype: torch.dtype, device: str) -> list[dict]:
    impl = "auto" if device == "cuda" else "triton"  # off CUDA: --smoke, under the interpreter
    bandwidth = copy_gbs(device)
    print(f"copy bandwidth {bandwidth:.0f} GB/s")
    rows = []
    for name, (e, k, h, i) in shapes.items():
        w_gate_up, w_down = layer(e, h, i, dtype, device)
        experts = experts_module(w_gate_up, w_down, k)
        packed, deq = int4_layer(w_gate_up, w_down)
        for t in tokens:
            x = torch.randn(t, h, device=device, dtype=dtype)
            ids, weights = routing(t, e, k, device)
            args = (x, ids, weights, w_gate_up, w_down, impl)
            ours = _op(*args)
            ms = device_ms(_op, *args)
            times = time_baselines(experts, x, ids, weights, ours, device_ms)
            eager_ms = median_ms(_op, *args)
            chosen = ids.unique().numel()
            moved = (chosen * 3 * h * i + 2 * t * h) * x.element_size()
            gbs = moved / (ms * 1e6)
            w4_ms = time_int4(x, ids, weights, packed, deq, impl, device_ms)
            # codes (half a byte each), a scale and a zero per group, x and out
            w4_moved = chosen * 3 * h * i * (0.5 + 2 * x.element_size() / INT4_GROUP) \
                + 2 * t * h * x.element_size()
            w4_gbs = w4_moved / (w4_ms * 1e6) if w4_ms != NA else NA
            rows.append({
                "layer": name, "E": e, "top-k": k, "H": h, "I": i,
                "dtype": str(dtype).removeprefix("torch."), "tokens": t,
                "experts hit": chosen, "ours ms": ms,
                **{f"{impl} ms": v for impl, v in times.items()},
                "ours eager ms": eager_ms,
                **ratios(times, ms, eager_ms),
                "GB/s": gbs, "of copy bw": gbs / bandwidth,
                "w4a16 ms": w4_ms, "w4a16 vs ours": ms / w4_ms if w4_ms != NA else NA,
                "w4a16 GB/s": w4_gbs,
                "w4a16 of copy bw": w4_gbs / bandwidth if w4_ms != NA else NA,
            })
            print(rows[-1])
    return rows


def cpu_rows(shapes: dict, tokens: list[int], dtypes: list) -> list[dict]:
    rows = []
    for name, (e, k, h, i) in shapes.items():
        for dtype in dtypes:
            w_gate_up, w_down = layer(e, h, i, dtype, "cpu")
            experts = experts_module(w_gate_up, w_down, k)
            packed, deq = int4_layer(w_gate_up, w_down)
            for t in tokens:
                x = torch.randn(t, h, dtype=dtype)
                ids, weights = routing(t, e, k, "cpu")
                args = (x, ids, weights, w_gate_up, w_down, "auto")
                ours = _op(*args)
                ms = median_ms(_op, *args)
                times = time_baselines(experts, x, ids, weights, ours, median_ms)
                w4_ms = time_int4(x, ids, weights, packed, deq, "auto", median_ms)
                rows.append({
                    "layer": name, "dtype": str(dtype).removeprefix("torch."), "tokens": t,
                    "attnopt cpu ms": ms, **{f"{impl} ms": v for impl, v in times.items()},
                    **ratios(times, ms, ms),
                    "w4a16 ms": w4_ms, "w4a16 vs ours": ms / w4_ms if w4_ms != NA else NA,
                })
                print(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and token counts")
    parser.add_argument("--smoke", action="store_true",
                        help="run the GPU table's code on tiny shapes on CPU (needs "
                             "TRITON_INTERPRET=1); checks the script, measures nothing")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU table")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            parser.error("--smoke without a GPU needs TRITON_INTERPRET=1 in the environment")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = gpu_rows({"tiny": (4, 2, 64, 48)}, [1, 5], torch.bfloat16, device)
        print(write_table("moe-smoke", rows, list(rows[0]), args.out))
        rows = cpu_rows({"tiny": (4, 2, 64, 48)}, [1, 8], [torch.float32])
        print(write_table("moe-cpu-smoke", rows, list(rows[0]), args.out))
        return
    if torch.cuda.is_available():
        shapes = GPU_SHAPES
        tokens = [1, 16, 256, 4096] if args.quick else [1, 4, 16, 64, 256, 1024, 4096]
        rows = gpu_rows(shapes, tokens, torch.bfloat16, "cuda")
        print(write_table("moe", rows, list(rows[0]), args.out))
    if args.gpu_only:
        return
    tokens = [1, 32] if args.quick else [1, 8, 64, 256]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    shapes = dict(list(CPU_SHAPES.items())[:1]) if args.quick else CPU_SHAPES
    rows = cpu_rows(shapes, tokens, dtypes)
    print(write_table("moe-cpu", rows, list(rows[0]), args.out))


if __name__ == "__main__":
    main()
