"""Frozen weights keep the README's promise under the default inner compiler: an in-place
update after compiling is seen by every layer no rewrite derived from it, in the process that
compiled and in a later one that takes the compiled graph from Inductor's FX graph cache; and a
model with other weights but the same shapes never runs on the cached artifact's weights."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attnopt

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch._dynamo.utils import counters

    torch.manual_seed(int(sys.argv[1]))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4)).eval()
    x = torch.randn(3, 16)
    compiled = torch.compile(model, backend="attnopt")
    with torch.no_grad():
        fresh = torch.equal(compiled(x), model(x)) or torch.allclose(compiled(x), model(x),
                                                                      atol=1e-6)
        model[0].weight.mul_(2.0)  # a large weight and a small bias, updated in place
        model[2].bias.add_(1.0)
        updated = torch.allclose(compiled(x), model(x), atol=1e-6)
    print(json.dumps({"fresh": fresh, "updated": updated,
                      "hits": counters["inductor"]["fxgraph_cache_hit"]}))
""")


def run(seed: int, cache_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(seed)], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_in_place_updates_are_seen_when_the_inductor_cache_hits(tmp_path):
    assert run(0, str(tmp_path)) == {"fresh": True, "updated": True, "hits": 0}
    assert run(0, str(tmp_path)) == {"fresh": True, "updated": True, "hits": 1}


def tied_llama(tie: bool):
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_skip_names_the_layer_that_uses_a_tied_weight(tie):
    # A tied lm_head reads the embedding's parameter: the default skip ['lm_head'] must still
    # keep it in float, and the report must call it lm_head, not model.embed_tokens.
    model = tied_llama(tie)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    attnopt.clear_reports()
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = torch.compile(model, backend="attnopt", options={
            "inner": "eager", "quantize": "w4a16"})(ids, use_cache=False).logits
    (report,) = attnopt.reports()
    quantize = report.pass_record("quantize")
    assert report.counts["w4a16_linear"] == 7  # q, k, v, o, gate, up, down
    (skipped,) = [r for r in quantize.rejected if "skip glob 'lm_head'" in r]
    assert skipped.split(": ", 1)[1].startswith(
        "lm_head (weight of model.embed_tokens, tied) is left in float" if tie
        else "lm_head is left in float")
    assert not any("embed_tokens [" in note for note in quantize.notes)
    torch.testing.assert_close(got, want, rtol=0.2, atol=0.2)  # int4 layers, float head


def test_a_tied_lm_head_is_quantized_under_its_own_name_when_asked():
    model = tied_llama(True)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    attnopt.clear_reports()
    with torch.no_grad():
        torch.compile(model, backend="attnopt", options={
            "inner": "eager", "quantize": "w4a16", "skip": []})(ids, use_cache=False)
    (report,) = attnopt.reports()
    assert report.counts["w4a16_linear"] == 8
    assert any(n.startswith("lm_head (weight of model.embed_tokens, tied) [128x64]")
               for n in report.pass_record("quantize").notes)
