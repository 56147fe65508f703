"""The int4 checkpoint: quantize once with `quantize_model`, `save_quantized`, then
`load_quantized` into a freshly built float model as often as needed.

A checkpoint is a directory of two files:

- `model.safetensors`: the model's whole state dict, packed int4 tensors included. Tensors that
  several names share (tied embeddings, the `input_scale` of sibling linears) are stored once,
  under the first name; loading fills the other names from it.
- `quantization_config.json`: which modules are `Int4Linear`s, of what shape, and which of them
  share one `input_scale`, so that loading can rebuild them before reading the tensors:

      {"format": "attnopt-w4a16", "version": 1, "group_size": 128, "method": "awq",
       "skip": ["lm_head"], "layers": {name: {"in_features", "out_features", "bias",
       "input_scale", "transposed_source"}}, "shared_input_scale": [[name, ...], ...]}
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from attnopt.backends.int4 import GROUP_SIZES
from attnopt.quantization import formats
from attnopt.quantization.modules import Int4Linear, source_weight
from attnopt.quantization.summary import QuantizationSummary

FORMAT, VERSION = "attnopt-w4a16", 1
WEIGHTS, CONFIG = "model.safetensors", "quantization_config.json"
RESAVE = "re-create it with attnopt.quantize_model and attnopt.save_quantized"
SAME_MODEL = "load it into a model built from the configuration it was quantized from"


def save_quantized(model: nn.Module, directory: str | os.PathLike,
                   summary: QuantizationSummary) -> Path:
    """Write `model` (quantized by `quantize_model`, which returned `summary`) to `directory`,
    created if needed. Returns the directory."""
    directory = Path(directory)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    described = {layer.name: layer for layer in summary.layers}
    if set(layers) != set(described):
        raise ValueError(
            f"the summary does not describe this model's Int4Linear layers (only in the model: "
            f"{sorted(set(layers) - set(described))}; only in the summary: "
            f"{sorted(set(described) - set(layers))}); pass the summary that quantize_model "
            "returned for this model")
    by_scale: dict[int, list[str]] = defaultdict(list)
    for name, m in layers.items():
        if m.input_scale is not None:
            by_scale[id(m.input_scale)].append(name)
    config = {
        "format": FORMAT, "version": VERSION, "group_size": summary.group_size,
        "method": summary.method, "skip": list(summary.skip),
        "layers": {name: {"in_features": m.in_features, "out_features": m.out_features,
                          "bias": m.bias is not None, "input_scale": m.input_scale is not None,
                          "transposed_source": described[name].transposed_source}
                   for name, m in layers.items()},
        "shared_input_scale": [names for names in by_scale.values() if len(names) > 1],
    }
    state = model.state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    save_file({names[0]: state[names[0]].contiguous() for names in _aliases(state)},
              directory / WEIGHTS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return directory


def load_quantized(model_or_directory: nn.Module | str | os.PathLike,
                   directory: str | os.PathLike | None = None, *,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """An int4 model, in either of two forms:

    - `load_quantized(directory)`: a transformers model directory, the model built from its
      config.json offline (float parameters in `dtype`, default the config's). Either attnopt's
      own checkpoint (`quantization_config.json` beside config.json, as `attnopt quantize`
      writes it) or a GPTQ, AWQ or compressed-tensors checkpoint (`quantization_config` in
      config.json; `quantization/formats/`), converted once to `Int4Linear`s.
    - `load_quantized(model, directory)`: attnopt's own checkpoint into `model`, freshly built
      float from the configuration it was quantized from (e.g. `AutoModel.from_config(config)`),
      in the dtype wanted; converted in place and returned.

    A bad checkpoint raises a ValueError naming what is wrong; one found after the layers were
    replaced leaves a given `model` half converted: build a fresh one."""
    if directory is None:
        if isinstance(model_or_directory, nn.Module):
            raise TypeError("load_quantized(model, directory): the directory is missing")
        path = Path(model_or_directory)
        if not (path / CONFIG).is_file():
            return formats.load_pretrained(path, dtype)
        model = formats.empty_model(path, dtype)
        return _load_into(model, path, materialize=True).eval()
    if not isinstance(model_or_directory, nn.Module):
        raise TypeError(f"load_quantized(model, directory) takes an nn.Module first, got "
                        f"{type(model_or_directory).__name__}; or call load_quantized(directory)")
    return _load_into(model_or_directory, Path(directory))


def _load_into(model: nn.Module, directory: Path, materialize: bool = False) -> nn.Module:
    config = _read_config(directory / CONFIG)
    tensors = _read_weights(directory / WEIGHTS)
    _install(model, config, directory / CONFIG)
    if materialize:
        _materialize(model)
    state = model.state_dict()
    aliases = _aliases(state)
    where = f"{directory / WEIGHTS} does not fit the model"
    unexpected = sorted(set(tensors) - set(state))
    missing = [names[0] for names in aliases if not any(n in tensors for n in names)]
    if unexpected or missing:
        raise ValueError(f"{where}: missing keys {missing}, unexpected keys {unexpected}; "
                         f"{SAME_MODEL}, or {RESAVE}")
    for name, t in tensors.items():
        expected = state[name]
        if t.shape != expected.shape or (t.dtype != expected.dtype and not (
                t.is_floating_point() and expected.is_floating_point())):
            raise ValueError(f"{where}: {name} is {t.dtype} {list(t.shape)} in the file, "
                             f"{expected.dtype} {list(expected.shape)} in the model; "
                             f"{SAME_MODEL}, or {RESAVE}")
    full = {}
    for names in aliases:
        stored = next(n for n in names if n in tensors)
        full.update({n: tensors.get(n, tensors[stored]) for n in names})
    model.load_state_dict(full, strict=True)
    return model


def _materialize(model: nn.Module) -> None:
    """Give every parameter still on the meta device real (uninitialised) memory, keeping
    parameters that several modules share shared; the checkpoint is copied in next."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"),
                                               requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]


