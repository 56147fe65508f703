"""attnopt::attention against what a user would otherwise run, as ratios.

On a GPU (the Triton kernels):
  - prefill: TFLOP/s of attnopt vs torch SDPA (each backend that accepts the shape) and vs the
    Inductor-compiled written-out form, B·S = 16k tokens, head dim 64/128, causal and not;
  - decode: q_len 1, context 1k-64k, GQA 8:1, GB/s of K/V read vs the measured copy bandwidth;
  - the variants (softcap, sinks, a 4k window; prefill at 4k and 32k, decode at 32k) vs the
    eager form compiled by Inductor and vs FlexAttention (`benchmarks/attention_variants.py`).
On CPU (no Triton): a small Llama forward, eager vs default torch.compile vs attnopt, and the
variants at small sizes vs the eager form, eager and compiled by Inductor.

    python -m benchmarks.attention [--quick] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnopt  # noqa: F401  (registers the ops)
from attnopt.models.llama import LlamaConfig, TinyLlama
from benchmarks import attention_variants as variants
from benchmarks.common import median_ms, write_table


def written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), -1e9)
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def prefill_rows(quick: bool) -> list[dict]:
    inductor = torch.compile(written_out)
    rows = []
    lengths = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    for head_dim in (64, 128):
        for causal in (False, True):
            for s in lengths:
                b, h = max(1, 16384 // s), 2048 // head_dim
                q, k, v = (torch.randn(b, h, s, head_dim, device="cuda", dtype=torch.float16)
                           for _ in range(3))
                flops = 4 * b * h * s * s * head_dim / (2 if causal else 1)
                t = {"attnopt": median_ms(torch.ops.attnopt.attention, q, k, v, None, causal,
                                          head_dim**-0.5)}
                for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                SDPBackend.CUDNN_ATTENTION):
                    try:
                        with sdpa_kernel(backend):
                            t[f"sdpa {backend.name.lower()}"] = median_ms(
                                F.scaled_dot_product_attention, q, k, v, is_causal=causal)
                    except RuntimeError:  # this backend does not take this shape or device
                        continue
                if s <= 4096:  # the written-out form materialises S x S scores
                    t["inductor written-out"] = median_ms(inductor, q, k, v, causal)
                best_peer = min(v for name, v in t.items() if name != "attnopt")
                rows.append({
                    "D": head_dim, "causal": causal, "B": b, "S": s,
                    **{f"{name} TFLOP/s": flops / (ms * 1e9) for name, ms in t.items()},
                    "vs best peer": best_peer / t["attnopt"],
                })
                print(rows[-1])
    return rows


def decode_rows(quick: bool) -> list[dict]:
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    copy_gbs = 2 * buf.numel() / (median_ms(buf.clone) * 1e6)
    rows = []
    for ctx in ([1024, 16384] if quick else [1024, 4096, 16384, 65536]):
        b, hq, hkv, d = 8, 32, 4, 128
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(b, hkv, ctx, d, device="cuda", dtype=torch.float16) for _ in range(2))
        kv_bytes = 2 * k.numel() * k.element_size()
        ms = median_ms(torch.ops.attnopt.attention, q, k, v, None, False, d**-0.5)
        sdpa = median_ms(F.scaled_dot_product_attention, q, k, v, enable_gqa=True)
        rows.append({"context": ctx, "attnopt ms": ms, "sdpa ms": sdpa, "vs sdpa": sdpa / ms,
                     "KV GB/s": kv_bytes / (ms * 1e6), "of copy bandwidth": kv_bytes / (
                         ms * 1e6) / copy_gbs})
        print(rows[-1])
    return rows


def cpu_rows(quick: bool) -> list[dict]:
    rows = []
    for seq in ([128, 512] if quick else [128, 512, 1024]):
        torch.manual_seed(0)
        model = TinyLlama(LlamaConfig(num_layers=2)).eval()
        ids = torch.randint(0, model.config.vocab_size, (1, seq))
        with torch.no_grad():
            eager = median_ms(model, ids)
            torch._dynamo.reset()
            inductor = median_ms(torch.compile(model), ids)
            torch._dynamo.reset()
            ours = median_ms(torch.compile(model, backend="attnopt"), ids)
        rows.append({"seq": seq, "eager ms": eager, "torch.compile ms": inductor,
                     "attnopt ms": ours, "vs eager": eager / ours,
                     "vs torch.compile": inductor / ours})
        print(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU table")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    if torch.cuda.is_available():
        for name, rows in (("attention-prefill", prefill_rows(args.quick)),
                           ("attention-decode", decode_rows(args.quick)),
                           ("attention-variants", variants.gpu_rows(args.quick))):
            print(write_table(name, rows, list(rows[0]), args.out))
    if args.gpu_only:
        return
    for name, rows in (("attention-llama-cpu", cpu_rows(args.quick)),
                       ("attention-variants-cpu", variants.cpu_rows(args.quick))):
        print(write_table(name, rows, list(rows[0]), args.out))


if __name__ == "__main__":
    main()
