"""attnopt::moe (the routed experts of a sparse MoE block) against transformers' experts
implementations.

On a GPU (the fused Triton kernel): the expert layers of Mixtral-8x7B (E=8, top-2, H=4096,
I=14336), DeepSeek-V2-Lite (E=64, top-6, H=2048, I=1408), GPT-OSS-20B (E=32, top-4,
H=I=2880, with its biases, interleaved gate/up and clamped SwiGLU, the weights read through
transposed views of its [E, H, 2I] storage) and Qwen3-30B-A3B (E=128, top-8, H=2048, I=768),
bf16, at 1 .. 4096 tokens routed by a random softmax router (top-k, renormalised).
Columns: milliseconds of our op (impl="auto") and of transformers 5's `MixtralExperts` (GPT-OSS:
`GptOssExperts`, the same weights) with `experts_implementation` "eager" (a loop over the
experts hit), "grouped_mm"
(`torch._grouped_mm` over expert-sorted rows) and "batched_mm" (one bmm over per-pair copies of
the expert weights, timed only where those copies fit in BATCHED_MM_MAX_BYTES); the speedup of
ours over each; and the GB/s of ours over the bytes of the experts actually chosen (plus x and
out) against the measured copy bandwidth: at 1 token the layer is a pure weight read, so that
ratio is how close the kernel gets to the memory roofline. Times are device times of a CUDA
graph replay where the call can be captured (ours, grouped_mm, batched_mm; eager syncs on the
host and is timed as called, against "ours eager ms", our op called without the graph). Every
baseline's output is compared with ours before it is timed.

On CPU: the op's CPU path (`moe_cpu.moe`) vs the same three implementations on small shapes
(the GPT-OSS-20B and Qwen3-30B-A3B layers at a quarter of their widths among them), fp32 and
bf16.

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
from dataclasses import dataclass
from pathlib import Path

import torch

import attnopt  # noqa: F401  (registers the ops)
from attnopt.backends import int4
from attnopt.backends.reference import ExpertForm
from attnopt.passes.quantize import quantize_experts
from benchmarks.common import median_ms, write_table
from benchmarks.w4a16 import copy_gbs, device_ms, why


@dataclass(frozen=True)
class Layer:
    """One MoE layer's shape; `gpt_oss`: GPT-OSS's experts (biases on both projections,
    gate/up interleaved, clamped SwiGLU, weights stored [E, H, 2I] and read by our op as
    transposed views, as the moe pass hands them over)."""

    experts: int
    top_k: int
    hidden: int
    inter: int
    gpt_oss: bool = False


GPU_SHAPES = {
    "Mixtral-8x7B": Layer(8, 2, 4096, 14336),
    "E64 top-6 (DeepSeek-V2-Lite)": Layer(64, 6, 2048, 1408),
    "GPT-OSS-20B": Layer(32, 4, 2880, 2880, gpt_oss=True),
    "Qwen3-30B-A3B": Layer(128, 8, 2048, 768),
}
CPU_SHAPES = {
    "E8 top-2 H1024 I2048": Layer(8, 2, 1024, 2048),
    "E64 top-6 H512 I256": Layer(64, 6, 512, 256),
    # The two models' expert counts and top-k at a quarter of their widths.
    "GPT-OSS-20B /4 (E32 top-4 H720 I720)": Layer(32, 4, 720, 720, gpt_oss=True),
    "Qwen3-30B-A3B /4 (E128 top-8 H512 I192)": Layer(128, 8, 512, 192),
}
GPT_OSS_FORM = ExpertForm("swiglu_oai", interleaved=True)
IMPLS = ("eager", "grouped_mm", "batched_mm")
INT4_GROUP = 128
# batched_mm copies the weights of every (token, expert) pair: 3·I·H elements each.
BATCHED_MM_MAX_BYTES = 8 << 30
NA = "-"


@dataclass
class Weights:
    """A layer's experts as our op takes them ([E, 2I, H], [E, H, I], biases or None) and its
    form."""

    gate_up: torch.Tensor
    down: torch.Tensor
    b_gate_up: torch.Tensor | None
    b_down: torch.Tensor | None
    form: ExpertForm


def experts_module(weights: Weights, top_k: int) -> torch.nn.Module:
    """transformers' experts module holding our weights (no copy): MixtralExperts, or
    GptOssExperts for GPT-OSS's form (its [E, H, 2I] parameters are what our transposed views
    view); its forward dispatches on `config._experts_implementation`, which we switch between
    calls."""
    import transformers as t

    e, two_i, h = weights.gate_up.shape
    if weights.form.activation == "swiglu_oai":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls

        config = t.GptOssConfig(hidden_size=h, intermediate_size=two_i // 2,
                                num_local_experts=e, num_experts_per_tok=top_k,
                                experts_implementation="eager")
        stored = {"gate_up_proj": weights.gate_up.transpose(1, 2),
                  "down_proj": weights.down.transpose(1, 2),
                  "gate_up_proj_bias": weights.b_gate_up, "down_proj_bias": weights.b_down}
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        config = t.MixtralConfig(hidden_size=h, intermediate_size=two_i // 2,
                                 num_local_experts=e, num_experts_per_tok=top_k,
                                 experts_implementation="eager")
        stored = {"gate_up_proj": weights.gate_up, "down_proj": weights.down}
    with torch.device("meta"):
        experts = cls(config)
    for name, tensor in stored.items():
        setattr(experts, name, torch.nn.Parameter(tensor, requires_grad=False))
    return experts.eval()


def routing(t: int, e: int, k: int, device: str, seed: int = 0):
    """Mixtral's router on random logits: softmax in fp32, top-k, renormalised."""
    gen = torch.Generator(device=device).manual_seed(seed)
    probs = torch.randn(t, e, device=device, generator=gen).softmax(-1)
    weights, ids = probs.topk(k, -1)
    return ids, weights / weights.sum(-1, keepdim=True)


