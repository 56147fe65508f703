"""A paged, GQA-native KV cache for transformers' `generate`, read in place by
`attnopt::paged_attention`.

    from attnopt.cache import PagedKVCache

    cache = PagedKVCache(model.config, max_tokens=4096)            # block_size=16
    out = model.generate(**inputs, max_new_tokens=64, cache=cache)  # < 5.24: past_key_values=
    cache = PagedKVCache(model.config, max_tokens=4096, int8=True)  # about half of fp16

(`attnopt.compat.with_cache(model, cache)` gives the keyword the installed transformers takes.)
One cache serves one `generate` call at a time; `cache.reset()` empties it for the next without
giving back its memory. It has N sequence slots (`batch_size=N`, or the first batch's size) and
serves any batch of b <= N sequences in its first b slots, the others staying empty.

Misuse is refused at the first update with a `PagedKVCacheError` (a ValueError) saying in one
sentence what to change: a batch larger than N, or K/V whose dtype, device, heads or head dim
are not those the pools were allocated for. Under torch.compile it leaves no compiled state
behind, so a corrected cache compiles and decodes as if the failed attempt never happened.

Layout. Each attention layer owns a K pool and a V pool, [num_blocks, block_size, Hkv, D]
(token-major "NHD", as vLLM's flash-attention backend): K/V are stored once per KV head (GQA-
native: never repeated for the query heads), and one token of one sequence is one contiguous
[Hkv, D] row, so appending tokens is a single indexed copy of the new rows — the
[B, L, Hkv, D] layout the K/V projections produce — and the kernel reads each key's head
vector as D contiguous elements. The pools are allocated once, at the first `update`, sized by
`max_tokens`, and never reallocated or copied: sequences grow by whole blocks taken from a free
list, so each sequence has at most one partly filled block (its last), and finishing or
cropping a sequence gives whole blocks back. All layers share one block table [B,
max_blocks_per_seq] (int32) and the block ids in it: the first layer to reach a new block
allocates it, in every layer's pool at once. Each layer keeps its own per-sequence lengths
`seq_lens` [B] (int32; layers are updated one after another within a forward pass).

Writes. `update` writes the new tokens in place with one `index_copy_` per pool into the
flattened [num_blocks · block_size, Hkv, D] view, at slots computed on the device from the block
table and seq_lens (`slot_mapping`). A plain ATen indexed write rather than an
`attnopt::kv_cache_write` op: it is one kernel on CPU and CUDA already, deterministic (each slot
is written once), and Dynamo, functionalization and Inductor know its in-place semantics, so a
graph that writes the cache needs no custom mutating op with its own fake and functional
variants. A fused quantize-and-write kernel is the one thing an op would add (int8 mode takes
a few elementwise kernels today).

Reads. Unmodified transformers attention needs contiguous K/V, so `update` returns them
gathered out of the blocks by `attnopt::paged_gather`: that copy is the SLOW FALLBACK, kept so
that the model works unchanged, and the kv_cache pass replaces the attention that reads it with
`attnopt::paged_attention`, which reads the pools in place. In eager mode the gather is exact
([B, Hkv, L, D], L the cached length). Under torch.compile it is a static-cache view instead:
[B, Hkv, capacity, D] with zeros past each sequence's length, and `get_mask_sizes` reports the
capacity, so every decode step has the same shapes and never recompiles. transformers' causal
mask hides the positions past the current token, as it does for its own StaticCache.

Bookkeeping on the device. The lengths, the blocks each sequence holds and the free list are
tensors, and blocks are allocated by tensor arithmetic (`_reserve`): no Python int changes from
one step to the next, so nothing in a compiled graph is specialised on a length, and no step
reads the device. Running out of blocks is checked by `torch._assert_async` (an error at the
next synchronisation on CUDA, at once on CPU). The host-side views (`blocks`, `free_blocks`,
`seq_lens_host`, the byte counts) read the device and are meant for between steps.

int8 (`int8=True`). K and V are stored as int8 with one float32 scale per (token, KV head):
scale = max|x| / 127 over the head's D values, code = round(x / scale). Per token, because a
token is quantized once, when written, and never touched again: a per-block scale would have to
be re-derived (and the block's earlier tokens requantized) whenever a new token's range
exceeds it, and a per-head static scale needs calibration data. Per head, because heads differ
widely in range (a few outlier heads would cost the others their precision). The scales cost
4 / D bytes per code byte (3% for D = 128: 1.03 bytes per element against 2 for fp16). Reads
dequantize: code · scale, rounded to the model dtype (`reference.dequantize_kv`), in registers
in the kernel.

Multi-head latent attention (DeepSeek-V2/V3: a config with `kv_lora_rank`). transformers'
DeepSeek attention hands the cache its compressed latent c_kv [B, 1, L, kv_lora_rank] as K and
its shared rotary key [B, 1, L, qk_rope_head_dim] as V, so each layer's pools are one "head" of
kv_lora_rank and of qk_rope_head_dim: kv_lora_rank + qk_rope_head_dim numbers per token (576
for DeepSeek-V3, against 2 · 128 heads · 128 for the expanded K/V), allocated up front from
such a config too (`cached_shape`). Uncompiled, the model expands the gathered latent through
kv_b_proj as it always does; compiled, the mla pass (`attnopt/passes/mla.py`) absorbs kv_b_proj
into the query and the output and reads the pools in place with
`attnopt::paged_latent_attention`.

Not supported (NotImplementedError): beam search (reordering or repeating sequences would need
copy-on-write block sharing), layer types other than (sliding-window or chunked) softmax
attention, offloading. Sliding-window layers keep their whole history: still exact, since the
model's mask hides what lies outside the window, but not memory-minimal.
"""

