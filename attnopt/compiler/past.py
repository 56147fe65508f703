"""A causal LM's decoding step with its KV cache as plain tensors: what `rewrite_model(...,
with_past=True)` and `attnopt export --with-past` export.

An ONNX decoder takes the cache as inputs and returns its new value, under the names optimum's
exports use (B: batch, N: new tokens, P: cached tokens, L: layers) — whatever the Python argument
is called (`cache` since transformers 5.24, `past_key_values` before: `attnopt.compat`):

    inputs   input_ids [B, N], attention_mask [B, P + N], position_ids [B, N],
             past_key_values.{i}.key, past_key_values.{i}.value [B, Hkv, P, D] for i < L
    outputs  logits [B, N, vocab], present.{i}.key, present.{i}.value [B, Hkv, P + N, D]

`DecoderWithPast` is that interface around a transformers model: its forward puts the past
tensors into a DynamicCache as they are, runs the model with it and returns the cache's new
K/V. torch.export then records each layer's cache update as cat([past, new], 2) beside the
attention, which the kv_cache pass (when exporting) turns into `attnopt::attention_with_past`:
ONNX's Attention with past_key/past_value inputs and present_key/present_value outputs.

Every layer keeps its whole history, a sliding-window layer's too: the cache is made without
the model's config, so its layers are all plain DynamicLayers (the model's mask applies the
window), and present is always past + new, one shape rule for every layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ShapesCollection

from attnopt.compat import CACHE_ARGUMENTS, cache_argument

if TYPE_CHECKING:
    from transformers import DynamicCache

# The step's inputs, by their ONNX names (the cache's: past_key_values.{i}.key/.value).
PARAMETERS = ("input_ids", "attention_mask", "position_ids", "past_key_values")
# The forward parameters a decoding step passes besides the cache (causal LMs take them all).
_FORWARD_PARAMETERS = ("input_ids", "attention_mask", "position_ids", "use_cache")
# torch.export specialises a size of 1: example steps add two tokens to the prompt.
EXAMPLE_NEW_TOKENS = 2


def unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot be exported as a decoding step, or None."""
    accepted = inspect.signature(model.forward).parameters
    missing = [name for name in _FORWARD_PARAMETERS if name not in accepted]
    if cache_argument(model) is None:
        missing.append(" or ".join(CACHE_ARGUMENTS))
    if missing:
        return (f"{type(model).__name__}.forward takes no {', '.join(missing)}; exporting with "
                "past K/V needs a transformers causal LM (a decoder that takes a KV cache)")
    return None


def _dynamic_cache(past: Sequence[Tensor]) -> DynamicCache:
    """A DynamicCache holding each layer's past K/V (past = k0, v0, k1, v1, ...) as they are.
    DynamicCache(pairs) would concatenate them onto an empty tensor first: one more copy per
    layer in the graph."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for key, value in zip(past[::2], past[1::2], strict=True):
        layer = DynamicLayer()
        layer.lazy_initialization(key, value)  # the layer's dtype and device
        layer.keys, layer.values = key, value
        cache.layers.append(layer)
    return cache


class DecoderWithPast(nn.Module):
    """One decoding step of `model` over a KV cache given as tensors (see the module doc).
    Called with input_ids, attention_mask, position_ids and past_key_values, a tuple (k0, v0,
    k1, v1, ...); returns {"logits": ..., "present.0.key": ..., ...}."""

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported(model)
        if reason:
            raise ValueError(reason)
        super().__init__()
        self.model = model
        self.cache_argument = cache_argument(model)
        self.train(model.training)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                past_key_values: tuple[Tensor, ...]) -> dict[str, Tensor]:
        cache = _dynamic_cache(past_key_values)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True,
                         **{self.cache_argument: cache})
        present = {}
        for i, layer in enumerate(cache.layers):
            present[f"present.{i}.key"], present[f"present.{i}.value"] = layer.keys, layer.values
        return {"logits": out.logits, **present}

    @staticmethod
    def input_names(inputs: Mapping[str, Any]) -> list[str]:
        """The ONNX names of the step's tensor inputs, in the order the forward takes them."""
        layers = len(inputs["past_key_values"]) // 2
        return [*PARAMETERS[:3], *(f"{PARAMETERS[3]}.{i}.{kv}" for i in range(layers)
                                   for kv in ("key", "value"))]

    @staticmethod
    def dynamic_dims(inputs: Mapping[str, Any]) -> ShapesCollection:
        """Batch, new and cached lengths dynamic (`Dim.AUTO`); the K/V heads and head dim are
        the model's (a single KV head would be specialised anyway, with a warning)."""
        shapes = ShapesCollection()
        for name in PARAMETERS[:3]:
            shapes[inputs[name]] = {0: Dim.AUTO, 1: Dim.AUTO}
        for t in inputs["past_key_values"]:
            shapes[t] = {0: Dim.AUTO, 2: Dim.AUTO}
        return shapes

    def inputs_after(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The inputs of the step that follows a prompt (input_ids and optionally
        attention_mask, as the model takes them: by name or in that order): the model's K/V
        of the prompt as the past, its first `EXAMPLE_NEW_TOKENS` tokens again as the new ones,
        at the positions after each row's tokens (as `generate` counts them, padding left out).
        Example inputs for export: give a prompt of two rows and two tokens at least."""
        from transformers import DynamicCache

        prompt = {**dict(zip(PARAMETERS[:2], args, strict=False)), **kwargs}
        ids = prompt["input_ids"]
        mask = prompt.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        cache = DynamicCache()
        with torch.no_grad():
            self.model(input_ids=ids, attention_mask=mask, use_cache=True,
                       **{self.cache_argument: cache})
        # Contiguous copies, not views: torch.export's input guards fail on a strided view.
        new = ids[:, :EXAMPLE_NEW_TOKENS].contiguous()
        mask = torch.cat((mask, torch.ones_like(new, dtype=mask.dtype)), dim=1)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, -new.shape[1]:].contiguous()
        past = tuple(t for layer in cache.layers for t in (layer.keys, layer.values))
        return {"input_ids": new, "attention_mask": mask, "position_ids": positions,
                "past_key_values": past}
