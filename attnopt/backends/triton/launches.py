"""Count what one call costs the device: kernel launches, allocations and host syncs.

    with count_launches() as seen:
        w4a16_matmul(x, qweight, scales, zeros, 128)
    seen.total, seen.triton, seen.aten, seen.allocations, seen.syncs

- Triton launches are counted where every launch goes through, `JITFunction.run` (a GPU) or
  `InterpretedFunction.run` (TRITON_INTERPRET=1), and under the compile audit's stand-in GPU
  (`audit.capture`), whose recorder replaces `JITFunction.run`. An autotuner's benchmark runs
  count too: call once before counting to measure the steady state.
- ATen work is seen by a TorchDispatchMode: an op that runs a kernel (a fill, a copy, a GEMM)
  is a launch, a view is free, `empty`/`empty_strided` is an allocation (the caching
  allocator: no launch, no sync), `zeros`/`full` an allocation and a launch, and reading a
  value back (`.item()`, `nonzero`, a data-dependent shape) is a host sync. What the Triton
  interpreter does to run a kernel on CPU is not counted. Ops of the `attnopt` namespace are
  entered, not counted: their body is what launches.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

aten = torch.ops.aten
ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
               aten.new_empty.default, aten.new_empty_strided.default}
# Allocate and fill: one allocation and one launch (a memset).
FILLED = {aten.zeros.default, aten.ones.default, aten.full.default, aten.zeros_like.default,
          aten.ones_like.default, aten.full_like.default}
SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
         aten.masked_select.default, aten.unique_consecutive.default, aten._unique2.default}
_BACKEND_KEYS = {"cpu": torch._C.DispatchKey.CPU, "cuda": torch._C.DispatchKey.CUDA,
                 "meta": torch._C.DispatchKey.Meta}
FREE = {aten.lift_fresh.default, aten.detach.default, aten.alias.default}


@dataclasses.dataclass
class Launches:
    triton: list[str] = dataclasses.field(default_factory=list)  # kernel names, in order
    aten: list[str] = dataclasses.field(default_factory=list)  # ATen ops that run a kernel
    allocations: int = 0
    syncs: list[str] = dataclasses.field(default_factory=list)
    _inside_triton: int = 0

    @property
    def total(self) -> int:
        return len(self.triton) + len(self.aten)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, seen: Launches):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = self.seen
        if func.namespace == "attnopt":
            # Straight to the op's kernel for this device, with this mode still on the stack
            # so that the ops inside are seen (a plain call would pop the mode first).
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            keys = torch._C.DispatchKeySet(_BACKEND_KEYS[device.type])
            with self:
                return func.redispatch(keys, *args, **kwargs)
        if not seen._inside_triton:
            seen.allocations += func in ALLOCATIONS or func in FILLED
            if func in SYNCS:
                seen.syncs.append(func.name())
            elif not (func in ALLOCATIONS or func.is_view or func in FREE):
                seen.aten.append(func.name())
        return func(*args, **kwargs)


def _counting(run, seen: Launches):
    def counted(self, *args, grid, warmup, **kwargs):
        if not warmup:
            seen.triton.append(self.fn.__name__)
        seen._inside_triton += 1
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            seen._inside_triton -= 1

    return counted


@contextlib.contextmanager
def count_launches() -> Iterator[Launches]:
    """Count the launches, allocations and syncs of the code run inside (see the module)."""
    seen = Launches()
    with contextlib.ExitStack() as stack:
        for cls in (JITFunction, InterpretedFunction):
            original = cls.run
            stack.callback(setattr, cls, "run", original)
            cls.run = _counting(original, seen)
        stack.enter_context(_AtenCounter(seen))
        yield seen
