"""Compiling a small module with attnopt beside eager: the one harness of the adversarial suite.

Every case ends one of two ways, and the tests say which: rewritten and equal to eager (NaN
where eager has NaN), or left alone with a reason in the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import attnopt
from attnopt.compiler.report import CompileReport


@dataclass
class Run:
    want: Any
    got: Any
    reports: list[CompileReport]

    def count(self, kind: str) -> int:
        return sum(r.counts[kind] for r in self.reports)

    @property
    def rejected(self) -> list[str]:
        return [line for r in self.reports for line in r.rejected]

    def refused(self, reason: str) -> bool:
        """Whether some pass left a candidate alone with `reason` in its explanation."""
        return any(reason in line for line in self.rejected)

    def assert_equal(self, rtol: float = 1e-5, atol: float = 1e-5) -> None:
        for w, g in zip(_leaves(self.want), _leaves(self.got), strict=True):
            assert torch.equal(w.isnan(), g.isnan()), "NaN where eager has none, or the reverse"
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True)


def _leaves(x: Any) -> list[torch.Tensor]:
    return list(x) if isinstance(x, tuple | list) else [x]


def run(module: torch.nn.Module, *inputs: Any, **options: Any) -> Run:
    """`module(*inputs)` eagerly and compiled with attnopt (inner="eager" unless given)."""
    torch._dynamo.reset()
    attnopt.clear_reports()
    with torch.no_grad():
        want = module(*inputs)
        compiled = torch.compile(module, backend="attnopt",
                                 options={"inner": "eager", **options})
        got = compiled(*inputs)
    return Run(want, got, attnopt.reports())
