"""Compiled decoding of DeepSeek-V2/V3 (multi-head latent attention) through the paged latent
cache: greedy tokens exactly eager's (eager with its own DynamicCache), batch 2 with left
padding; every decode graph reads the latent pools in place with the absorbed
`attnopt::paged_latent_attention` and holds no kv_b_proj over past tokens; the cache holds
kv_lora_rank + qk_rope_head_dim numbers per token and layer; decoding never recompiles."""

import pytest
import torch
from torch._dynamo.utils import counters

import attnopt
from attnopt.cache import PagedKVCache
from tests import test_decode as decode
from tests.test_decode import prompts

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
LAYERS = 2
NEW_TOKENS = 5


def build(name: str, attn: str = "eager") -> torch.nn.Module:
    """Tiny random DeepSeeks. v2: no q_lora_rank, a wide latent (64) over narrow heads (8 + 8,
    values 8), so that an 11-token prefill costs less expanded than absorbed; complex rope.
    v3: q through q_a/q_b (q_lora_rank 24), interleaved rope with yarn scaling, whose mscale
    changes the softmax scale, and its second layer a mixture of experts."""
    t = transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, pad_token_id=0,
                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=64, attn_implementation=attn, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32)
    torch.manual_seed(0)
    if name == "v2":
        return t.DeepseekV2ForCausalLM(t.DeepseekV2Config(
            kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, first_k_dense_replace=LAYERS, **common)).eval()
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 16}
    return t.DeepseekV3ForCausalLM(t.DeepseekV3Config(
        kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        rope_interleave=True, rope_parameters=yarn, first_k_dense_replace=1, **common)).eval()


def generate(model, inputs, cache=None) -> torch.Tensor:
    return decode.generate(model, inputs, cache, new_tokens=NEW_TOKENS)


def compiled(model: torch.nn.Module, **options) -> torch.nn.Module:
    model.forward = torch.compile(model.forward, backend="attnopt",
                                  options={"inner": "eager", **options})
    return model


def latent_cache(model, **kwargs) -> PagedKVCache:
    return PagedKVCache(model.config, max_tokens=64, block_size=4, max_seq_len=32, **kwargs)


def decode_reports() -> list:
    """The reports of the graphs that decode one token (a query length of 1)."""
    return [r for r in attnopt.reports()
            if any("input()  # int64[2, 1]" in line for line in r.passes[0].before)]


def expansions_over_the_cache(report) -> list[str]:
    """Lines of the final graph that gather the cache or multiply it by kv_b_proj (an mm whose
    rows are the cache's capacity, 2 sequences x 32 slots)."""
    return [line for line in report.passes[-1].after
            if "paged_gather" in line or ("aten.mm(" in line and "[64, " in line)]


@pytest.mark.parametrize("name", ["v2", "v3"])
def test_latent_cache_greedy_tokens_equal_eager(name):
    # The second prompt length makes Dynamo compile one prefill graph for all lengths, whose
    # symbolic query length keeps it in the expanded form (said in the report); decoding is
    # absorbed in every graph.
    model = build(name)
    cases = [prompts(2, 5, pad=3), prompts(2, 9, pad=1)]
    want = [generate(model, inputs) for inputs in cases]
    model = compiled(model)
    for inputs, expected in zip(cases, want, strict=True):
        assert torch.equal(generate(model, inputs, latent_cache(model)), expected)
    decode = decode_reports()
    assert decode and all(r.counts["kv_cache"] == LAYERS for r in decode)
    assert all(not expansions_over_the_cache(r) for r in decode)
    for r in decode:
        calls = [line for line in r.passes[-1].after if "paged_latent_attention(" in line]
        assert len(calls) == LAYERS
    first, dynamic = (r.pass_record("mla") for r in attnopt.reports() if r not in decode)
    assert first.rewrites == LAYERS and dynamic.rewrites == 0
    assert all("the query length is symbolic" in reason for reason in dynamic.rejected)