from __future__ import annotations

import functools
import math
from typing import NoReturn

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.paged_gather)

INT8_MAX = 127
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes and float32 scales of x [..., D], one scale per vector of D:
    x ≈ codes · scale[..., None] (`reference.dequantize_kv`). All-zero vectors get scale 0."""
    xf = x.float()
    scale = xf.abs().amax(-1) / INT8_MAX
    codes = (xf / torch.where(scale > 0, scale, 1.0)[..., None]).round_()
    return codes.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def slot_mapping(block_table: Tensor, seq_lens: Tensor, num_new: int, block_size: int) -> Tensor:
    """The pool slots (block · block_size + row) of the next `num_new` tokens of every sequence:
    [B, num_new] int64, token t of sequence b going to position seq_lens[b] + t. Device math
    only; the blocks must already be in the table."""
    pos = seq_lens.long()[:, None] + torch.arange(num_new, device=seq_lens.device)
    blocks = block_table.long().gather(1, pos // block_size)
    return blocks * block_size + pos % block_size


class PagedKVCacheError(ValueError, AssertionError):
    """A cache used in a way it was not made for; the message says what to change.

    It is a ValueError to the caller. It is also an AssertionError because of where it is
    raised: inside the model's forward, which torch.compile traces. A plain exception raised
    there is a graph break Dynamo cannot resume from in a nested frame, and Dynamo then runs
    the compiled function and every function it inlined uncompiled for the rest of the
    process, so that a corrected cache would silently decode unoptimised. Raised from a
    function Dynamo runs while tracing (`_refuse`), an AssertionError is one of the errors it
    passes on unchanged and unwrapped, leaving no compiled state behind: the next call, with a
    valid cache, compiles afresh. Dynamo does append the stack it traced to the exception's
    args; the message stays the one sentence (the traceback shows where it was raised)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@torch.compiler.assume_constant_result
def _refuse(message: str) -> NoReturn:
    """Raise PagedKVCacheError(message). Dynamo runs (does not trace) a function marked
    assume_constant_result, so the error is raised at trace time as it is (see the class)."""
    raise PagedKVCacheError(message)


def _first(t: Tensor, rows: int) -> Tensor:
    """The first `rows` rows of a per-sequence tensor; `t` itself when that is all of it (the
    graph of a full batch holds no slice)."""
    return t if t.shape[0] == rows else t[:rows]