def _aliases(state: dict[str, Tensor]) -> list[list[str]]:
    """State-dict names grouped by the tensor they hold: one group per distinct tensor."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, t in state.items():
        groups[(t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                t.stride(), t.dtype)].append(name)
    return list(groups.values())


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {path.parent} is not a checkpoint written "
                                "by attnopt.save_quantized")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {RESAVE}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path} has format {found!r}, not {FORMAT!r}: it is not an attnopt "
                         f"int4 checkpoint; {RESAVE}")
    if config.get("version") != VERSION:
        raise ValueError(f"{path} is version {config.get('version')!r} of {FORMAT}; this attnopt "
                         f"reads version {VERSION}. Use the attnopt that wrote it, or {RESAVE}")
    if config.get("group_size") not in GROUP_SIZES:
        raise ValueError(f"{path} has group_size {config.get('group_size')!r}, not one of "
                         f"{GROUP_SIZES}; {RESAVE}")
    return config


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {path.parent} is not a checkpoint written "
                                "by attnopt.save_quantized")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is corrupt or "
                         f"truncated; {RESAVE}") from None


def _install(model: nn.Module, config: dict[str, Any], path: Path) -> None:
    """Replace the layers the config lists by empty Int4Linears of the recorded shapes, and
    re-tie the input_scale Parameters that siblings shared."""
    try:
        for name, spec in config["layers"].items():
            recorded = (spec["out_features"], spec["in_features"], spec["transposed_source"])
            found = source_weight(_module(model, name))
            if found is None or (*found[0].shape, found[1]) != recorded:
                raise ValueError(
                    f"{path} lists layer {name!r} as a linear [{recorded[0]}x{recorded[1]}] "
                    f"(transposed_source={recorded[2]}) but the model has "
                    f"{_describe(model, name)}. Build the model from the configuration it was "
                    "quantized from")
            model.set_submodule(name, Int4Linear(
                spec["in_features"], spec["out_features"], config["group_size"],
                bias=spec["bias"], input_scale=spec["input_scale"], dtype=found[0].dtype,
                device=found[0].device))
        for names in config["shared_input_scale"]:
            shared = _module(model, names[0]).input_scale
            for name in names[1:]:
                if shared is None or _module(model, name).input_scale is None:
                    raise ValueError(f"{path} is malformed: {names} share an input_scale that "
                                     f"not all of them have; {RESAVE}")
                _module(model, name).input_scale = shared
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is malformed ({type(e).__name__}: {e}); {RESAVE}") from None


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else None
    except AttributeError:
        return None


def _describe(model: nn.Module, name: str) -> str:
    module = _module(model, name)
    if module is None:
        return "no such module"
    found = source_weight(module)
    return type(module).__name__ + (f" {list(found[0].shape)} [out x in]" if found else "")