def test_latent_cache_size_and_no_recompiles():
    model = compiled(build("v3"))
    config = model.config
    counters.clear()
    inputs = prompts(2, 7, pad=2)

    def fresh() -> PagedKVCache:  # allocated up front from the MLA config: no prefill graph
        return latent_cache(model, batch_size=2, dtype=torch.float32)   # allocates

    cache = fresh()
    layer = cache.layers[0]
    assert layer.k_pool.shape[2:] == (1, config.kv_lora_rank)
    assert layer.v_pool.shape[2:] == (1, config.qk_rope_head_dim)
    generate(model, inputs, cache)
    assert counters["stats"]["unique_graphs"] == 2  # prefill and decode
    numbers = config.kv_lora_rank + config.qk_rope_head_dim  # 40: the latent and its rope key
    assert cache._bytes_per_token(layer) == numbers * 4
    tokens = 7 + NEW_TOKENS - 1
    assert cache.seq_lens_host() == [tokens, tokens]
    assert cache.bytes_ideal() == 2 * tokens * LAYERS * numbers * 4
    expanded = 2 * config.num_attention_heads * (config.qk_nope_head_dim
                                                 + config.qk_rope_head_dim)
    assert numbers * 4 < expanded  # what the expanded K/V would take: 2 x 4 heads x 24
    cache.reset()
    generate(model, inputs, cache)
    generate(model, inputs, fresh())
    assert counters["stats"]["unique_graphs"] == 2


def test_sdpa_prefill_and_decode_are_absorbed():
    # Without padding, transformers' SDPA prefill drops the mask and cuts K/V to the new
    # tokens with is_causal: the paged op's causal mode over each sequence's length. On CPU
    # SDPA decomposes attention whose value head dim differs from the key's into its math
    # form (q and K each scaled by √scale), which the mla pass folds into the scale; at one
    # query (decode) that form's 3-D products have a size-1 row axis.
    model = build("v3", attn="sdpa")
    inputs = prompts(2, 6, pad=0)
    want = generate(model, inputs)
    assert torch.equal(generate(compiled(model), inputs, latent_cache(model)), want)
    prefill = attnopt.reports()[0]
    assert prefill.pass_record("mla").rewrites == LAYERS
    calls = [line for line in prefill.passes[-1].after if "paged_latent_attention(" in line]
    assert len(calls) == LAYERS and all(", True, 'auto', None, None, None)" in line
                                        for line in calls)
    decode = attnopt.reports()[-1]
    assert decode.pass_record("mla").rewrites == LAYERS
    assert sum("paged_latent_attention(" in line for line in decode.passes[-1].after) == LAYERS


def test_int8_latent_cache_compiled_matches_int8_cache_eager():
    # int8 latent and rope key, one float32 scale per token: the compiled absorbed read
    # dequantizes as the eager gather does.
    model = build("v3")
    inputs = prompts(2, 6, pad=2)
    want = generate(model, inputs, latent_cache(model, int8=True))
    assert torch.equal(generate(compiled(model), inputs, latent_cache(model, int8=True)), want)
    assert all(r.counts["kv_cache"] == LAYERS for r in attnopt.reports())


def test_triton_kernel_gives_eager_tokens():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build("v3").to(device)
    inputs = {k: v.to(device) for k, v in prompts(2, 6, pad=3).items()}
    want = generate(model, inputs)
    model = compiled(model, kernels="triton")
    assert torch.equal(generate(model, inputs, latent_cache(model)), want)
    calls = [line for r in attnopt.reports() for line in r.passes[-1].after
             if "attnopt.paged_latent_attention(" in line]
    assert len(calls) == 2 * LAYERS and all("'triton'" in line for line in calls)


def test_a_dynamic_cache_is_absorbed_too():
    # With transformers' own DynamicCache the latent is cat([past, new]), read as it is by
    # attnopt::latent_attention: the per-step copy of the latent (R + P numbers per token)
    # stays, the expansion of every past token through kv_b_proj goes.
    model = build("v2")
    inputs = prompts(2, 6, pad=2)
    want = generate(model, inputs)
    assert torch.equal(generate(compiled(model), inputs), want)
    decode = decode_reports()
    assert decode and all(r.pass_record("mla").rewrites == LAYERS for r in decode)
    assert all(sum("attnopt.latent_attention(" in line for line in r.passes[-1].after)
               == LAYERS for r in decode)
