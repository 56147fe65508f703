"""Compiled decoding: `generate` on transformers decoders compiled with attnopt gives exactly the
eager greedy tokens; with a PagedKVCache every layer's attention reads the paged pools in place
(kv_cache = layers in the prefill and the decode graph, no gathered copy left), decoding never
recompiles, and the cache holds at most one partly filled block per sequence; StaticCache is
read up to its length instead of its capacity; DynamicCache is left alone with its reason."""

import pytest
import torch
from torch._dynamo.utils import counters

import attnopt
from attnopt.cache import PagedKVCache, PagedKVCacheError
from attnopt.compat import with_cache

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
LAYERS = 2
NEW_TOKENS = 6


def build(name: str) -> torch.nn.Module:
    t = transformers
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, pad_token_id=0,
                  num_hidden_layers=LAYERS, num_attention_heads=4, attn_implementation="sdpa")
    makers = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **common)),
        # A 4-token window: the paged cache keeps the history, the model's mask hides it.
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(
            num_key_value_heads=1, sliding_window=4, **common)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=2, **common)),
        "mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common)),
        # Eager attention (they have no SDPA form): softcap and a window; sinks and a window.
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(
            num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
            **dict(common, attn_implementation="eager"))),
        "gpt_oss": lambda: t.GptOssForCausalLM(t.GptOssConfig(
            num_key_value_heads=2, head_dim=16, sliding_window=4, num_local_experts=4,
            num_experts_per_tok=2, **dict(common, attn_implementation="eager"))),
    }
    torch.manual_seed(0)
    return makers[name]().eval()


def prompts(batch: int, length: int, pad: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * batch + length)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    ids[-1, :pad], mask[-1, :pad] = 0, 0  # left padding on the last sequence
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, inputs, cache=None, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                          disable_compile=True, **with_cache(model, cache))


def compiled(model: torch.nn.Module, inner: str = "eager") -> torch.nn.Module:
    """The model with its forward compiled by attnopt, as `generate` users do it."""
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend="attnopt", options={"inner": inner})
    return model


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def leftover_gathers() -> list[str]:
    return [line for r in attnopt.reports() for line in r.passes[-1].after
            if "paged_gather" in line]


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "mixtral"])
def test_paged_cache_greedy_tokens_equal_eager(name):
    model = build(name)
    cases = [prompts(2, 5, pad=3), prompts(2, 11, pad=0), prompts(1, 9, pad=0)]
    want = [generate(model, inputs) for inputs in cases]
    model = compiled(model)
    for inputs, expected in zip(cases, want, strict=True):
        cache = PagedKVCache(model.config, max_tokens=64, block_size=4, max_seq_len=32)
        assert torch.equal(generate(model, inputs, cache), expected)
    reports = attnopt.reports()
    assert reports and all(r.counts["kv_cache"] == LAYERS for r in reports)
    assert not leftover_gathers()
    # paged_attention writes the layout the graph reads (SDPA's [B, L, H, D] in memory):
    # nothing 4-D is cloned after it, in the prefill graph or a decode step's (the copy_s
    # left are the cache's writes into its pools).
    final = [line for r in reports for line in r.passes[-1].after]
    assert not [line for line in final
                if "aten.clone(" in line and line.rsplit("[", 1)[-1].count(",") == 3]


@pytest.mark.parametrize("kernels", ["auto", "triton"])
@pytest.mark.parametrize(("name", "variant"), [("gemma2", "softcap=50.0"),
                                               ("gpt_oss", "sinks=")])
