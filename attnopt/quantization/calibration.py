"""Running calibration inputs through a model to learn what its linears read.

Hooks on the linears see each call's input tensor. Linears whose input is the very same tensor
object (Q/K/V read one hidden state; gate/up one normalised one) form a group: AWQ gives a group
one scale, so the scaled input is one tensor too. The first linear to read a tensor leads its
group and accumulates the statistics; the others only record who led them. A weak reference
tells "the same tensor" from "a new tensor that reuses a freed one's id" without keeping any
activation alive.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnopt.quantization.awq import MAX_ROWS, InputStats


@dataclass
class InputGroup:
    """Linears that read the same input on every calibration call, and that input's stats."""

    names: list[str]
    stats: InputStats


def run(model: nn.Module, inputs: Any) -> None:
    """One model call on a calibration input: a dict of keyword arguments, a tuple (or list) of
    positional ones, or a single tensor."""
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, tuple | list):
        model(*inputs)
    elif isinstance(inputs, Tensor):
        model(inputs)
    else:
        raise TypeError(f"a calibration input must be a dict of keyword arguments, a tuple of "
                        f"positional ones or a tensor, got {type(inputs).__name__}")


def collect(model: nn.Module, linears: Mapping[str, nn.Module], calibration: Iterable[Any],
            max_rows: int = MAX_ROWS, hessian: bool = False) -> list[InputGroup]:
    """Run `calibration` through `model` (eval mode, no grad) and group `linears` by input
    (each group's stats with H = Σ xᵀx too when `hessian`). Linears never called are in no
    group."""
    stats: dict[str, InputStats] = {}
    leaders: dict[str, set[str]] = defaultdict(set)
    live: dict[int, tuple[weakref.ref, str]] = {}  # id(input) -> (the input, its leader)

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            seen = live.get(id(x))
            if seen is None or seen[0]() is not x:
                seen = live[id(x)] = (weakref.ref(x), name)
                stats.setdefault(name, InputStats(max_rows, hessian=hessian)).add(x)
            leaders[name].add(seen[1])
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    was_training = model.training
    batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for inputs in calibration:
                run(model, inputs)
                live.clear()
                batches += 1
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not batches:
        raise ValueError("the calibration data yielded no inputs; pass a non-empty list of "
                         "model inputs (dicts of keyword arguments or tuples of arguments)")
    return _groups(leaders, stats)


def _groups(leaders: dict[str, set[str]], stats: dict[str, InputStats]) -> list[InputGroup]:
    """One group per leader. A linear led by different linears on different calls (it shares
    its input with some layers only sometimes) cannot share a single scale with them."""
    mixed = {name: sorted(who) for name, who in leaders.items()
             if len(who) > 1 or leaders[next(iter(who))] != who}
    if mixed:
        raise ValueError(
            "AWQ needs each linear to read the same input as the same siblings on every call; "
            f"these did not (linear: the linears that read its input first): {mixed}. Quantize "
            "them with method='rtn', or leave them out with `skip`")
    members: dict[str, list[str]] = defaultdict(list)
    for name, (leader,) in leaders.items():
        members[leader].append(name)
    return [InputGroup(names, stats[leader]) for leader, names in members.items()]
