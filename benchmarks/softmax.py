"""attnopt::softmax vs torch.softmax vs the Inductor-compiled eager form, as ratios.

The workload is attention-score shaped: softmax(scores * scale + mask) over [B, H, S, S]. On a
GPU the attnopt op runs its Triton kernel; on CPU its CPU path (and, through the backend, the
same math handed to Inductor).

    python benchmarks/softmax.py [--quick] [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import attnopt  # noqa: F401  (registers the ops)
from benchmarks.common import median_ms, write_table


def eager_form(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax((scores * scale + mask).float(), -1).to(scores.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtypes = [torch.float16, torch.bfloat16] if cuda else [torch.float32, torch.bfloat16]
    shapes = [(1, 8, 256, 256), (2, 16, 512, 512)]
    if not args.quick:
        shapes.append((1, 32, 1024, 1024))
        if cuda:
            shapes += [(1, 32, 4096, 4096), (4, 32, 2048, 2048)]

    inductor = torch.compile(eager_form)
    via_backend = torch.compile(eager_form, backend="attnopt")

    def variants(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> dict[str, float]:
        return {
            "torch.softmax": median_ms(torch.softmax, scores, -1),
            "eager form": median_ms(eager_form, scores, mask, scale),
            "inductor": median_ms(inductor, scores, mask, scale),
            "attnopt op": median_ms(torch.ops.attnopt.softmax, scores, -1, scale, mask, None,
                                    float("-inf")),
            "attnopt backend": median_ms(via_backend, scores, mask, scale),
        }

    rows = []
    for dtype in dtypes:
        for shape in shapes:
            scores = torch.randn(shape, device=device, dtype=dtype)
            mask = torch.zeros(shape[-2:], device=device, dtype=dtype)
            mask.masked_fill_(torch.ones_like(mask, dtype=torch.bool).triu(1), float("-inf"))
            t = variants(scores, mask, shape[-1] ** -0.5)
            best_attnopt = min(t["attnopt op"], t["attnopt backend"])
            gbytes = 2 * scores.numel() * scores.element_size() / 1e9  # read scores, write probs
            rows.append({
                "dtype": str(dtype).removeprefix("torch."), "shape": "x".join(map(str, shape)),
                **{f"{k} ms": v for k, v in t.items()},
                "vs torch.softmax": t["torch.softmax"] / best_attnopt,
                "vs eager form": t["eager form"] / best_attnopt,
                "vs inductor": t["inductor"] / best_attnopt,
                "attnopt GB/s": gbytes / (best_attnopt / 1e3),
            })
            print(rows[-1])
    columns = list(rows[0])
    print(write_table("softmax", rows, columns, args.out))


if __name__ == "__main__":
    main()