def test_paged_cache_with_softcap_and_sinks_gives_eager_tokens(name, variant, kernels):
    # Gemma 2's softcap and GPT-OSS's sinks in the paged decode kernel (and the CPU path),
    # the sliding window in the model's mask; GPT-OSS's experts are left to the MoE pass's
    # own tests (only attention and kv_cache run here).
    model, inputs = build(name), prompts(2, 7, pad=3)
    want = generate(model, inputs)
    model.forward = torch.compile(model.forward, backend="attnopt", options={
        "inner": "eager", "kernels": kernels, "passes": ["attention", "kv_cache"]})
    cache = PagedKVCache(model.config, max_tokens=64, block_size=4, max_seq_len=32)
    assert torch.equal(generate(model, inputs, cache), want)
    reports = attnopt.reports()
    assert reports and all(r.counts["kv_cache"] == LAYERS for r in reports)
    calls = [line for r in reports for line in r.passes[-1].after
             if "attnopt.paged_attention(" in line]
    assert len(calls) == LAYERS * len(reports) and all(variant in line for line in calls)
    assert not leftover_gathers()


def test_decoding_never_recompiles_and_memory_grows_by_blocks():
    model = compiled(build("llama"))
    counters.clear()
    inputs = prompts(2, 7, pad=2)

    def fresh_cache() -> PagedKVCache:  # allocated up front: the prefill graph never allocates
        return PagedKVCache(model.config, max_tokens=64, block_size=4, max_seq_len=32,
                            batch_size=2, dtype=torch.float32)

    cache = fresh_cache()
    pools = [(layer.k_pool.data_ptr(), layer.v_pool.data_ptr()) for layer in cache.layers]
    generate(model, inputs, cache)
    # One graph for the prefill, one for every decode step.
    assert graphs() == 2
    # The pools were written in place, never reallocated.
    assert [(x.k_pool.data_ptr(), x.v_pool.data_ptr()) for x in cache.layers] == pools
    # 7 prompt tokens + 5 fed back = 12 per sequence: exactly 3 blocks of 4 each.
    assert cache.seq_lens_host() == [12, 12]
    assert [len(b) for b in cache.blocks] == [3, 3]
    block = cache.block_size * cache._bytes_per_token(cache.layers[0]) * LAYERS
    assert 0 <= cache.bytes_allocated() - cache.bytes_ideal() < 2 * block
    # More generations, in the same cache after reset() or in a new one: nothing recompiles.
    cache.reset()
    generate(model, inputs, cache)
    generate(model, inputs, fresh_cache())
    assert graphs() == 2


def test_a_serving_cache_decodes_smaller_batches_without_recompiles():
    # A cache allocated for 4 sequences decodes a batch of 2 in its first slots: eager's
    # tokens, every layer read in place, 2 graphs; again after reset(), and in another cache of
    # 4 slots, without a recompile.
    model = build("llama")
    inputs = prompts(2, 7, pad=2)
    want = generate(model, inputs)
    model = compiled(model)
    counters.clear()

    def serving_cache() -> PagedKVCache:
        return PagedKVCache(model.config, max_tokens=128, block_size=4, max_seq_len=32,
                            batch_size=4, dtype=torch.float32)

    cache = serving_cache()
    assert torch.equal(generate(model, inputs, cache), want)
    assert cache.seq_lens_host() == [12, 12, 0, 0]
    cache.reset()
    assert torch.equal(generate(model, inputs, cache), want)
    assert torch.equal(generate(model, inputs, serving_cache()), want)
    assert graphs() == 2
    assert all(r.counts["kv_cache"] == LAYERS for r in attnopt.reports())
    assert not leftover_gathers()