def layer(spec: Layer, dtype: torch.dtype, device: str) -> Weights:
    torch.manual_seed(0)
    e, h, i = spec.experts, spec.hidden, spec.inter
    if spec.gpt_oss:  # stored as the model stores them, handed to the op as views
        gate_up = (torch.randn(e, h, 2 * i, device=device) / h**0.5).to(dtype).transpose(1, 2)
        down = (torch.randn(e, i, h, device=device) / i**0.5).to(dtype).transpose(1, 2)
        biases = [(torch.randn(e, n, device=device) / 10).to(dtype) for n in (2 * i, h)]
        return Weights(gate_up, down, *biases, GPT_OSS_FORM)
    gate_up = (torch.randn(e, 2 * i, h, device=device) / h**0.5).to(dtype)
    down = (torch.randn(e, h, i, device=device) / i**0.5).to(dtype)
    return Weights(gate_up, down, None, None, ExpertForm())


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
    h, i = x.shape[1], experts.down_proj.shape[1 if experts.is_transposed else 2]
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


def _op(x, ids, weights, w: Weights, impl):
    f = w.form
    return torch.ops.attnopt.moe(x, ids, weights, w.gate_up, w.down, f.activation, impl,
                                 w.b_gate_up, w.b_down, f.interleaved, f.alpha, f.limit)


def _op_w4a16(x, ids, weights, packed, w: Weights, impl):
    f = w.form
    return torch.ops.attnopt.moe_w4a16(x, ids, weights, *packed, INT4_GROUP, f.activation, impl,
                                       w.b_gate_up, w.b_down, f.interleaved, f.alpha, f.limit)


def int4_layer(w: Weights) -> tuple[list, Weights]:
    """The layer as the quantize pass packs it (qweight, scales, zeros of gate/up, then of
    down) and the float layer those codes decode to."""
    packed, deq = [], []
    for m in (w.gate_up, w.down):
        p = quantize_experts(m, INT4_GROUP, m.dtype)
        packed += [p.qweight, p.scales, p.zeros]
        deq.append(torch.stack([int4.dequantize(p.qweight[e], p.scales[e], p.zeros[e],
                                                INT4_GROUP, p.in_features, m.dtype)
                                for e in range(m.shape[0])]))
    return packed, Weights(*deq, w.b_gate_up, w.b_down, w.form)


def time_int4(x, ids, weights, packed, deq: Weights, impl, timer) -> float | str:
    """ms of moe_w4a16 (NA if it fails or disagrees with our float op on its weights)."""
    try:
        got = _op_w4a16(x, ids, weights, packed, deq, impl)
        if not close(got, _op(x, ids, weights, deq, impl)):
            print("  moe_w4a16 disagrees with attnopt::moe on the dequantized weights")
            return NA
        return timer(_op_w4a16, x, ids, weights, packed, deq, impl)
    except Exception as err:
        print(f"  moe_w4a16: {why(err)}")
        return NA


def gpu_rows(shapes: dict, tokens: list[int], dtype: torch.dtype, device: str) -> list[dict]:
    impl = "auto" if device == "cuda" else "triton"  # off CUDA: --smoke, under the interpreter
    bandwidth = copy_gbs(device)
    print(f"copy bandwidth {bandwidth:.0f} GB/s")
    rows = []
    for name, spec in shapes.items():
        e, k, h, i = spec.experts, spec.top_k, spec.hidden, spec.inter
        w = layer(spec, dtype, device)
        experts = experts_module(w, k)
        packed, deq = int4_layer(w)
        for t in tokens:
            x = torch.randn(t, h, device=device, dtype=dtype)
            ids, weights = routing(t, e, k, device)
            args = (x, ids, weights, w, impl)
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
    for name, spec in shapes.items():
        e, k, h = spec.experts, spec.top_k, spec.hidden
        for dtype in dtypes:
            w = layer(spec, dtype, "cpu")
            experts = experts_module(w, k)
            packed, deq = int4_layer(w)
            for t in tokens:
                x = torch.randn(t, h, dtype=dtype)
                ids, weights = routing(t, e, k, "cpu")
                args = (x, ids, weights, w, "auto")
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
        tiny = {"tiny": Layer(4, 2, 64, 48), "tiny GPT-OSS": Layer(4, 2, 64, 48, gpt_oss=True)}
        rows = gpu_rows(tiny, [1, 5], torch.bfloat16, device)
        print(write_table("moe-smoke", rows, list(rows[0]), args.out))
        rows = cpu_rows(tiny, [1, 8], [torch.float32])
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
