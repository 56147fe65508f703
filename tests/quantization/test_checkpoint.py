"""save_quantized / load_quantized: a round trip gives the same model bit for bit (shared
input_scale and tied embeddings included), and each kind of bad checkpoint is refused with a
ValueError that names the file and says what to do."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnopt import load_quantized, quantize_model, save_quantized
from attnopt.quantization.checkpoint import CONFIG, WEIGHTS
from attnopt.quantization.modules import Int4Linear
from tests.quantization.toy import TinyLM, attention, tiny_lm, token_ids


@pytest.fixture(scope="module")
def quantized():
    """An AWQ-quantized TinyLM and its summary, made once for the module."""
    model = tiny_lm()
    summary = quantize_model(model, group_size=32, method="awq",
                             calibration=[(token_ids(seed=s),) for s in range(3)])
    return model, summary


@pytest.fixture
def saved(quantized, tmp_path):
    """The quantized TinyLM saved to a fresh directory: (the model, the directory)."""
    model, summary = quantized
    save_quantized(model, tmp_path, summary)
    return model, tmp_path


def test_round_trip_is_bitwise(saved):
    model, directory = saved
    loaded = load_quantized(tiny_lm(seed=1), directory)  # other random weights to overwrite
    ids = token_ids(seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    for name in ("q", "k", "v", "o"):
        assert isinstance(getattr(loaded.attn, name), Int4Linear)
    a = loaded.attn
    assert a.q.input_scale is a.k.input_scale is a.v.input_scale  # re-tied, one Parameter
    assert loaded.lm_head.weight is loaded.embed.weight  # skipped, still tied
    assert isinstance(loaded.lm_head, torch.nn.Linear)


def test_files(saved):
    _, directory = saved
    config = json.loads((directory / CONFIG).read_text())
    assert config["format"] == "attnopt-w4a16" and config["version"] == 1
    assert config["group_size"] == 32 and config["method"] == "awq"
    assert config["skip"] == ["lm_head"]
    assert config["layers"]["attn.q"] == {"in_features": 64, "out_features": 64, "bias": True,
                                          "input_scale": True, "transposed_source": False}
    assert config["shared_input_scale"] == [["attn.q", "attn.k", "attn.v"]]
    tensors = load_file(directory / WEIGHTS)
    assert tensors["attn.q.qweight"].dtype == torch.uint8
    # Shared tensors are stored once.
    assert "attn.q.input_scale" in tensors and "attn.k.input_scale" not in tensors
    assert ("embed.weight" in tensors) != ("lm_head.weight" in tensors)


def test_save_needs_the_summary_of_this_model(tmp_path):
    model, other = attention(), tiny_lm()
    quantize_model(model)
    summary = quantize_model(other)
    with pytest.raises(ValueError, match="the summary does not describe this model"):
        save_quantized(model, tmp_path, summary)


def rewrite_weights(directory, edit):
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS)


def rewrite_config(directory, edit):
    config = json.loads((directory / CONFIG).read_text())
    edit(config)
    (directory / CONFIG).write_text(json.dumps(config))


def truncate(directory):
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])


BAD = {
    "missing key": (lambda d: rewrite_weights(d, lambda t: t.pop("attn.o.scales")),
                    WEIGHTS, r"does not fit the model: missing keys \['attn.o.scales'\]"),
    "unexpected key": (lambda d: rewrite_weights(d, lambda t: t.update(extra=torch.ones(2))),
                       WEIGHTS, r"unexpected keys \['extra'\]"),
    "shape mismatch": (lambda d: rewrite_weights(
        d, lambda t: t.update({"norm.weight": torch.ones(65)})),
        WEIGHTS, r"norm.weight is torch.float32 \[65\] in the file, torch.float32 \[64\]"),
    "truncated": (truncate, WEIGHTS, "is not a readable safetensors file .* corrupt or truncated"),
    "wrong format": (lambda d: rewrite_config(d, lambda c: c.update(format="gptq")),
                     CONFIG, "has format 'gptq', not 'attnopt-w4a16'"),
    "wrong version": (lambda d: rewrite_config(d, lambda c: c.update(version=2)),
                      CONFIG, "is version 2 of attnopt-w4a16; this attnopt reads version 1"),
    "not json": (lambda d: (d / CONFIG).write_text("{not json"), CONFIG, "is not valid JSON"),
    "layer shape": (lambda d: rewrite_config(
        d, lambda c: c["layers"]["attn.q"].update(in_features=32)),
        CONFIG, r"lists layer 'attn.q' as a linear \[64x32\] .* but the model has Linear "
                r"\[64, 64\]"),
    "no such layer": (lambda d: rewrite_config(
        d, lambda c: c["layers"].update({"attn.x": c["layers"]["attn.q"]})),
        CONFIG, "lists layer 'attn.x' .* but the model has no such module"),
    "malformed": (lambda d: rewrite_config(d, lambda c: c.pop("layers")),
                  CONFIG, "is malformed"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_raises_a_clear_error(saved, case):
    _, directory = saved
    corrupt, filename, message = BAD[case]
    corrupt(directory)
    with pytest.raises(ValueError, match=message) as info:
        load_quantized(tiny_lm(), directory)
    assert str(directory / filename) in str(info.value)
    assert "attnopt.save_quantized" in str(info.value) or "Build the model" in str(info.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{CONFIG} not found: .* not a checkpoint"):
        load_quantized(TinyLM(), tmp_path)