@pytest.mark.parametrize("wrong", [{"batch_size": 1}, {"dtype": torch.bfloat16}])
def test_a_refused_cache_leaves_later_compiles_whole(wrong):
    # The refusal is raised while Dynamo traces the forward. Afterwards a correct cache still
    # compiles to the 2 graphs with every layer's attention reading the pools (a plain
    # exception there would leave the forward running uncompiled, split into ~20 graphs).
    model = build("llama")
    inputs = prompts(2, 7, pad=2)
    want = generate(model, inputs)
    model = compiled(model)

    def cache(**changes) -> PagedKVCache:
        made = dict(max_tokens=64, block_size=4, max_seq_len=32, batch_size=2,
                    dtype=torch.float32)
        return PagedKVCache(model.config, **{**made, **changes})

    with pytest.raises(PagedKVCacheError, match="create it with") as refused:
        generate(model, inputs, cache(**wrong))
    assert "\n" not in str(refused.value)  # one sentence, not Dynamo's stack appended to it
    counters.clear()
    attnopt.clear_reports()
    assert torch.equal(generate(model, inputs, cache()), want)
    assert graphs() == 2
    assert all(r.counts["kv_cache"] == LAYERS for r in attnopt.reports())


def test_int8_cache_compiled_matches_int8_cache_eager():
    model = build("llama")
    inputs = prompts(2, 8, pad=3)
    want = generate(model, inputs, PagedKVCache(model.config, max_tokens=64, block_size=4,
                                                max_seq_len=32, int8=True))
    got = generate(compiled(model), inputs, PagedKVCache(model.config, max_tokens=64,
                                                         block_size=4, max_seq_len=32,
                                                         int8=True))
    assert torch.equal(got, want)
    assert all(r.counts["kv_cache"] == LAYERS for r in attnopt.reports())


def test_compiled_decode_under_inductor():
    model = build("llama")
    inputs = prompts(2, 6, pad=2)
    want = generate(model, inputs)
    cache = PagedKVCache(model.config, max_tokens=64, block_size=4, max_seq_len=32)
    assert torch.equal(generate(compiled(model, inner="inductor"), inputs, cache), want)
    assert all(r.counts["kv_cache"] == LAYERS for r in attnopt.reports())


def test_triton_kernels_give_eager_tokens():
    # The split-KV Triton kernel (under the interpreter on CPU) reading the pools through the
    # block table with transformers' own padding mask.
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build("llama").to(device)
    inputs = {k: v.to(device) for k, v in prompts(2, 7, pad=3).items()}
    want = generate(model, inputs)
    model.forward = torch.compile(model.forward, backend="attnopt",
                                  options={"inner": "eager", "kernels": "triton"})
    cache = PagedKVCache(model.config, max_tokens=64, block_size=4, max_seq_len=32)
    assert torch.equal(generate(model, inputs, cache), want)
    calls = [line for r in attnopt.reports() for line in r.passes[-1].after
             if "attnopt.paged_attention(" in line]
    assert len(calls) == 2 * LAYERS and all("'triton'" in line for line in calls)


def test_a_full_pool_is_an_error_in_compiled_code_too():
    model = compiled(build("llama"))
    cache = PagedKVCache(model.config, max_tokens=16, block_size=4, max_seq_len=32)
    with pytest.raises(RuntimeError, match="PagedKVCache is full"):
        generate(model, prompts(2, 7, pad=0), cache)


def test_static_cache_is_read_up_to_its_length():
    model = build("llama")
    inputs = prompts(2, 7, pad=3)
    want = generate(model, inputs)
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    assert torch.equal(generate(compiled(model), inputs, cache), want)
    reports = attnopt.reports()
    assert all(r.counts["kv_cache"] == LAYERS for r in reports)
    rewritten = [line for r in reports for line in r.passes[-1].after
                 if "attnopt.paged_attention(" in line]
    assert len(rewritten) == LAYERS * len(reports)


def test_dynamic_cache_is_left_alone_with_its_reason():
    model = build("llama")
    inputs = prompts(2, 7, pad=3)
    want = generate(model, inputs)
    assert torch.equal(generate(compiled(model), inputs), want)
    decode = [r for r in attnopt.reports() if r.pass_record("kv_cache").rejected]
    assert decode and all(r.counts["kv_cache"] == 0 for r in attnopt.reports())
    assert all("DynamicCache" in reason and "PagedKVCache" in reason
               for r in decode for reason in r.pass_record("kv_cache").rejected)
