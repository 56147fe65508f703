"""Scratch memory that outlives a call: the split-KV partials of the decode kernels.

A decode step's split phase writes each chunk's partial output and softmax state, and the merge
reads them back, within the same call. Allocating them per call is one more trip through the
caching allocator per layer and step; `workspace(device, numel)` instead hands out one fp32
buffer per device and stream, kept between calls and grown (doubling) when a call needs more, so
calls of a shape seen before allocate nothing and nothing is read back from the device.

Sharing one buffer is safe because everything that uses it is ordered: the kernels of one
stream run one after another (the next call's split phase starts after this call's merge has
read its partials), and another stream gets another buffer. During CUDA-graph capture the
buffer is allocated fresh from the graph's pool and not kept: the graph owns that memory for
its replays, and a cached buffer that a later, larger call replaced (and freed) must never be
one a captured graph still writes to.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnopt.backends.triton import tuning

_buffers: dict[tuple, Tensor] = {}


def workspace(device: torch.device, numel: int) -> Tensor:
    """At least `numel` fp32 elements of scratch on `device` (contents undefined), reused by the
    next call on this device and stream."""
    if tuning.capturing():
        return torch.empty(numel, dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    buf = _buffers.get((device, stream))
    if buf is None or buf.numel() < numel:
        size = max(numel, 2 * (0 if buf is None else buf.numel()))
        buf = _buffers[(device, stream)] = torch.empty(size, dtype=torch.float32, device=device)
    return buf


def carve(buf: Tensor, *shapes: tuple[int, ...]) -> list[Tensor]:
    """Consecutive views of `buf`, one per shape (no copy, no allocation)."""
    views, start = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(buf[start:start + n].view(shape))
        start += n
    return views


def release() -> None:
    """Drop every kept buffer (the caching allocator takes the memory back)."""
    _buffers.clear()
