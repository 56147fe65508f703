"""The attention variants on real transformers code (tiny configs, random weights): Gemma 2
(softcap, sliding window), GPT-OSS (sinks), Falcon (ALiBi, eager), T5 (relative position
bias: encoder, decoder and cross-attention), Llama and Gemma 2 with
attn_implementation="flex_attention". Every attention layer becomes one attnopt::attention
carrying its variant, nothing is refused, and the logits equal eager's on the CPU path and on
the Triton kernels (under the interpreter without a GPU)."""

import pytest
import torch

import attnopt
from attnopt.testing import assert_matches_eager

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
LAYERS = 2


def build(name: str) -> torch.nn.Module:
    t = transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, pad_token_id=0,
                  num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64,
                  attn_implementation="eager")
    flex = dict(common, attn_implementation="flex_attention")
    gemma2 = dict(num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=16)
    makers = {
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**gemma2, **common)),
        "gpt_oss": lambda: t.GptOssForCausalLM(t.GptOssConfig(
            num_key_value_heads=2, head_dim=16, sliding_window=4, num_local_experts=4,
            num_experts_per_tok=2, **common)),
        "falcon": lambda: t.FalconForCausalLM(t.FalconConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
            alibi=True, multi_query=True, new_decoder_architecture=False, pad_token_id=0,
            attn_implementation="eager")),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=LAYERS, num_heads=4,
            pad_token_id=0, decoder_start_token_id=0, attn_implementation="eager")),
        "llama_flex": lambda: t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **flex)),
        "gemma2_flex": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**gemma2, **flex)),
    }
    torch.manual_seed(0)
    return makers[name]().eval()


# What each model's calls carry (every layer's), and its number of attention layers.
EXPECTED = {
    "gemma2": ("softcap=50.0", LAYERS),
    "gpt_oss": ("sinks=", LAYERS),
    "falcon": ("biases=[", LAYERS),
    "t5": ("attnopt.attention(", 3 * LAYERS),  # encoder, decoder self and cross per layer
    "llama_flex": (", True, ", LAYERS),
    "gemma2_flex": ("softcap=50.0", LAYERS),
}


def inputs(name: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second sequence
    batch = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if name == "t5":
        batch["decoder_input_ids"] = torch.randint(3, 128, (2, 7), generator=g)
    return batch


def calls(reports) -> list[str]:
    return [line for r in reports for line in r.passes[-1].after if "attnopt.attention(" in line]


@pytest.mark.parametrize("kernels", ["auto", "triton"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_attention_rewritten_and_equal_to_eager(name, kernels):
    carried, layers = EXPECTED[name]
    # GPT-OSS: only the passes this suite is about (its experts are the MoE pass's business).
    passes = {"passes": ["attention", "kv_cache"]} if name == "gpt_oss" else {}
    with torch.no_grad():
        reports = assert_matches_eager(build(name), inputs(name),
                                       options={"inner": "eager", "kernels": kernels, **passes},
                                       rtol=2e-5, atol=2e-5)
    lines = calls(reports)
    assert sum(r.counts["attention"] for r in reports) == layers == len(lines)
    assert all(carried in line for line in lines), lines
    assert not [x for r in reports for p in r.passes if p.name == "attention" for x in p.rejected]


def test_gemma2_sliding_layers_without_padding_read_no_mask():
    # No padding: transformers' masks are constants, the causal one and the 4-token window;
    # they become the flag and window_left=3, and no mask tensor is read.
    batch = {k: v for k, v in inputs("gemma2").items() if k != "attention_mask"}
    with torch.no_grad():
        reports = assert_matches_eager(build("gemma2"), batch, options={"inner": "eager"})
    lines = calls(reports)
    assert len(lines) == LAYERS and all(", None, True, " in line for line in lines)
    assert sum("window_left=3" in line for line in lines) == 1  # one sliding layer of two
    attnopt.clear_reports()
