"""Pre-quantized transformers checkpoints from other tools, loaded onto attnopt's int4 layers.

    model = attnopt.load_quantized("Llama-3-8B-GPTQ")      # a directory; config.json names it

The directory is what the tools write with `save_pretrained`: config.json with a
`quantization_config`, and safetensors weights. The model is built from the config offline
(transformers, the class its `architectures` names) with its parameters on the meta device, so
no float weight is ever allocated for a quantized layer; each quantized linear becomes an
`Int4Linear` holding the checkpoint's codes, scales and zeros converted once to attnopt's
layout, and the other parameters are read from the checkpoint. Formats (one module each, with
the tool code they were read from): `gptq.py`, `awq.py`, `compressed.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnopt.quantization.formats.awq import AWQScheme
from attnopt.quantization.formats.common import CheckpointError, Tensors
from attnopt.quantization.formats.compressed import CompressedScheme
from attnopt.quantization.formats.gptq import GPTQScheme
from attnopt.quantization.modules import Int4Linear, frozen, source_weight

SCHEMES = {"gptq": GPTQScheme, "awq": AWQScheme, "compressed-tensors": CompressedScheme}
Scheme = GPTQScheme | AWQScheme | CompressedScheme

__all__ = ["CheckpointError", "is_pretrained", "load_pretrained"]


def is_pretrained(directory: Path) -> bool:
    """Whether `directory` is a transformers model directory with a quantization_config (the
    checkpoints this module reads, or refuses with a reason)."""
    try:
        return "quantization_config" in _config(directory)
    except CheckpointError:
        return False


def load_pretrained(directory: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The model in `directory`, its quantized linears as `Int4Linear`s, in eval mode. `dtype`
    (default: the config's) is that of the float parameters, scales and activations. Raises a
    CheckpointError (a ValueError) naming what it found for anything it cannot read exactly."""
    directory = Path(directory)
    scheme = _scheme(_config(directory).get("quantization_config"), directory)
    tensors = Tensors(directory)
    model = empty_model(directory, dtype)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    for name, module in _quantized_linears(model, scheme, tensors):
        model.set_submodule(name, _int4_linear(scheme, tensors, name, module, dtype))
    _load_float_parameters(model, tensors)
    unread = tensors.unread()
    if unread:
        raise CheckpointError(
            f"{directory} holds {len(unread)} tensors the model built from its config has no "
            f"place for, e.g. {unread[:4]}: the checkpoint and its config.json disagree")
    return model.eval()


def _config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json: give a transformers model "
                              "directory, as save_pretrained writes it")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def _scheme(config: Any, directory: Path) -> Scheme:
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory}/config.json has no quantization_config object: it "
                              "is not a pre-quantized checkpoint")
    method = config.get("quant_method")
    if method not in SCHEMES:
        raise CheckpointError(
            f"{directory}/config.json has quantization_config with quant_method {method!r}; "
            f"attnopt reads {', '.join(SCHEMES)} (4-bit weights). Other formats (bitsandbytes, "
            "exl2, hqq, fp8, ...) must be converted to one of these first")
    try:
        return SCHEMES[method].parse(config)
    except (TypeError, AttributeError) as e:  # a field of the wrong JSON type
        raise CheckpointError(f"{directory}/config.json has a malformed quantization_config "
                              f"({type(e).__name__}: {e})") from None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device (no memory); buffers stay
    real, since models compute some in __init__ (rotary frequencies) and never save them."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(directory: Path, dtype: torch.dtype | None) -> nn.Module:
    """The model its config.json describes, parameters on the meta device, offline."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"transformers cannot read {directory}/config.json ({e})") from None
    if hasattr(config, "quantization_config"):  # transformers' own quantizers would take over
        del config.quantization_config
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    with _parameters_on_meta():
        if cls is None:
            return transformers.AutoModel.from_config(config, dtype=dtype)
        return cls._from_config(config, dtype=dtype)


def _quantized_linears(model: nn.Module, scheme: Scheme,
                       tensors: Tensors) -> list[tuple[str, nn.Module]]:
    """The modules the checkpoint holds packed weights for; each must be a linear of the model
    (and, for compressed-tensors, one its config targets, and the other way round)."""
    suffix = "." + scheme.marker
    marked = sorted(key.removesuffix(suffix) for key in tensors.files if key.endswith(suffix))
    found = []
    for name in marked:
        module = _submodule(model, name)
        if module is None or source_weight(module) is None:
            raise CheckpointError(
                f"the checkpoint has packed weights for {name!r}, but the model built from its "
                f"config has {type(module).__name__ if module else 'no such module'} there, "
                "not a linear layer")
        found.append((name, module))
    if isinstance(scheme, CompressedScheme):
        targeted = {name for name, module in model.named_modules()
                    if source_weight(module) is not None and scheme.scheme_of(name, module)}
        if targeted != set(marked):
            raise CheckpointError(
                "the checkpoint's packed layers and its config's config_groups / ignore "
                f"disagree: targeted but not packed {sorted(targeted - set(marked))[:4]}, packed "
                f"but not targeted {sorted(set(marked) - targeted)[:4]}")
    if not found:
        raise CheckpointError(f"the checkpoint holds no tensor ending in {suffix!r}: no layer "
                              "is quantized the way its quantization_config says")
    return found


def _int4_linear(scheme: Scheme, tensors: Tensors, name: str, module: nn.Module,
                 dtype: torch.dtype) -> Int4Linear:
    n, k = source_weight(module)[0].shape
    if isinstance(scheme, CompressedScheme):
        layer = scheme.layer(tensors, name, n, k, dtype, scheme.scheme_of(name, module))
    else:
        layer = scheme.layer(tensors, name, n, k, dtype)
    bias = f"{name}.bias" in tensors
    if module.bias is not None and not bias:
        raise CheckpointError(f"the checkpoint has no tensor '{name}.bias', which the model's "
                              "layer has")
    linear = Int4Linear(k, n, layer.packed.group_size, bias=bias,
                        input_order=layer.input_order is not None, dtype=dtype, device="meta")
    linear.qweight, linear.scales, linear.zeros = (
        frozen(t) for t in (layer.packed.qweight, layer.packed.scales, layer.packed.zeros))
    if bias:
        linear.bias = frozen(_fitting(tensors, f"{name}.bias", (n,)).to(dtype))
    if layer.input_order is not None:
        linear.input_order = frozen(layer.input_order)
    return linear


def _load_float_parameters(model: nn.Module, tensors: Tensors) -> None:
    """Read every parameter still on meta (and every saved buffer) from the checkpoint; tie
    what the config ties; refuse what is still missing."""
    for name, param in list(model.named_parameters()):
        if param.device.type == "meta" and name in tensors:
            owner, _, leaf = name.rpartition(".")
            value = _fitting(tensors, name, tuple(param.shape)).to(param.dtype)
            setattr(model.get_submodule(owner), leaf,
                    nn.Parameter(value, requires_grad=param.requires_grad))
    for name, buffer in list(model.named_buffers()):
        if name in tensors:
            buffer.copy_(_fitting(tensors, name, tuple(buffer.shape)))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"the checkpoint has no tensor for {len(missing)} parameters of "
                              f"the model its config builds, e.g. {missing[:4]}")


def _fitting(tensors: Tensors, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    value = tensors.take(key)
    if tuple(value.shape) != shape:
        raise CheckpointError(f"{key} is {list(value.shape)} in the checkpoint but "
                              f"{list(shape)} in the model its config builds")
    return value


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
