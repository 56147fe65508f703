"""What every Triton kernel family needs from the device and from its autotuner, designed for
serving: no device query per call, no tuning run per new sequence length, none while a CUDA graph
is being captured, and tuning results that outlive the process.

- `device_info(device)`: SM count, compute capability and shared memory of a CUDA device, read
  once per device (`torch.cuda.get_device_properties` costs microseconds per call, as much as a
  decode GEMV).
- `bucket(n)`: the power of two at or above n. Autotuning keys hold buckets, never exact
  lengths: the first prompt of each bucket tunes, every later length in it reuses the result.
- `autotune(...)`: `triton.autotune` with a config list per architecture (`arch_of`: "sm80" for
  Ampere and Ada, "sm90" for Hopper and later), each list checked by the compile audit
  (`attnopt.backends.triton.audit`) to compile without spills and within the arch's shared
  memory; an optional `prune(configs, named_args)` on top; results cached on disk
  (`cache_results`, under Triton's cache directory, keyed by the kernel's source, the
  toolchain, the key and the configs), so a restarted server does not tune again; and, inside
  CUDA-graph capture, no benchmarking at all (it would synchronize and run the kernel many
  times into the graph): a key tuned before, in memory or on disk, uses its config, any other
  runs the arch's first config, which is not remembered, so the key is tuned at its first call
  outside capture.
- `tf32_allowed()`: whether PyTorch's matmul precision lets fp32 products run on TF32 tensor
  cores.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
from triton.runtime.autotuner import Autotuner

ARCHS = ("sm80", "sm90")


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    capability: tuple[int, int]
    sms: int
    smem_per_block: int  # bytes one block may use (opt-in maximum)

    @property
    def arch(self) -> str:
        return arch_of(self.capability)


def arch_of(capability: tuple[int, int]) -> str:
    """The config family of a compute capability: Hopper and later take the "sm90" lists (more
    shared memory, wgmma), everything before the "sm80" ones."""
    return "sm90" if capability[0] >= 9 else "sm80"


@functools.cache
def _device_info(index: int) -> DeviceInfo:
    p = torch.cuda.get_device_properties(index)
    return DeviceInfo(p.name, (p.major, p.minor), p.multi_processor_count,
                      p.shared_memory_per_block_optin)


def device_info(device: torch.device) -> DeviceInfo:
    """The properties of CUDA device `device`, queried once per device and process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_info(index)


def clear_device_info() -> None:
    """Forget the devices seen (for the compile audit, which presents one fake GPU after
    another)."""
    _device_info.cache_clear()


def bucket(n: int) -> int:
    """The power of two at or above n (1 for n <= 1): the tuning key of a length."""
    return triton.next_power_of_2(max(1, n))


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tf32_allowed() -> bool:
    """Whether PyTorch lets fp32 matmuls run on TF32 tensor cores
    (`torch.backends.cuda.matmul.fp32_precision`, which also reflects the legacy
    `allow_tf32` and `set_float32_matmul_precision`)."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


class _NotTuned(Exception):
    """Raised inside the disk-cache lookup in place of a benchmark during capture."""


class ServingAutotuner(Autotuner):
    """`Autotuner` with per-arch config lists and no benchmarking during CUDA-graph capture."""

    def __init__(self, fn, arg_names, arch_configs: dict[str, list[triton.Config]], key,
                 prune: Callable | None, do_bench=None):
        union = list(dict.fromkeys(c for a in ARCHS for c in arch_configs[a]))
        super().__init__(fn, arg_names, union, key, None, None, do_bench=do_bench,
                         cache_results=True)
        self.arch_configs = arch_configs
        self.prune = prune
        self._in_capture = False

    def _arch(self) -> str:
        """The config family of the call's device (CPU tensors, which only tests under the
        interpreter pass, take the "sm90" lists)."""
        dev = next((a.device for a in self.nargs.values() if isinstance(a, torch.Tensor)), None)
        return device_info(dev).arch if dev is not None and dev.type != "cpu" else "sm90"

    def prune_configs(self, kwargs: dict) -> list[triton.Config]:
        configs = self.arch_configs[self._arch()]
        if self.prune is not None:
            configs = self.prune(configs, {**self.nargs, **kwargs})
        return configs[:1] if self._in_capture else configs

    def _tuning_key(self, kwargs: dict) -> tuple:
        # As `Autotuner.run` builds it: the key arguments, then the dtype of every tensor.
        args = {k: v for k, v in {**self.nargs, **kwargs}.items() if k in self.arg_names}
        key = [args[k] for k in self.keys if k in args]
        key += [str(a.dtype) for a in args.values() if hasattr(a, "dtype")]
        return tuple(key)

    def run(self, *args, **kwargs):
        if len(self.configs) == 1 or not capturing():
            return super().run(*args, **kwargs)
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        key = self._tuning_key(kwargs)
        if key not in self.cache and self.cache_results:
            # Tuned by an earlier process? Reading a file is safe during capture.
            with contextlib.suppress(_NotTuned):
                self.check_disk_cache(key, self.prune_configs(kwargs), self._refuse)
        if key in self.cache:
            return super().run(*args, **kwargs)
        self._in_capture = True  # one config: Autotuner.run launches it without a benchmark
        try:
            return super().run(*args, **kwargs)
        finally:
            self._in_capture = False
            self.cache.pop(key, None)  # tune this key at its first call outside capture

    @staticmethod
    def _refuse() -> None:
        raise _NotTuned


def autotune(arch_configs: dict[str, Sequence[triton.Config]], key: list[str],
             interpreter_config: triton.Config, prune: Callable | None = None,
             do_bench: Callable | None = None) -> Callable:
    """Decorator: `ServingAutotuner` over `arch_configs` ({"sm80": [...], "sm90": [...]}) on
    CUDA, a single `interpreter_config` under TRITON_INTERPRET (tuning there would take
    minutes and measure nothing). `prune(configs, named_args) -> configs` narrows the arch's
    list for one call (it must return at least one config); `key` names the arguments whose
    values select a tuning result, which should be buckets (`bucket`), never raw lengths."""
    from attnopt.backends.triton import interpreting

    missing = [a for a in ARCHS if not arch_configs.get(a)]
    if missing:
        raise ValueError(f"autotune needs configs for every arch, none for {missing}")

    def decorator(fn):
        if interpreting():
            return triton.autotune(configs=[interpreter_config], key=key)(fn)
        return ServingAutotuner(fn, fn.arg_names, {a: list(arch_configs[a]) for a in ARCHS},
                                key, prune, do_bench)

    return decorator
