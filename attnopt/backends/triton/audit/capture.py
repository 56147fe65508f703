"""Record the Triton launches of the op wrappers without a GPU.

Inside `fake_gpu(arch)` the wrappers run on meta tensors (shapes, dtypes, strides and storage
offsets, no memory) against a stand-in for an A100 (sm_80) or H100 (sm_90): the device queries
answer with that GPU's SM count, capability and shared memory, and a kernel launch is recorded
instead of run. What a launch records is what the JIT would compile:

- the specialization, computed by Triton's own binder for the CUDA backend: a pointer whose
  address is a multiple of 16 gets `tt.divisibility = 16`, so does an int that is a multiple
  of 16, and an int equal to 1 becomes a constant. A meta tensor's `data_ptr()` is its storage
  offset in bytes, which is exactly the alignment the CUDA caching allocator gives a real one
  (every allocation starts 512-byte aligned, a view adds its offset);
- for an autotuned kernel, one launch per config its pruner keeps for this call (those are the
  configs tuning can pick, so all of them must compile well), with the autotuner's key.

Nothing is run, so outputs hold no values: the wrappers must not read device results back on
the host (none does: that would be a sync per call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from types import SimpleNamespace
from unittest import mock

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from attnopt.backends.triton import tuning

# What the wrappers see of each GPU: name, capability, SMs, opt-in shared memory per block.
GPUS = {
    80: ("NVIDIA A100-SXM4-80GB (stand-in)", (8, 0), 108, 166912),
    90: ("NVIDIA H100 80GB HBM3 (stand-in)", (9, 0), 132, 232448),
}


def _tuples(value):
    """`value` with every list, at any depth, made a tuple."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class Job:
    """One compilation: the kernel (`module:qualname`), the target arch and the canonical
    JSON of signature, constexprs, attributes and options (see `decode`)."""

    kernel: str
    arch: int
    spec: str

    def decode(self) -> tuple[dict, dict, dict, dict]:
        """signature, constexprs, attrs, options in the forms `ASTSource` and `compile` take."""
        s = json.loads(self.spec)
        # JSON turns the types of a tuple argument, ("*bf16", "*bf16"), into a list; Triton
        # reads a tuple type only as a tuple.
        signature = {name: _tuples(t) for name, t in s["signature"]}
        return (signature, {tuple(k): v for k, v in s["constexprs"]},
                {tuple(k): v for k, v in s["attrs"]}, dict(s["options"]))

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]


@dataclasses.dataclass(frozen=True)
class Launch:
    scenario: str
    job: Job
    grid: tuple[int, ...]
    config: str | None  # the autotuner config of this launch (None: a fixed launch)
    tuning_key: str | None  # the autotuner's key for this call


@dataclasses.dataclass
class _Recorder:
    arch: int
    scenario: str = ""
    launches: list[Launch] = dataclasses.field(default_factory=list)
    config: str | None = None
    tuning_key: str | None = None


_recorder: _Recorder | None = None
_binders: dict = {}


def _binder(fn: JITFunction, arch: int):
    key = (fn, arch)
    if key not in _binders:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _binders[key] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    return _binders[key]


def _canonical(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_canonical(v) for v in value]
    return str(value)  # a tl.dtype or similar: its name is what compile needs


def _record_launch(self: JITFunction, *args, grid, warmup, **kwargs):
    """Stands in for `JITFunction.run`: bind and specialize as the JIT does, record, return."""
    rec = _recorder
    backend, binder = _binder(self, rec.arch)
    bound, specialization, _ = binder(*args, **kwargs)
    _, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, {})
    names = {p.name for p in self.params}
    options = {k: v for k, v in kwargs.items() if k not in names}
    spec = json.dumps({
        "signature": list(signature.items()),  # in parameter order
        "constexprs": sorted([list(k), _canonical(v)] for k, v in constexprs.items()),
        "attrs": sorted([list(k), v] for k, v in attrs.items()),
        "options": sorted(options.items()),
    }, sort_keys=True)
    job = Job(f"{self.module}:{self.fn.__qualname__}", rec.arch, spec)
    size = grid(bound) if callable(grid) else grid
    rec.launches.append(Launch(rec.scenario, job, tuple(int(g) for g in size), rec.config,
                               rec.tuning_key))


def _record_tuning(self: Autotuner, *args, **kwargs):
    """Stands in for `Autotuner.run`: one recorded launch per config the pruner keeps."""
    rec = _recorder
    self.nargs = dict(zip(self.arg_names, args, strict=False))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    named = {k: v for k, v in {**self.nargs, **kwargs}.items() if k in self.arg_names}
    key = [named[k] for k in self.keys if k in named]
    key += [str(a.dtype) for a in named.values() if hasattr(a, "dtype")]
    rec.tuning_key = repr(tuple(key))
    try:
        for config in configs:
            rec.config = str(config)
            self.fn.run(*args, **kwargs, **config.all_kwargs())
    finally:
        rec.config = rec.tuning_key = None
        self.nargs = None


@contextlib.contextmanager
def fake_gpu(arch: int) -> Iterator[_Recorder]:
    """Present GPU `arch` (80 or 90) to the wrappers and record their launches."""
    global _recorder
    name, (major, minor), sms, smem = GPUS[arch]
    props = SimpleNamespace(name=name, major=major, minor=minor, multi_processor_count=sms,
                            shared_memory_per_block_optin=smem, total_memory=80 << 30)
    patches = [
        mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: props),
        mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: (major, minor)),
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(JITFunction, "run", _record_launch),
        mock.patch.object(Autotuner, "run", _record_tuning),
    ]
    tuning.clear_device_info()
    _recorder = _Recorder(arch)
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            yield _recorder
    finally:
        _recorder = None
        tuning.clear_device_info()


@contextlib.contextmanager
def scenario(name: str) -> Iterator[None]:
    """Label the launches recorded inside with `name`."""
    _recorder.scenario = name
    try:
        yield
    finally:
        _recorder.scenario = ""
