"""Options: every key a user may pass as `torch.compile(..., options={...})`, validated.

Unknown keys and bad values (a wrong type included: `group_size=128.0`, `passes=5`) raise a
ValueError that names the key and says what is valid. torch.compile hands the options to the
backend only when it compiles, at the compiled model's first call, and Dynamo wraps what the
backend raises: the error then reaches the caller as `torch._dynamo.exc.BackendCompilerFailed`
whose message starts "backend='attnopt' raised: ValueError: attnopt: option ...". Check options
up front with `attnopt.Options.parse(options)`, which raises the ValueError itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

KERNELS = ("auto", "triton", "reference")
INNER = ("inductor", "eager")
QUANTIZE = (None, "w4a16")
GROUP_SIZES = (32, 64, 128)  # backends/int4.py's; the kernels' K tiles divide them

DOCS = {
    "quantize": "None | 'w4a16': replace eligible linear layers (and MoE experts) by "
    "int4-weight GEMMs",
    "group_size": f"one of {GROUP_SIZES}: quantization group along K",
    "passes": "list of pass names to run (default: all that apply)",
    "skip": "module-name globs left unquantized (default: ['lm_head'])",
    "inner": f"one of {INNER}: what compiles the rewritten graph",
    "kernels": f"one of {KERNELS}: which implementation attnopt ops use",
    "report_dir": "directory that receives an HTML and a JSON report per graph "
    "(default: $ATTNOPT_REPORT_DIR)",
    "verify": "bool: run the original and the rewritten graph once and compare",
    "strict": "bool: re-raise pass failures instead of rolling the pass back",
}


@dataclass(frozen=True)
class Options:
    quantize: str | None = None
    group_size: int = 128
    passes: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ("lm_head",)
    inner: str = "inductor"
    kernels: str = "auto"
    report_dir: str | None = None
    verify: bool = False
    strict: bool = False

    @classmethod
    def parse(cls, options: Mapping[str, Any] | Options | None) -> Options:
        if isinstance(options, Options):
            return options
        options = dict(options or {})
        valid = [f.name for f in fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(
                    f"attnopt: unknown option {key!r}. Valid options are: "
                    + "; ".join(f"{k} ({DOCS[k]})" for k in valid)
                )
        options.setdefault("report_dir", os.environ.get("ATTNOPT_REPORT_DIR") or None)
        return cls(**options)

    def __post_init__(self) -> None:
        from attnopt.passes import PASS_NAMES

        for key in ("passes", "skip"):  # frozen: normalised through object.__setattr__
            object.__setattr__(self, key, _names(key, getattr(self, key),
                                                 none_ok=key == "passes"))

        _one_of("quantize", self.quantize, QUANTIZE)
        if type(self.group_size) is not int:
            raise ValueError(f"attnopt: option 'group_size' must be an int, one of "
                             f"{', '.join(map(str, GROUP_SIZES))}; got {self.group_size!r} "
                             f"({type(self.group_size).__name__})")
        _one_of("group_size", self.group_size, GROUP_SIZES)
        _one_of("inner", self.inner, INNER)
        _one_of("kernels", self.kernels, KERNELS)
        for key in ("verify", "strict"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"attnopt: option {key!r} must be True or False, "
                                 f"got {getattr(self, key)!r}")
        for name in self.passes or ():
            if name not in PASS_NAMES:
                raise ValueError(f"attnopt: option 'passes' names unknown pass {name!r}; "
                                 f"valid passes are {list(PASS_NAMES)}")
        if self.report_dir is not None and not isinstance(self.report_dir, (str, os.PathLike)):
            raise ValueError(
                f"attnopt: option 'report_dir' must be a path, got {self.report_dir!r}")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _names(key: str, value: Any, *, none_ok: bool) -> tuple[str, ...] | None:
    """A list of names (one name alone is a list of one) as a tuple, or a ValueError."""
    if value is None and none_ok:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    what = {"passes": "pass names (default None: every pass)",
            "skip": "module-name globs (use [] to quantize every layer)"}[key]
    raise ValueError(f"attnopt: option {key!r} must be a list of {what}; got {value!r}")


def _one_of(key: str, value: Any, valid: tuple) -> None:
    if value not in valid or isinstance(value, bool) or (
            value is not None and type(value) is not type(next(v for v in valid if v))):
        raise ValueError(f"attnopt: option {key!r} got {value!r}; valid values are "
                         f"{', '.join(map(repr, valid))}")
