"""quantize_model with round-to-nearest: which layers it takes (skip globs by path or dotted
suffix), what it reports, and that on GPT-2 (Conv1D, weight stored [in, out]) it is the very
quantization the compile-time pass does."""

import pytest
import torch
from torch import nn

import attnopt
from attnopt import quantize_model
from attnopt.passes.quantize import relative_error
from attnopt.quantization.modules import Int4Linear
from tests.quantization.toy import tiny_lm, token_ids


def test_skip_globs_progress_and_summary():
    model = tiny_lm()
    q_weight = model.attn.q.weight.detach().clone()
    calls = []
    summary = quantize_model(model, group_size=64, skip=("lm_head", "o"),
                             progress=lambda *a: calls.append(a))
    assert isinstance(model.attn.q, Int4Linear) and type(model.attn.o) is nn.Linear
    assert type(model.lm_head) is nn.Linear  # the default glob, kept here
    assert summary.skipped == [("attn.o", "o"), ("lm_head", "lm_head")]
    assert calls == [("attn.q", 1, 3), ("attn.k", 2, 3), ("attn.v", 3, 3)]
    assert (summary.method, summary.group_size, summary.skip) == ("rtn", 64, ("lm_head", "o"))
    layer = summary.layers[0]
    assert (layer.name, layer.in_features, layer.out_features) == ("attn.q", 64, 64)
    assert layer.weight_error == pytest.approx(
        relative_error(q_weight, model.attn.q.packed()), rel=1e-6)
    assert layer.rtn_output_error is None and not layer.transposed_source
    assert summary.table()[:2] == [("layer", "shape", "weight err"),
                                   ("attn.q", "64x64", f"{layer.weight_error:.4f}")]


@pytest.mark.slow
def test_gpt2_conv1d_matches_the_compile_time_pass():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4,
                                     n_positions=64, bos_token_id=0, eos_token_id=0)
    float_model = transformers.GPT2Model(config).eval()
    offline = transformers.GPT2Model(config).eval()
    offline.load_state_dict(float_model.state_dict())
    summary = quantize_model(offline, group_size=32)
    assert len(summary.layers) == 8 and all(layer.transposed_source for layer in summary.layers)
    assert isinstance(offline.h[0].attn.c_attn, Int4Linear)
    compiled = torch.compile(float_model, backend="attnopt",
                             options={"quantize": "w4a16", "group_size": 32, "inner": "eager"})
    ids = token_ids(rows=12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).last_hidden_state,
                                   offline(ids).last_hidden_state, rtol=1e-4, atol=1e-4)
    assert sum(r.counts["w4a16_linear"] for r in attnopt.reports()) == 8
