"""attnopt.cache.PagedKVCache: greedy `generate` on a tiny random Llama gives exactly the tokens
of transformers' DynamicCache (eager, not compiled); blocks are allocated from the free list one
at a time and never reallocated; the cached K/V read through the block table by
attnopt::paged_attention agree with attention over the concatenated K/V; int8 within a stated
tolerance."""

import pytest
import torch

from attnopt.backends import ops, reference
from attnopt.backends.triton import paged_attention as kernel
from attnopt.cache import PagedKVCache, PagedKVCacheError, quantize_int8
from attnopt.compat import with_cache

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def prompts(length: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(length)
    ids = torch.randint(3, 128, (2, length))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding on the second sequence
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, inputs, cache=None):
    return model.generate(**inputs, max_new_tokens=8, do_sample=False,
                          **with_cache(model, cache))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("length", [5, 11])
def test_generate_gives_the_dynamic_cache_tokens(llama, length, attn):
    llama.config._attn_implementation = attn
    inputs = prompts(length)
    cache = PagedKVCache(llama.config, max_tokens=64, block_size=4)
    assert torch.equal(generate(llama, inputs, cache), generate(llama, inputs))
    # The prompt and 7 fed-back tokens (the 8th is never fed) are cached per sequence.
    assert cache.seq_lens_host() == [length + 7] * 2
    assert cache.get_seq_length() == length + 7


def test_a_cache_for_n_sequences_serves_any_smaller_batch(llama):
    # Allocated for 4 sequences up front (a server's cache), it decodes 2 prompts, then after
    # reset() 1 prompt, in its first slots, with exactly the DynamicCache's tokens; the unused
    # slots stay empty.
    llama.config._attn_implementation = "sdpa"
    cache = PagedKVCache(llama.config, max_tokens=128, block_size=4, batch_size=4,
                         dtype=torch.float32)
    pair = prompts(6)
    assert torch.equal(generate(llama, pair, cache), generate(llama, pair))
    assert cache.seq_lens_host() == [13, 13, 0, 0]
    assert [len(b) for b in cache.blocks] == [4, 4, 0, 0]
    cache.reset()
    one = {k: v[:1] for k, v in prompts(9).items()}
    assert torch.equal(generate(llama, one, cache), generate(llama, one))
    assert cache.seq_lens_host() == [16, 0, 0, 0]
    # Without reset(), a smaller batch would read the slots the larger one left behind.
    with pytest.raises(PagedKVCacheError, match=r"slots 1 to 3 hold tokens of an earlier, "
                                                r"larger batch: call reset\(\) before"):
        cache.reset()
        generate(llama, pair, cache)
        generate(llama, one, cache)


@pytest.mark.parametrize("wrong", ["batch", "dtype", "heads"])
def test_a_cache_made_for_other_kv_is_refused_in_one_sentence(llama, wrong):
    llama.config._attn_implementation = "sdpa"
    made = dict(max_tokens=64, block_size=4, batch_size=2, dtype=torch.float32)
    config = llama.config
    if wrong == "batch":
        made["batch_size"] = 1
        message = (r"PagedKVCache has 1 sequence slot and got a batch of 2: create it with "
                   r"batch_size=2 or more")
    elif wrong == "dtype":
        made["dtype"] = torch.bfloat16
        message = (r"PagedKVCache was allocated for bfloat16 K/V and the model gives float32: "
                   r"create it with dtype=torch.float32 \(the model's dtype\)")
    else:  # another model's config: 4 KV heads of 8 where the model has 2 of 16
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=4)
        message = (r"PagedKVCache was allocated for 4 KV heads of 8 and the model gives 2 of "
                   r"16: create it with this model's config")
    cache = PagedKVCache(config, **made)
    with pytest.raises(PagedKVCacheError, match=message) as refused:
        generate(llama, prompts(5), cache)
    assert isinstance(refused.value, ValueError)
    assert cache.seq_lens_host() == [0] * made["batch_size"]  # refused before any write


def test_sliding_window_layers_keep_their_history_and_stay_exact():
    # Mistral with a 4-token window: the paged layers keep every token, the model's sliding
    # mask hides those outside the window, and the tokens are the DynamicCache's (whose layers
    # drop them).
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, pad_token_id=0, sliding_window=4)
    model = transformers.MistralForCausalLM(config).eval()
    inputs = prompts(9)
    cache = PagedKVCache(config, max_tokens=64, block_size=4)
    assert torch.equal(generate(model, inputs, cache), generate(model, inputs))
    assert cache.get_seq_length() == 16


def test_int8_logits_within_tolerance(llama):
    # Prefill 8 tokens, then decode 4 teacher-forced: logits within 1e-2 of the DynamicCache's
    # (max |logit| is about 0.6; observed 3.5e-3). Per (token, head) int8 codes are within
    # max|x| / 254 of x.
    llama.config._attn_implementation = "sdpa"
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    def logits(cache):
        with torch.no_grad():
            out = [llama(input_ids=ids[:, :8], **with_cache(llama, cache)).logits]
            out += [llama(input_ids=ids[:, i:i + 1], **with_cache(llama, cache)).logits
                    for i in range(8, 12)]
        return torch.cat(out, 1)

    want = logits(transformers.DynamicCache(config=llama.config))
    got = logits(PagedKVCache(llama.config, max_tokens=64, block_size=4, int8=True))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
    exact = logits(PagedKVCache(llama.config, max_tokens=64, block_size=4))
    assert torch.equal(exact, want)


def kv(batch, n, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n, dim, generator=g),
            torch.randn(batch, heads, n, dim, generator=g))


