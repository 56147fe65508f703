"""The attention variants — Gemma-2's softcap, GPT-OSS's sinks, a sliding window — as
attnopt::attention against the eager form the models write, compiled by Inductor, and (on a
GPU) FlexAttention compiled, all measured in one run; ratios are peer ms / attnopt ms.

On a GPU: causal prefill at 4k and 32k tokens and decode (one query) over a 32k cache, fp16,
GQA 32:8, head dim 128, the window 4k. The eager form materialises the Lq x Lk scores, so it is
measured where they fit (prefill up to 8k); FlexAttention takes the softcap as a score_mod,
causal and the window as a block mask, and sinks through its log-sum-exp (out · sigmoid(lse -
sink), exact). On CPU: causal prefill over small sizes, fp32.

Every peer's output is checked against attnopt's before it is timed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import attnopt  # noqa: F401  (registers the ops)
from benchmarks.common import median_ms

SOFTCAP = 50.0  # Gemma-2's attention softcap
VARIANTS = ("softcap", "sinks", "window")


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def eager_form(variant: str, window: int) -> Callable:
    """The variant as the models write it (Gemma 2, GPT-OSS, Mistral's window in the mask),
    bottom-right causal, the mask built from arange as transformers builds it."""

    def attend(q, k, v, sinks):
        group = q.shape[1] // k.shape[1]
        k, v = _repeat_kv(k, group), _repeat_kv(v, group)
        s = q @ k.transpose(2, 3) * q.shape[-1] ** -0.5
        lq, lk = s.shape[-2:]
        rel = (torch.arange(lk, device=q.device)[None, :]
               - torch.arange(lq, device=q.device)[:, None] - (lk - lq))
        keep = rel <= 0
        if variant == "window":
            keep = keep & (rel > -window)
        if variant == "softcap":
            s = torch.tanh(s / SOFTCAP) * SOFTCAP
        mask = torch.where(keep, 0.0, torch.finfo(s.dtype).min)
        s = s + mask
        if variant == "sinks":
            column = sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, lq, 1)
            logits = torch.cat([s, column], -1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            p = torch.softmax(logits, -1, dtype=logits.dtype)[..., :-1]
        else:
            p = torch.softmax(s, -1, dtype=torch.float32).to(q.dtype)
        return p @ v

    return attend


def attnopt_form(variant: str, window: int) -> Callable:
    def attend(q, k, v, sinks):
        return torch.ops.attnopt.attention(
            q, k, v, None, True, q.shape[-1] ** -0.5, "auto",
            SOFTCAP if variant == "softcap" else 0.0, None, None,
            window - 1 if variant == "window" else -1, -1, sinks if variant == "sinks" else None)

    return attend


def flex_form(variant: str, window: int, lq: int, lk: int, device: str) -> Callable:
    """FlexAttention compiled, its block mask built once (outside the timing)."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    offset = lk - lq  # bottom-right: query i is at position i + offset

    def mask_mod(b, h, q, kv):
        keep = kv <= q + offset
        if variant == "window":
            keep = keep & (kv > q + offset - window)
        return keep

    def softcap(score, b, h, q, kv):
        return torch.tanh(score / SOFTCAP) * SOFTCAP

    block_mask = create_block_mask(mask_mod, None, None, lq, lk, device=device)
    flex = torch.compile(flex_attention)

    def attend(q, k, v, sinks):
        if variant != "sinks":
            return flex(q, k, v, score_mod=softcap if variant == "softcap" else None,
                        block_mask=block_mask, enable_gqa=True)
        out, aux = flex(q, k, v, block_mask=block_mask, enable_gqa=True,
                        return_aux=AuxRequest(lse=True))
        # Σe^s / (Σe^s + e^sink) = sigmoid(lse - sink): the sink as a denominator term.
        weight = torch.sigmoid(aux.lse - sinks.view(1, -1, 1).float())[..., None]
        return (out.float() * weight).to(q.dtype)

    return attend


def _inputs(b, hq, hkv, lq, lk, d, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, lq, d, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(b, hkv, lk, d, device=device, dtype=dtype, generator=g)
            for _ in range(2))
    sinks = torch.randn(hq, device=device, dtype=dtype, generator=g)
    return q, k, v, sinks


def _timed(peers: dict[str, Callable], args: tuple, tol: float) -> dict[str, float]:
    """Milliseconds of each peer, attnopt first; a peer whose output differs from attnopt's
    beyond `tol` is an error (its number would compare different work)."""
    want = peers["attnopt"](*args)
    times = {}
    for name, fn in peers.items():
        got = fn(*args)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
        times[name] = median_ms(fn, *args)
    return times


def _row(variant: str, shape: dict, times: dict[str, float]) -> dict:
    ours = times["attnopt"]
    row = {"variant": variant, **shape, **{f"{n} ms": t for n, t in times.items()}}
    for name, t in times.items():
        if name != "attnopt":
            row[f"vs {name}"] = t / ours
    return row


def gpu_rows(quick: bool) -> list[dict]:
    rows = []
    window, hq, hkv, d, dtype = 4096, 32, 8, 128, torch.float16
    cases = [("prefill", 4096, 4096), ("prefill", 32768, 32768), ("decode", 1, 32768)]
    if quick:
        cases = cases[:1] + cases[2:]
    for variant in VARIANTS:
        for kind, lq, lk in cases:
            args = _inputs(1, hq, hkv, lq, lk, d, dtype, "cuda")
            peers = {"attnopt": attnopt_form(variant, window),
                     "flex": flex_form(variant, window, lq, lk, "cuda")}
            if lq * lk <= 8192 * 8192:  # the eager form materialises the scores
                peers["inductor eager form"] = torch.compile(eager_form(variant, window))
            times = _timed(peers, args, tol=2e-2)
            rows.append(_row(variant, {"kind": kind, "Lq": lq, "Lk": lk, "window": window},
                             times))
            print(rows[-1])
            torch.cuda.empty_cache()
    return rows


def cpu_rows(quick: bool) -> list[dict]:
    rows = []
    lengths = [256, 1024] if quick else [256, 512, 1024, 2048]
    for variant in VARIANTS:
        for s in lengths:
            window = s // 4
            args = _inputs(1, 8, 2, s, s, 64, torch.float32, "cpu")
            eager = eager_form(variant, window)
            peers = {"attnopt": attnopt_form(variant, window), "eager form": eager,
                     "inductor eager form": torch.compile(eager)}
            times = _timed(peers, args, tol=1e-4)
            rows.append(_row(variant, {"S": s, "window": window if variant == "window"
                                       else "-"}, times))
            print(rows[-1])
    return rows
