"""Options: every key a user may pass as `torch.compile(..., options={...})`, validated.

Unknown keys and bad values raise a ValueError that names the key and lists what is valid.
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
        for key in ("passes", "skip"):
            if isinstance(options.get(key), str):
                options[key] = [options[key]]
            if options.get(key) is not None:
                options[key] = tuple(options[key])
        parsed = cls(**options)
        parsed._validate()
        return parsed

    def _validate(self) -> None:
        from attnopt.passes import PASS_NAMES

        _one_of("quantize", self.quantize, QUANTIZE)
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
        if not all(isinstance(g, str) for g in self.skip):
            raise ValueError(f"attnopt: option 'skip' must be a list of globs, got {self.skip!r}")
        if self.report_dir is not None and not isinstance(self.report_dir, (str, os.PathLike)):
            raise ValueError(
                f"attnopt: option 'report_dir' must be a path, got {self.report_dir!r}")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _one_of(key: str, value: Any, valid: tuple) -> None:
    if value not in valid or isinstance(value, bool):
        raise ValueError(f"attnopt: option {key!r} got {value!r}; valid values are "
                         f"{', '.join(map(repr, valid))}")