def test_blocks_grow_one_at_a_time_and_are_never_reallocated():
    cache = PagedKVCache(num_layers=2, max_tokens=48, block_size=4)
    per_token = 2 * 2 * 8 * 4  # K and V, 2 heads of 8 fp32, per layer
    block = 4 * per_token * 2  # a block in both layers
    history = [[], []]
    for step, n in enumerate([7, 1, 1, 1, 1, 3, 1]):
        for layer in range(2):
            k, v = kv(3, n, seed=10 * step + layer)
            history[layer].append((k, v))
            keys, values = cache.update(k, v, layer)
            assert torch.equal(keys, torch.cat([k for k, _ in history[layer]], 2))
            assert torch.equal(values, torch.cat([v for _, v in history[layer]], 2))
        if step == 0:
            pools = [(x.k_pool.data_ptr(), x.v_pool.data_ptr()) for x in cache.layers]
        length = cache.get_seq_length()
        # Exactly ceil(length / block_size) blocks per sequence: one partial block at most.
        assert [len(b) for b in cache.blocks] == [-(-length // 4)] * 3
        assert 0 <= cache.bytes_allocated() - cache.bytes_ideal() < 3 * block
        assert cache.bytes_ideal() == 3 * length * per_token * 2
        assert cache.bytes_reserved() == 12 * block
    assert [(x.k_pool.data_ptr(), x.v_pool.data_ptr()) for x in cache.layers] == pools
    # Blocks are handed out in first-come order, interleaved between sequences as they grow.
    ids = sorted(i for b in cache.blocks for i in b)
    assert ids == list(range(len(ids)))
    assert len(cache.free_blocks) == cache.num_blocks - len(ids)


def test_ragged_appends_release_crop_reset_and_a_full_pool():
    cache = PagedKVCache(num_layers=1, max_tokens=32, block_size=4)
    layer = cache.layers[0]
    k, v = kv(2, 6)
    layer.append(k, v, num_new=[6, 1])
    assert layer.lens == [6, 1] and layer.seq_lens.tolist() == [6, 1]
    assert [len(b) for b in cache.blocks] == [2, 1]
    with pytest.raises(NotImplementedError, match="different lengths"):
        layer.gather()
    cache.release(0)
    assert layer.lens == [0, 1] and len(cache.free_blocks) == 7
    layer.append(*kv(2, 5), num_new=[5, 5])
    cache.crop(-2)
    assert layer.lens == [3, 4] and [len(b) for b in cache.blocks] == [1, 1]
    with pytest.raises(RuntimeError, match="full"):
        layer.append(*kv(2, 16))
    cache.reset()
    assert cache.get_seq_length() == 0 and len(cache.free_blocks) == 8
    with pytest.raises(ValueError, match="has 2 sequence slots and got a batch of 3"):
        cache.update(*kv(3, 1), 0)


@pytest.mark.parametrize("int8", [False, True])
def test_paged_attention_reads_the_cache_in_place(int8):
    # What the kv_cache pass will emit: after the cache took each sequence's tokens (ragged
    # appends included), the op over its pools and block table equals attention over the
    # concatenated (dequantized) K/V, on every path.
    torch.manual_seed(0)
    cache = PagedKVCache(num_layers=1, max_tokens=64, block_size=4, int8=int8)
    layer = cache.layers[0]
    ks = vs = [torch.empty(1, 2, 0, 16)] * 2
    for n, counts in [(9, [9, 4]), (1, None), (2, [2, 1])]:
        k, v = torch.randn(2, 2, n, 16), torch.randn(2, 2, n, 16)
        layer.append(k, v, num_new=counts)
        counts = counts or [n, n]
        ks = [torch.cat([ks[b], k[b:b + 1, :, :counts[b]]], 2) for b in range(2)]
        vs = [torch.cat([vs[b], v[b:b + 1, :, :counts[b]]], 2) for b in range(2)]
    assert layer.lens == [12, 6]
    q = torch.randn(2, 4, 2, 16)
    args = dict(q=q, k_pool=layer.k_pool, v_pool=layer.v_pool, block_table=cache.block_table,
                seq_lens=layer.seq_lens, scale=0.25, k_scale=layer.k_scale,
                v_scale=layer.v_scale)
    want = []
    for b in range(2):
        k, v = ks[b], vs[b]
        if int8:  # the stored values: codes times per (token, head) scales
            k, v = (reference.dequantize_kv(*quantize_int8(x), torch.float32) for x in (k, v))
        want.append(reference.attention(q[b:b + 1], k, v, None, True, 0.25))
    want = torch.cat(want)
    for got in (ops.paged_attention(**args), ops.paged_attention(**args, impl="reference"),
                kernel.paged_attention(**args, split_len=16, block_n=16)):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_int8_round_trip_error_bound():
    x = torch.randn(5, 3, 64) * torch.tensor([0.01, 1.0, 100.0])[:, None]
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.shape == (5, 3)
    err = (reference.dequantize_kv(codes, scale, torch.float32) - x).abs()
    assert (err <= scale[..., None] / 2 * (1 + 1e-5)).all()
    assert (quantize_int8(torch.zeros(2, 8))[0] == 0).all()


def test_unsupported_uses_are_refused(llama):
    llama.config._attn_implementation = "sdpa"
    cache = PagedKVCache(llama.config, max_tokens=64, block_size=4)
    with pytest.raises(NotImplementedError, match="beam search"):
        llama.generate(**prompts(5), max_new_tokens=2, num_beams=2, do_sample=False,
                       **with_cache(llama, cache))

    class HybridConfig:  # a hybrid model's config, as far as the cache reads it
        num_hidden_layers = 2
        layer_types = ("full_attention", "linear_attention")

        def get_text_config(self, decoder=True):
            return self

    with pytest.raises(NotImplementedError, match="layer types"):
        PagedKVCache(HybridConfig(), max_tokens=64)
