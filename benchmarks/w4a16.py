"""attnopt::w4a16_linear (int4 weight, 16-bit activations) against what a user would otherwise run.

On a GPU (the Triton kernels): the linear layers of Llama-3-8B (N x K: q/o 4096x4096, k/v
1024x4096, gate/up 14336x4096, down 4096x14336) at M = 1 .. 1024 tokens, bf16 and fp16, groups of
128. Columns: milliseconds of impl="auto" and of each forced path, of F.linear on the dense
weight, of ATen's tinygemm int4 kernel (aten._weight_int4pack_mm, on the same codes) and of
torchao's int4 weight-only linear when torchao is installed; the speedup of "auto" over dense
and over ATen; and the GB/s of "auto" (bytes of packed weight, scales, zeros, x and out over the
time) against the measured copy bandwidth. Times are device times of a CUDA graph replay, so
that Python launch overhead (tens of µs, more than the decode kernels themselves) does not hide
the kernels; "auto eager ms" is the same call without the graph. The "dequant" vs "tiled" and
"splitk" vs "tiled" columns are what `triton/w4a16.py`'s DEQUANT_MIN_M and SPLITK_MAX_M should
be read from.

On CPU: the op's CPU path (impl="auto", bf16: `int4_cpu.linear`) vs bf16 and fp32 F.linear,
and a small Llama's one-token forward (the linear work of a decode step; TinyLlama keeps no KV
cache) in bf16, compiled with attnopt with and without quantize="w4a16", against eager.

    python -m benchmarks.w4a16 [--quick] [--out benchmarks/out]
    TRITON_INTERPRET=1 python -m benchmarks.w4a16 --smoke   # the GPU table's code on tiny shapes
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import attnopt  # noqa: F401  (registers the ops)
from attnopt.backends import int4
from benchmarks.common import median_ms, write_table

# Llama-3-8B, N x K (out x in features).
LAYERS = {
    "q/o": (4096, 4096),
    "k/v": (1024, 4096),
    "gate/up": (14336, 4096),
    "down": (4096, 14336),
}
GROUP = 128
# Forced paths are timed only where they could plausibly win (gemv at 1000 rows is just slow).
PATH_MAX_M = {"gemv": 64, "splitk": 256, "tiled": 1 << 30, "dequant": 1 << 30}
NA = "-"


def why(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def device_ms(fn: Callable[..., object], *args: object) -> float:
    """Milliseconds per call of fn(*args) replayed from a CUDA graph (device time, no launch
    overhead); plain `median_ms` off CUDA or where the call cannot be captured."""
    if not torch.cuda.is_available():
        return median_ms(fn, *args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and autotuning) outside the capture
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn(*args)
    except RuntimeError as err:
        print(f"  (not capturable, timed eagerly: {why(err)})")
        return median_ms(fn, *args)
    return median_ms(graph.replay)


def copy_gbs(device: str) -> float:
    buf = torch.empty(1 << 30 if device == "cuda" else 1 << 26, dtype=torch.uint8, device=device)
    return 2 * buf.numel() / (median_ms(lambda: torch.empty_like(buf).copy_(buf)) * 1e6)


def aten_int4(p: int4.PackedInt4) -> Callable | None:
    """x -> ATen's tinygemm int4 GEMM on p's codes, or None where this torch lacks it.

    `_convert_weight_to_int4pack` (CUDA) takes [N, K/2] uint8 with the even k in the *high*
    nibble (the reverse of ours), and dequantizes (q - 8) · scale + zero from a [K/g, N, 2]
    bf16 table: our (q - z) · s is zero = (8 - z) · s."""
    try:
        q = int4.unpack_uint4(p.qweight)
        w = torch.ops.aten._convert_weight_to_int4pack(q[:, 0::2] << 4 | q[:, 1::2], 8)
    except (RuntimeError, AttributeError) as err:
        print(f"  aten int4: {why(err)}")
        return None
    s = p.scales.float()
    table = torch.stack((s, (8 - p.zeros.float()) * s), -1).transpose(0, 1)
    table = table.to(torch.bfloat16).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, w, p.group_size, table)


def torchao_int4(w: torch.Tensor) -> Callable | None:
    """torchao's int4 weight-only linear on the dense weight, or None (not installed, or not
    for this dtype). It quantizes itself, so its codes differ from ours (same format family)."""
    try:
        from torchao.quantization import quantize_
        try:
            from torchao.quantization import Int4WeightOnlyConfig
            config = Int4WeightOnlyConfig(group_size=GROUP)
        except ImportError:  # older torchao
            from torchao.quantization import int4_weight_only
            config = int4_weight_only(group_size=GROUP)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        lin.weight.data.copy_(w)
        quantize_(lin, config)
        return lin
    except Exception as err:  # torchao's errors vary across versions; a missing column is fine
        print(f"  torchao: {why(err)}")
        return None


def matches(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """A baseline run on the same codes must agree with ours before its time means anything."""
    err = (got.float() - expected.float()).norm() / expected.float().norm()
    return bool(err < 2e-2)


def _op(x, weights, impl):
    return torch.ops.attnopt.w4a16_linear(x, *weights, None, GROUP, impl)


def _forced(x, weights, path):
    from attnopt.backends.triton import w4a16 as kernel

    return kernel.w4a16_matmul(x, *weights, GROUP, path=path)


def gpu_rows(layers: dict, ms_list: list[int], dtypes: list, device: str) -> list[dict]:
    from attnopt.backends.triton import w4a16 as kernel

    impl = "auto" if device == "cuda" else "triton"  # off CUDA: --smoke, under the interpreter
    bandwidth = copy_gbs(device)
    print(f"copy bandwidth {bandwidth:.0f} GB/s")
    rows = []
    for name, (n, k) in layers.items():
        for dtype in dtypes:
            torch.manual_seed(0)
            w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
            p = int4.quantize_rtn(w, GROUP)
            weights = (p.qweight, p.scales, p.zeros)
            baselines = {"aten int4": aten_int4(p), "torchao": torchao_int4(w)}
            for m in ms_list:
                x = torch.randn(m, k, device=device, dtype=dtype)
                ours = _op(x, weights, impl)
                t = {"auto": device_ms(_op, x, weights, impl)}
                for path in kernel.PATHS:
                    ok = m <= PATH_MAX_M[path]
                    t[path] = device_ms(_forced, x, weights, path) if ok else NA
                t["dense"] = device_ms(F.linear, x, w)
                for label, fn in baselines.items():
                    t[label] = NA
                    try:
                        # torchao quantizes by itself: its output is not ours to compare.
                        if fn is not None and (label == "torchao" or matches(fn(x), ours)):
                            t[label] = device_ms(fn, x)
                        elif fn is not None:
                            print(f"  {label} disagrees with the reference: not timed")
                    except Exception as err:  # e.g. tinygemm and torchao take bf16 only
                        print(f"  {label}: {why(err)}")
                moved = p.nbytes() + (x.numel() + ours.numel()) * x.element_size()
                gbs = moved / (t["auto"] * 1e6)
                rows.append({
                    "layer": name, "N": n, "K": k, "dtype": str(dtype).removeprefix("torch."),
                    "M": m, "path": kernel.choose_path(m, x.device, x.dtype),
                    **{f"{label} ms": v for label, v in t.items()},
                    "auto eager ms": median_ms(_op, x, weights, impl),
                    "vs dense": t["dense"] / t["auto"],
                    "vs aten int4": t["aten int4"] / t["auto"] if t["aten int4"] != NA else NA,
                    "GB/s": gbs, "of copy bw": gbs / bandwidth,
                })
                print(rows[-1])
    return rows


def cpu_rows(layers: dict, ms_list: list[int]) -> list[dict]:
    rows = []
    for name, (n, k) in layers.items():
        torch.manual_seed(0)
        w = torch.randn(n, k) / k**0.5
        p = int4.quantize_rtn(w.bfloat16(), GROUP)
        wb = w.bfloat16()
        for m in ms_list:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            ours = median_ms(torch.ops.attnopt.w4a16_linear, xb, p.qweight, p.scales, p.zeros,
                             None, GROUP, "auto")
            bf16, fp32 = median_ms(F.linear, xb, wb), median_ms(F.linear, x, w)
            rows.append({"layer": name, "N": n, "K": k, "M": m, "attnopt int4 ms": ours,
                         "bf16 F.linear ms": bf16, "fp32 F.linear ms": fp32,
                         "vs bf16": bf16 / ours, "vs fp32": fp32 / ours})
            print(rows[-1])
    return rows


def llama_decode_rows(quick: bool) -> list[dict]:
    from attnopt.models.llama import LlamaConfig, TinyLlama

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_layers=2 if quick else 4,
                         num_heads=16, num_kv_heads=4)
    torch.manual_seed(0)
    model = TinyLlama(config).eval().bfloat16()
    ids = torch.randint(0, config.vocab_size, (1, 1))
    rows = []
    with torch.no_grad():
        eager = median_ms(model, ids)
        for quantize in (None, "w4a16"):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="attnopt", options={"quantize": quantize})
            ms = median_ms(compiled, ids)
            rows.append({"model": f"Llama {config.num_layers}x{config.hidden_size} bf16",
                         "variant": f"attnopt quantize={quantize}", "ms": ms,
                         "vs eager": eager / ms})
            print(rows[-1])
    rows.insert(0, {"model": rows[0]["model"], "variant": "eager", "ms": eager, "vs eager": 1.0})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and row counts")
    parser.add_argument("--smoke", action="store_true",
                        help="run the GPU table's code on tiny shapes on CPU (needs "
                             "TRITON_INTERPRET=1); checks the script, measures nothing")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU tables")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            parser.error("--smoke without a GPU needs TRITON_INTERPRET=1 in the environment")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = gpu_rows({"tiny": (48, 256)}, [1, 20, 70], [torch.bfloat16], device)
        print(write_table("w4a16-smoke", rows, list(rows[0]), args.out))
        rows = cpu_rows({"tiny": (64, 256)}, [1, 16])
        print(write_table("w4a16-cpu-smoke", rows, list(rows[0]), args.out))
        return
    if torch.cuda.is_available():
        layers = {k: LAYERS[k] for k in ("q/o", "down")} if args.quick else LAYERS
        ms_list = [1, 16, 256] if args.quick else [1, 4, 16, 64, 256, 1024]
        rows = gpu_rows(layers, ms_list, [torch.bfloat16, torch.float16], "cuda")
        print(write_table("w4a16", rows, list(rows[0]), args.out))
    if args.gpu_only:
        return
    layers = {"q/o": LAYERS["q/o"]} if args.quick else LAYERS
    rows = cpu_rows(layers, [1, 16] if args.quick else [1, 4, 16, 64])
    print(write_table("w4a16-cpu", rows, list(rows[0]), args.out))
    rows = llama_decode_rows(args.quick)
    print(write_table("w4a16-llama-decode-cpu", rows, list(rows[0]), args.out))


if __name__ == "__main__":
    main()