def _static_addresses(*tensors: Tensor | None) -> None:
    """Tell Dynamo these tensors keep their address for the cache's life (updated in place
    only), as StaticCache does: compiled graphs and CUDA graphs may bake them in."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            if t is not None:
                torch._dynamo.mark_static_address(t)


class PagedLayer(CacheLayerMixin):
    """One layer of a `PagedKVCache`: its K/V pools (and int8 scales) and its sequences'
    lengths. The block table and the free list belong to the cache."""

    # False keeps `generate` from compiling the model itself with Inductor's defaults when it
    # sees this cache: compile it with attnopt (README, "Decoding").
    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, cache: PagedKVCache):
        super().__init__()
        self.cache = cache
        self.k_pool: Tensor | None = None
        self.v_pool: Tensor | None = None
        self.k_scale: Tensor | None = None
        self.v_scale: Tensor | None = None
        self.seq_lens: Tensor | None = None  # [B] int32, on the pools' device

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Allocate the pools, sized by the cache's max_tokens, from the first K/V's batch size,
        heads, head dims, dtype and device."""
        c = self.cache
        c._set_batch_size(key_states.shape[0], key_states.device)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = c.block_table.shape[0], key_states.shape[1]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        store = torch.int8 if c.int8 else self.dtype
        shape = (c.num_blocks, c.block_size, self.num_heads)
        self.k_pool = torch.zeros((*shape, self.k_head_dim), dtype=store, device=self.device)
        self.v_pool = torch.zeros((*shape, self.v_head_dim), dtype=store, device=self.device)
        if c.int8:
            self.k_scale = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self.v_scale = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.seq_lens = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)
        _static_addresses(self.k_pool, self.v_pool, self.k_scale, self.v_scale, self.seq_lens)
        self.is_initialized = True

    def _check_matches(self, key_states: Tensor, value_states: Tensor) -> None:
        """Refuse K/V the pools were not allocated for (`batch_size`/`dtype`/`device` given up
        front, or a first batch that differed), before anything is written."""
        b, heads, _, k_dim = key_states.shape
        if b > self.batch_size:
            _refuse(f"PagedKVCache has {_slots(self.batch_size)} and got a batch of {b}: "
                    f"create it with batch_size={b} or more (it serves any batch up to its "
                    "batch_size)")
        if key_states.dtype != self.dtype:
            _refuse(f"PagedKVCache was allocated for {_name(self.dtype)} K/V and the model "
                    f"gives {_name(key_states.dtype)}: create it with "
                    f"dtype={key_states.dtype} (the model's dtype)")
        if key_states.device != self.device:
            _refuse(f"PagedKVCache was allocated on {self.device} and the model's K/V are on "
                    f"{key_states.device}: create it with device='{key_states.device}'")
        if (heads, k_dim, value_states.shape[-1]) != (self.num_heads, self.k_head_dim,
                                                     self.v_head_dim):
            _refuse(f"PagedKVCache was allocated for {self.num_heads} KV heads of "
                    f"{self.k_head_dim} and the model gives {heads} of {k_dim}: create it with "
                    "this model's config")

    @property
    def lens(self) -> list[int]:
        """Each sequence slot's cached length, read from the device."""
        return self.seq_lens.tolist() if self.is_initialized else []

    # --- writing -------------------------------------------------------------------------

    def append(self, key_states: Tensor, value_states: Tensor,
               num_new: list[int] | None = None) -> None:
        """Write new tokens in place: key_states [B, Hkv, n, D], value_states [B, Hkv, n, Dv].
        With `num_new` (eager only), sequence b takes only its first num_new[b] tokens (ragged
        appends, e.g. speculative decoding); otherwise every sequence takes all n."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_matches(key_states, value_states)
        b, _, n, _ = key_states.shape
        if (b < self.batch_size and not torch.compiler.is_compiling()
                and self.seq_lens[b:].any()):
            raise PagedKVCacheError(f"PagedKVCache slots {b} to {self.batch_size - 1} hold tokens "
                                    f"of an earlier, larger batch: call reset() before a batch "
                                    f"of {b}")
        if n == 0:
            return
        keys, values = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [B, n, H, D]
        seq_lens = _first(self.seq_lens, b)
        table = _first(self.cache.block_table, b)
        if num_new is None:
            new_lens = seq_lens + n
            self.cache._reserve(new_lens, n)
            slots = slot_mapping(table, seq_lens, n, self.cache.block_size)
        else:
            counts = torch.tensor([int(c) for c in num_new])
            if counts.shape != (b,) or not ((counts >= 0) & (counts <= n)).all():
                raise ValueError(f"num_new must hold {b} counts in [0, {n}], got {num_new}")
            counts = counts.to(self.device, torch.int32)
            new_lens = seq_lens + counts
            self.cache._reserve(new_lens, n)
            slots = slot_mapping(table, seq_lens, n, self.cache.block_size)
            take = torch.arange(n, device=self.device)[None, :] < counts[:, None]
            slots, keys, values = slots[take], keys[take], values[take]
        slots = slots.reshape(-1)
        self._write(self.k_pool, self.k_scale, slots, keys)
        self._write(self.v_pool, self.v_scale, slots, values)
        seq_lens.copy_(new_lens)

    @staticmethod
    def _write(pool: Tensor, scale: Tensor | None, slots: Tensor, x: Tensor) -> None:
        # Indexed by (block, row) on the pool itself, not on a flattened view: a compiled graph
        # then holds index_put(pool, ...) followed by the copy back into the input, which is
        # the pattern Inductor's reinplacing (and attnopt's, for inner="eager") turns into one
        # in-place write of the new rows rather than a copy of the pool.
        index = (slots // pool.shape[1], slots % pool.shape[1])
        rows = x.reshape(-1, *pool.shape[2:])
        if scale is None:
            pool.index_put_(index, rows.to(pool.dtype))
        else:
            codes, s = quantize_int8(rows)
            pool.index_put_(index, codes)
            scale.index_put_(index, s)

    # --- reading -------------------------------------------------------------------------

    def gather(self, batch: int | None = None) -> tuple[Tensor, Tensor]:
        """SLOW FALLBACK for unmodified attention: the cached K/V of the first `batch` sequence
        slots (default all) as contiguous [B, Hkv, L, D] / [B, Hkv, L, Dv] tensors in the model
        dtype (int8 dequantized), copied out of the blocks. Eager: L is the cached length, the
        same for every sequence (which `generate` keeps: padding is cached like any token).
        Compiled: L is the capacity, zeros past each sequence's length. The kv_cache pass
        replaces the attention reading this copy with `attnopt::paged_attention`, which reads
        the pools."""
        batch = self.batch_size if batch is None else batch
        table = _first(self.cache.block_table, batch)
        seq_lens = _first(self.seq_lens, batch)
        if not torch.compiler.is_compiling():
            lens = seq_lens.tolist()
            if any(n != lens[0] for n in lens):
                raise NotImplementedError(
                    f"PagedKVCache: the sequences have different lengths {lens}; the eager "
                    "fallback returns rectangular K/V, read ragged caches with "
                    "attnopt::paged_attention")
            length = lens[0]
            table = table[:, :math.ceil(length / self.cache.block_size)]
        else:
            length = self.cache.capacity
        gather = torch.ops.attnopt.paged_gather
        return (gather(self.k_pool, table, seq_lens, self.k_scale, self.dtype)[:, :, :length],
                gather(self.v_pool, table, seq_lens, self.v_scale, self.dtype)[:, :, :length])

    # --- the transformers layer interface ------------------------------------------------

    def update(self, key_states: Tensor, value_states: Tensor, *args,
               **kwargs) -> tuple[Tensor, Tensor]:
        """Append the new tokens in place and return the batch's cached K/V (the slow
        fallback)."""
        self.append(key_states, value_states)
        return self.gather(key_states.shape[0])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if torch.compiler.is_compiling():
            return self.cache.capacity, 0
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int | Tensor:
        """The longest sequence's length: an int in eager mode, a tensor under torch.compile
        (as StaticCache's), which is what keeps the graph free of a length."""
        if not self.is_initialized:
            return 0
        if torch.compiler.is_compiling():
            return self.seq_lens.max()
        return int(self.seq_lens.max())

    def get_max_length(self) -> int:
        return self.cache.capacity

    def reset(self) -> None:
        """Lengths to 0; the pools stay allocated (their contents are dead, not zeroed)."""
        if self.is_initialized:
            self.seq_lens.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got "
                             f"{tokens_to_remove}")
        if self.is_initialized:
            self.seq_lens.add_(tokens_to_remove).clamp_(min=0)

    def offload(self):
        raise NotImplementedError("PagedKVCache does not offload")

    def prefetch(self):
        raise NotImplementedError("PagedKVCache does not offload")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("PagedKVCache does not support beam search yet")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PagedKVCache does not support repeating sequences yet")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("PagedKVCache does not support selecting sequences yet")


