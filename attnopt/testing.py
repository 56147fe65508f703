"""Helpers for users' own test suites.

    from attnopt.testing import assert_matches_eager
    assert_matches_eager(model, (input_ids,), options={"kernels": "reference"})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from attnopt.compiler.options import Options
from attnopt.compiler.report import CompileReport, reports

# (rtol, atol) by dtype: what the arithmetic allows when a fused kernel reorders a reduction or
# keeps fp32 where eager rounded to 16 bits in between.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-2, 1e-2),
}


def _split(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def _fresh(x: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, x)


def _leaves(x: Any, depth: int = 0) -> list:
    """Output leaves in a fixed order: pytree containers, then the attributes of other objects
    (a transformers cache, say) so the tensors they hold are compared too."""
    leaves, _ = tree_flatten(x)
    out: list = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor | int | float | bool | str | None) or depth > 3:
            out.append(leaf)
        elif hasattr(leaf, "__dict__"):
            out += _leaves([v for _, v in sorted(vars(leaf).items())], depth + 1)
        else:
            out.append(leaf)
    return out


def assert_matches_eager(
    model: torch.nn.Module | Any,
    inputs: Any,
    options: Mapping[str, Any] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> list[CompileReport]:
    """Run `model` eagerly and compiled with attnopt on the same inputs (a tensor, a tuple of
    positional inputs, or a dict of keyword inputs) and assert every output matches within the
    tolerance of its dtype (or `rtol`/`atol`). Returns the reports of the graphs compiled."""
    Options.parse(options)  # fail fast on a bad option, before running anything
    args, kwargs = _split(inputs)
    expected = model(*_fresh(args), **_fresh(kwargs))
    seen = len(reports())
    compiled = torch.compile(model, backend="attnopt", options=dict(options or {}))
    got = compiled(*_fresh(args), **_fresh(kwargs))
    new_reports = reports()[seen:]

    flat_expected, flat_got = _leaves(expected), _leaves(got)
    if len(flat_expected) != len(flat_got):
        raise AssertionError(f"attnopt gave {len(flat_got)} outputs, eager {len(flat_expected)}")
    for i, (e, g) in enumerate(zip(flat_expected, flat_got, strict=True)):
        if not isinstance(e, torch.Tensor):
            if e != g:
                raise AssertionError(f"output {i}: attnopt gave {g!r}, eager {e!r}")
            continue
        default = TOLERANCES.get(e.dtype, (0.0, 0.0))
        tol = (rtol if rtol is not None else default[0], atol if atol is not None else default[1])
        try:
            torch.testing.assert_close(g, e, rtol=tol[0], atol=tol[1], equal_nan=True)
        except AssertionError as err:
            summaries = "\n".join(r.summary() for r in new_reports)
            raise AssertionError(
                f"output {i} ({e.dtype}, shape {list(e.shape)}) differs from eager beyond "
                f"rtol={tol[0]}, atol={tol[1]}:\n{err}\n\nattnopt reports:\n{summaries}"
            ) from None
    return new_reports
