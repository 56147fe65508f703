"""`quantize_model`: replace a model's linear layers by `Int4Linear`s, in place, once.

The compile-time `quantize` pass does round-to-nearest on every compile; this is the offline
path: quantize once (optionally with AWQ and/or GPTQ, which need calibration data), save with
`save_quantized`, and load the int4 checkpoint many times with `load_quantized`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from attnopt.backends import int4
from attnopt.passes.quantize import skip_glob
from attnopt.quantization.awq import AWQResult, search_scale
from attnopt.quantization.calibration import InputGroup, collect
from attnopt.quantization.gptq import quantize_gptq
from attnopt.quantization.modules import Int4Linear, frozen, source_weight
from attnopt.quantization.summary import LayerSummary, QuantizationSummary

METHODS = ("rtn", "awq", "gptq", "gptq+awq")
Progress = Callable[[str, int, int], None]  # (layer name, layers done, total layers)


def quantize_model(
    model: nn.Module,
    *,
    group_size: int = 128,
    method: str = "rtn",
    calibration: Iterable[Any] | None = None,
    skip: Sequence[str] = ("lm_head",),
    progress: Progress | None = None,
    act_order: bool = False,
) -> QuantizationSummary:
    """Replace every `nn.Linear` and transformers `Conv1D` of `model` (except those a `skip`
    glob names, whole or by a dotted suffix) with an `Int4Linear`, in place.

    method="awq" runs `calibration` — an iterable of model inputs, each a dict of keyword
    arguments or a tuple of positional ones — through the model first, in eval mode under
    no_grad, and scales each group of linears that read one input (see `quantization/awq.py`).
    method="gptq" runs it too, collecting H = XᵀX per input, and rounds each linear with
    GPTQ's error feedback (`quantization/gptq.py`; `act_order` rounds the columns of largest
    H[j, j] first); method="gptq+awq" applies AWQ's scale first, then GPTQ to the scaled
    weight.
    `progress(name, done, total)` is called after each layer.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if group_size not in int4.GROUP_SIZES:
        raise ValueError(f"group_size must be one of {int4.GROUP_SIZES}, got {group_size}")
    if method != "rtn" and calibration is None:
        raise ValueError(f"method={method!r} needs calibration data: pass calibration=[...] "
                         "with some model inputs (dicts of keyword arguments, e.g. tokenizer "
                         "outputs, or tuples of positional arguments), or use method='rtn'")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    summary = QuantizationSummary(method, group_size, skip)
    linears: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or source_weight(module) is None:
            continue
        if glob := skip_glob(name, skip):
            summary.skipped.append((name, glob))
        else:
            linears[name] = module
    groups: dict[str, InputGroup] = {}
    if method != "rtn":
        groups = {name: g for g in collect(model, linears, calibration, hessian="gptq" in method)
                  for name in g.names}
    searched: dict[str, tuple[AWQResult, nn.Parameter | None]] = {}  # by the group's leader

    for done, (name, linear) in enumerate(linears.items(), 1):
        w, transposed = source_weight(linear)
        group = groups.get(name)
        extra: dict[str, Any] = {}
        input_scale = None
        if group is None:
            if method != "rtn":
                extra["note"] = "not called during calibration: plain RTN"
        elif "awq" in method:
            leader = group.names[0]
            if leader not in searched:
                searched[leader] = _search(group, linears, group_size)
            result, input_scale = searched[leader]
            i = group.names.index(name)
            extra = {"rtn_output_error": result.rtn_errors[i],
                     "awq_output_error": result.awq_errors[i], "alpha": result.alpha}
        if group is not None and "gptq" in method:
            packed = quantize_gptq(w, group.stats.hessian, group_size, w.dtype,
                                   act_order=act_order, input_scale=input_scale)
            module = Int4Linear.from_packed(packed, linear.bias, input_scale)
            extra["rtn_output_error"] = _output_error(w, group, Int4Linear.from_linear(
                linear, group_size))
            extra["output_error"] = _output_error(w, group, module)
        else:
            module = Int4Linear.from_linear(linear, group_size, input_scale)
        model.set_submodule(name, module)
        summary.layers.append(LayerSummary(
            name, module.in_features, module.out_features, _relative_error(w, module),
            transposed, **extra))
        if progress is not None:
            progress(name, done, len(linears))
    return summary


def _search(group: InputGroup, linears: dict[str, nn.Module],
            group_size: int) -> tuple[AWQResult, nn.Parameter | None]:
    """AWQ's scale for one group, as the one Parameter all its linears will share."""
    weights = [source_weight(linears[name])[0] for name in group.names]
    result = search_scale(weights, group.stats, group_size, weights[0].dtype)
    shared = None if result.input_scale is None else frozen(
        result.input_scale.to(weights[0].device))
    return result, shared


def _output_error(w: Tensor, group: InputGroup, module: Int4Linear) -> float:
    """‖X Wᵀ − X Ŵᵀ‖ / ‖X Wᵀ‖ on the calibration rows the group kept."""
    rows = group.stats.rows
    y = rows @ w.detach().float().T
    return ((rows @ module.effective_weight().T - y).norm() / y.norm().clamp_min(1e-30)).item()


def _relative_error(w: Tensor, module: Int4Linear) -> float:
    wf = w.detach().float()
    return ((module.effective_weight() - wf).norm() / wf.norm().clamp_min(1e-30)).item()