class PagedKVCache(Cache):
    """A transformers `Cache` whose layers store K/V in fixed-size blocks of preallocated
    pools; see the module docstring for the layout and `generate` usage.

    Args:
        config: the model's config (its decoder text config is used); gives the number of
            layers and checks their types. Without it pass `num_layers`, or neither and layers
            are added as `update` reaches them.
        max_tokens: tokens the pool of each layer holds, summed over the batch (rounded up to
            whole blocks). Every sequence may leave its last block partly empty, so plan
            batch · (block_size - 1) tokens of slack. Running out raises a RuntimeError.
        block_size: tokens per block (16 by default; any size works, powers of two suit the
            kernel best).
        max_seq_len: the longest one sequence may grow (the block table's width); default
            max_tokens. Compiled decoding reads masks of this length: keep it near what
            generation needs.
        int8: store K/V as int8 with per (token, head) float32 scales.
        batch_size, dtype, device: allocate the pools now, with this many sequence slots, for
            the config's KV heads (needs config); dtype and device must be the model's (the
            first update checks them). Otherwise the first update allocates them, with as many
            slots as its batch has; under torch.compile that first prefill is a graph of its
            own, so a compiled model that decodes into fresh caches should allocate up front
            (or reuse a cache: `reset()`). Any batch up to the slots is served.
    """

    def __init__(self, config=None, *, max_tokens: int, block_size: int = 16,
                 max_seq_len: int | None = None, num_layers: int | None = None,
                 int8: bool = False, batch_size: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        if max_tokens <= 0 or block_size <= 0:
            raise ValueError(f"max_tokens and block_size must be positive, got {max_tokens} "
                             f"and {block_size}")
        self.block_size = block_size
        self.num_blocks = math.ceil(max_tokens / block_size)
        self.max_blocks_per_seq = math.ceil((max_seq_len or max_tokens) / block_size)
        self.int8 = int8
        # On the device, from the first update: the block table [B, max_blocks_per_seq], the
        # number of blocks each sequence holds [B] (its first `held` table entries), and the
        # free list, a stack: free_ids[:free_count] are free, the last one is taken first.
        self.block_table: Tensor | None = None
        self.held: Tensor | None = None
        self.free_ids: Tensor | None = None
        self.free_count: Tensor | None = None
        if config is not None:
            config = config.get_text_config(decoder=True)
            num_layers = config.num_hidden_layers
            bad = {t for t in getattr(config, "layer_types", None) or ()
                   if t not in _ATTENTION_LAYER_TYPES}
            if bad:
                raise NotImplementedError(f"PagedKVCache holds softmax-attention layers only, "
                                          f"the config has layer types {sorted(bad)}")
        if num_layers is not None:
            super().__init__(layers=[PagedLayer(self) for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=functools.partial(PagedLayer, self))
        if batch_size is not None:
            if config is None:
                raise ValueError("PagedKVCache(batch_size=...) allocates from the config's KV "
                                 "heads and head dim: pass the model's config too")
            heads, k_dim, v_dim = cached_shape(config)
            dtype, device = dtype or torch.get_default_dtype(), torch.device(device or "cpu")
            # Not Cache.early_initialization, which gives K and V one head dim: an MLA layer's
            # latent and rotary key differ.
            for layer in self.layers:
                layer.lazy_initialization(
                    torch.zeros((batch_size, heads, 0, k_dim), dtype=dtype, device=device),
                    torch.zeros((batch_size, heads, 0, v_dim), dtype=dtype, device=device))

    def __repr__(self):
        return (f"PagedKVCache(layers={len(self.layers)}, block_size={self.block_size}, "
                f"num_blocks={self.num_blocks}, int8={self.int8}, "
                f"seq_lens={self.seq_lens_host()})")

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold: the block table's width in tokens."""
        return self.max_blocks_per_seq * self.block_size

    # --- blocks --------------------------------------------------------------------------

    def _set_batch_size(self, batch_size: int, device: torch.device) -> None:
        """Allocate the per-sequence bookkeeping for `batch_size` slots, once."""
        if self.block_table is None:
            self.block_table = torch.zeros((batch_size, self.max_blocks_per_seq),
                                           dtype=torch.int32, device=device)
            self.held = torch.zeros(batch_size, dtype=torch.int32, device=device)
            # Reversed, so that blocks are taken lowest id first.
            self.free_ids = torch.arange(self.num_blocks - 1, -1, -1, dtype=torch.int32,
                                         device=device)
            self.free_count = torch.full((), self.num_blocks, dtype=torch.int32, device=device)
            _static_addresses(self.block_table, self.held, self.free_ids, self.free_count)

    def _reserve(self, lengths: Tensor, max_new_tokens: int) -> None:
        """Make sure sequence b holds the blocks for lengths[b] tokens, having grown by at most
        `max_new_tokens`: the missing blocks are popped off the free list and written into the
        table. Tensor arithmetic only (no host sync, no data-dependent shapes), so compiled
        graphs run it as it is; idempotent, so every layer may call it and the first one to
        need a block takes it for all."""
        bs, width = self.block_size, self.max_blocks_per_seq
        held = _first(self.held, lengths.shape[0])  # a batch uses the first slots
        table = _first(self.block_table, lengths.shape[0])
        need = (lengths + bs - 1) // bs
        count = (need - held).clamp(min=0)  # blocks to take, per sequence
        first = torch.cumsum(count, 0) - count  # where each sequence's run starts in the pops
        # A sequence grows by at most ceil(max_new_tokens / bs) blocks (its partly filled block
        # absorbs the rest), and no more than the table holds.
        j = torch.arange(min(-(-max_new_tokens // bs), width), device=lengths.device)
        take = j < count[:, None]  # [B, M]
        pick = self.free_count - 1 - (first[:, None] + j)  # stack positions, top first
        torch._assert_async(
            (need <= width).all() & (count.sum() <= self.free_count),
            "PagedKVCache is full: a sequence outgrew max_seq_len, or the pool ran out of "
            "blocks; raise max_tokens / max_seq_len")
        ids = self.free_ids[pick.clamp(min=0).long()]
        # Columns held + j are distinct, and taken ones lie in [held, held + count); the
        # others wrap (mod width) to columns below `held` and write back what is there, so
        # the scatter has no duplicate index and needs no mask.
        cols = ((held[:, None] + j) % width).long()
        table.scatter_(1, cols, torch.where(take, ids, table.gather(1, cols)))
        self.free_count.sub_(count.sum())
        held.copy_(torch.maximum(held, need))

    def _give_back(self, keep: list[int]) -> None:
        """Eager: sequence b keeps its first keep[b] blocks; the rest go back on the free list
        (pushed in reverse, so they are taken again in table order)."""
        held, top = self.held.tolist(), int(self.free_count)
        for b, (n, k) in enumerate(zip(held, keep, strict=True)):
            if n > k:
                back = self.block_table[b, k:n].flip(0)
                self.free_ids[top:top + len(back)] = back
                top += len(back)
                self.held[b] = k
        self.free_count.fill_(top)

    def _release_unused(self) -> None:
        """Give back the blocks past what each sequence's longest layer still needs."""
        lengths = [layer.lens for layer in self._initialized()]
        self._give_back([math.ceil(max(col, default=0) / self.block_size)
                         for col in zip(*lengths, strict=True)] if lengths else [])

    def _initialized(self) -> list[PagedLayer]:
        return [layer for layer in self.layers if layer.is_initialized]

    def release(self, seq: int) -> None:
        """Empty sequence `seq` in every layer and give its blocks back (e.g. when it has
        finished and its slot is reused)."""
        for layer in self._initialized():
            layer.seq_lens[seq] = 0
        self._release_unused()

    # --- host-side views (they read the device) ------------------------------------------

    @property
    def blocks(self) -> list[list[int]]:
        """The blocks each sequence holds, in order."""
        if self.block_table is None:
            return []
        return [row[:n] for row, n in zip(self.block_table.tolist(), self.held.tolist(),
                                          strict=True)]

    @property
    def free_blocks(self) -> list[int]:
        """The free blocks; the last is taken first."""
        return [] if self.free_ids is None else self.free_ids[:int(self.free_count)].tolist()

    def seq_lens_host(self) -> list[int]:
        """Each sequence slot's length in its longest layer (all layers agree between steps);
        slots a smaller batch left unused are 0."""
        lengths = [layer.lens for layer in self._initialized()]
        return [max(col) for col in zip(*lengths, strict=True)] if lengths else []

    # --- memory accounting ---------------------------------------------------------------

    def _bytes_per_token(self, layer: PagedLayer) -> int:
        """Bytes one cached token takes in one layer: K and V codes (and int8 scales)."""
        per = layer.k_pool[0, 0].nbytes + layer.v_pool[0, 0].nbytes
        if self.int8:
            per += layer.k_scale[0, 0].nbytes + layer.v_scale[0, 0].nbytes
        return per

    def bytes_reserved(self) -> int:
        """The preallocated pools of every initialized layer: fixed from the first update."""
        return sum(self.num_blocks * self.block_size * self._bytes_per_token(layer)
                   for layer in self._initialized())

    def bytes_allocated(self) -> int:
        """The blocks handed out to sequences, in every initialized layer."""
        blocks = int(self.held.sum()) if self.held is not None else 0
        return sum(blocks * self.block_size * self._bytes_per_token(layer)
                   for layer in self._initialized())

    def bytes_ideal(self) -> int:
        """What exactly the cached tokens take: no partly filled blocks."""
        return sum(sum(layer.lens) * self._bytes_per_token(layer)
                   for layer in self._initialized())

    # --- the transformers cache interface ------------------------------------------------

    def reset(self) -> None:
        """Empty every sequence and give all blocks back; the pools and the block table keep
        their memory (and addresses)."""
        super().reset()
        if self.held is not None:
            self._give_back([0] * len(self.held))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._release_unused()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("PagedKVCache does not support beam search yet")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            raise NotImplementedError("PagedKVCache does not support repeating sequences yet")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("PagedKVCache does not support selecting sequences yet")


def cached_shape(config) -> tuple[int, int, int]:
    """(heads, K width, V width) of what one token of one layer of `config`'s model hands to
    the cache: its KV heads and head dim for K and V; for multi-head latent attention
    (DeepSeek-V2/V3 and their descendants: a config with `kv_lora_rank`) one head holding the
    latent (kv_lora_rank wide) as K and the rotary key (qk_rope_head_dim) as V, as
    transformers' `DeepseekV3Attention` passes them to `update`."""
    config = config.get_text_config(decoder=True)
    if getattr(config, "kv_lora_rank", None):
        return 1, config.kv_lora_rank, config.qk_rope_head_dim
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = (getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads)
    return heads, head_dim, head_dim


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _slots(n: int) -> str:
    return f"{n} sequence slot{'' if n == 1 else 's'}"
