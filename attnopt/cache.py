"""A paged, GQA-native KV cache for transformers' `generate`, read in place by
`attnopt::paged_attention`.

    from attnopt.cache import PagedKVCache

    cache = PagedKVCache(model.config, max_tokens=4096)            # block_size=16
    out = model.generate(**inputs, max_new_tokens=64, past_key_values=cache)
    cache = PagedKVCache(model.config, max_tokens=4096, int8=True)  # about half of fp16

One cache serves one `generate` call (or one batch of sequences); `cache.reset()` empties it for
the next without giving back its memory.

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

Reads. Unmodified transformers attention needs contiguous K/V [B, Hkv, L, D], so `update`
returns them gathered from the blocks (`gather`). That copy is the SLOW FALLBACK, kept so that
eager models work unchanged; the kv_cache pass replaces it with `attnopt::paged_attention`,
which reads the pools in place. Host-side bookkeeping (lengths, the free list, the table) lives
in Python ints, so a step never reads the device.

int8 (`int8=True`). K and V are stored as int8 with one float32 scale per (token, KV head):
scale = max|x| / 127 over the head's D values, code = round(x / scale). Per token, because a
token is quantized once, when written, and never touched again: a per-block scale would have to
be re-derived (and the block's earlier tokens requantized) whenever a new token's range
exceeds it, and a per-head static scale needs calibration data. Per head, because heads differ
widely in range (a few outlier heads would cost the others their precision). The scales cost
4 / D bytes per code byte (3% for D = 128: 1.03 bytes per element against 2 for fp16). Reads
dequantize: code · scale, rounded to the model dtype (`reference.dequantize_kv`), in registers
in the kernel.

Not supported (NotImplementedError): beam search (reordering or repeating sequences would need
copy-on-write block sharing), layer types other than (sliding-window or chunked) softmax
attention, offloading. Sliding-window layers keep their whole history: still exact, since the
model's mask hides what lies outside the window, but not memory-minimal.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from attnopt.backends import reference

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

    # The gathered fallback's shapes change every step, so compiling it would recompile (or go
    # dynamic); the kv_cache pass replaces it with reads in place.
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
        self.lens: list[int] = []  # the same on the host

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Allocate the pools, sized by the cache's max_tokens, from the first K/V's batch size,
        heads, head dims, dtype and device."""
        c = self.cache
        c._set_batch_size(key_states.shape[0], key_states.device)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        store = torch.int8 if c.int8 else self.dtype
        shape = (c.num_blocks, c.block_size, self.num_heads)
        self.k_pool = torch.zeros((*shape, self.k_head_dim), dtype=store, device=self.device)
        self.v_pool = torch.zeros((*shape, self.v_head_dim), dtype=store, device=self.device)
        if c.int8:
            self.k_scale = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self.v_scale = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.seq_lens = torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)
        self.lens = [0] * self.batch_size
        _static_addresses(self.k_pool, self.v_pool, self.k_scale, self.v_scale, self.seq_lens)
        self.is_initialized = True

    # --- writing -------------------------------------------------------------------------

    def append(self, key_states: Tensor, value_states: Tensor,
               num_new: list[int] | None = None) -> None:
        """Write new tokens in place: key_states [B, Hkv, n, D], value_states [B, Hkv, n, Dv].
        With `num_new`, sequence b takes only its first num_new[b] tokens (ragged appends, e.g.
        speculative decoding); otherwise every sequence takes all n."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, n, _ = key_states.shape
        if b != self.batch_size:
            raise ValueError(f"PagedKVCache holds {self.batch_size} sequences, got K/V for {b} "
                             "(call reset() before a new batch)")
        counts = [n] * b if num_new is None else [int(c) for c in num_new]
        if len(counts) != b or not all(0 <= c <= n for c in counts):
            raise ValueError(f"num_new must hold {b} counts in [0, {n}], got {num_new}")
        if n == 0 or not any(counts):
            return
        new_lens = [length + c for length, c in zip(self.lens, counts, strict=True)]
        self.cache._reserve(new_lens)
        slots = slot_mapping(self.cache.block_table, self.seq_lens, n, self.cache.block_size)
        keys, values = key_states.transpose(1, 2), value_states.transpose(1, 2)  # [B, n, H, D]
        if num_new is not None:
            take = torch.arange(n)[None, :] < torch.tensor(counts)[:, None]
            take = take.to(slots.device)
            slots, keys, values = slots[take], keys[take], values[take]
        slots = slots.reshape(-1)
        self._write(self.k_pool, self.k_scale, slots, keys)
        self._write(self.v_pool, self.v_scale, slots, values)
        if num_new is None:
            self.seq_lens.add_(n)
        else:
            self.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        self.lens = new_lens

    @staticmethod
    def _write(pool: Tensor, scale: Tensor | None, slots: Tensor, x: Tensor) -> None:
        rows = x.reshape(-1, *pool.shape[2:])
        if scale is None:
            pool.view(-1, *pool.shape[2:]).index_copy_(0, slots, rows.to(pool.dtype))
        else:
            codes, s = quantize_int8(rows)
            pool.view(-1, *pool.shape[2:]).index_copy_(0, slots, codes)
            scale.view(-1, pool.shape[2]).index_copy_(0, slots, s)

    # --- reading -------------------------------------------------------------------------

    def gather(self) -> tuple[Tensor, Tensor]:
        """SLOW FALLBACK for unmodified attention: the cached K/V of every sequence as
        contiguous [B, Hkv, L, D] / [B, Hkv, L, Dv] tensors in the model dtype (int8
        dequantized), copied out of the blocks. Needs equal lengths across the batch (which
        `generate` keeps: padding is cached like any token). The kv_cache pass replaces this
        copy with `attnopt::paged_attention` reading the pools in place."""
        length = self.get_seq_length()
        if any(n != length for n in self.lens):
            raise NotImplementedError(
                f"PagedKVCache: the sequences have different lengths {self.lens}; the eager "
                "fallback returns rectangular K/V, read ragged caches with "
                "attnopt::paged_attention")
        ids = self.cache.block_table[:, :math.ceil(length / self.cache.block_size)].long()
        return (self._gather(self.k_pool, self.k_scale, ids, length),
                self._gather(self.v_pool, self.v_scale, ids, length))

    def _gather(self, pool: Tensor, scale: Tensor | None, ids: Tensor, length: int) -> Tensor:
        x = pool[ids].flatten(1, 2)[:, :length]
        if scale is not None:
            x = reference.dequantize_kv(x, scale[ids].flatten(1, 2)[:, :length], self.dtype)
        return x.transpose(1, 2).contiguous()

    # --- the transformers layer interface ------------------------------------------------

    def update(self, key_states: Tensor, value_states: Tensor, *args,
               **kwargs) -> tuple[Tensor, Tensor]:
        """Append the new tokens in place and return all cached K/V (the slow fallback)."""
        self.append(key_states, value_states)
        return self.gather()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return max(self.lens, default=0)

    def get_max_length(self) -> int:
        return self.cache.max_blocks_per_seq * self.cache.block_size

    def reset(self) -> None:
        """Lengths to 0; the pools stay allocated (their contents are dead, not zeroed)."""
        if self.is_initialized:
            self.seq_lens.zero_()
            self.lens = [0] * self.batch_size

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got "
                             f"{tokens_to_remove}")
        if not self.is_initialized or tokens_to_remove == 0:
            return
        self.lens = [max(0, n + tokens_to_remove) for n in self.lens]
        self.seq_lens.copy_(torch.tensor(self.lens, dtype=torch.int32))

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
            max_tokens.
        int8: store K/V as int8 with per (token, head) float32 scales.
    """

    def __init__(self, config=None, *, max_tokens: int, block_size: int = 16,
                 max_seq_len: int | None = None, num_layers: int | None = None,
                 int8: bool = False):
        if max_tokens <= 0 or block_size <= 0:
            raise ValueError(f"max_tokens and block_size must be positive, got {max_tokens} "
                             f"and {block_size}")
        self.block_size = block_size
        self.num_blocks = math.ceil(max_tokens / block_size)
        self.max_blocks_per_seq = math.ceil((max_seq_len or max_tokens) / block_size)
        self.int8 = int8
        self.block_table: Tensor | None = None  # [B, max_blocks_per_seq] int32, on the device
        self.blocks: list[list[int]] = []  # each sequence's blocks, on the host
        # A stack: low block ids first (pop() takes from the end).
        self.free_blocks: list[int] = list(range(self.num_blocks - 1, -1, -1))
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

    def __repr__(self):
        return (f"PagedKVCache(layers={len(self.layers)}, block_size={self.block_size}, "
                f"num_blocks={self.num_blocks}, int8={self.int8}, "
                f"seq_lens={self.seq_lens_host()})")

    # --- blocks --------------------------------------------------------------------------

    def _set_batch_size(self, batch_size: int, device: torch.device) -> None:
        if self.block_table is None:
            self.block_table = torch.zeros((batch_size, self.max_blocks_per_seq),
                                           dtype=torch.int32, device=device)
            _static_addresses(self.block_table)
            self.blocks = [[] for _ in range(batch_size)]
        elif self.block_table.shape[0] != batch_size:
            raise ValueError(f"PagedKVCache holds {self.block_table.shape[0]} sequences, got "
                             f"K/V for {batch_size}")

    def _reserve(self, lengths: list[int]) -> None:
        """Make sure sequence b has blocks for lengths[b] tokens, taking new blocks from the
        free list and writing them into the block table (one small host-to-device copy)."""
        need = [math.ceil(length / self.block_size) for length in lengths]
        for b, n in enumerate(need):
            if n > self.max_blocks_per_seq:
                raise RuntimeError(f"PagedKVCache: sequence {b} would hold {lengths[b]} tokens, "
                                   f"more than max_seq_len "
                                   f"{self.max_blocks_per_seq * self.block_size}")
        missing = sum(max(0, n - len(blocks)) for n, blocks in zip(need, self.blocks, strict=True))
        if missing > len(self.free_blocks):
            raise RuntimeError(f"PagedKVCache is full: {missing} more blocks of "
                               f"{self.block_size} tokens needed, {len(self.free_blocks)} of "
                               f"{self.num_blocks} free; raise max_tokens")
        rows, cols, ids = [], [], []
        for b, n in enumerate(need):
            while len(self.blocks[b]) < n:
                rows.append(b)
                cols.append(len(self.blocks[b]))
                ids.append(self.free_blocks.pop())
                self.blocks[b].append(ids[-1])
        if ids:
            self.block_table[rows, cols] = torch.tensor(ids, dtype=torch.int32).to(
                self.block_table.device)

    def _release_unused(self) -> None:
        """Give back the blocks past what each sequence's longest layer still needs."""
        for b, blocks in enumerate(self.blocks):
            need = math.ceil(max((layer.lens[b] for layer in self._initialized()), default=0)
                             / self.block_size)
            while len(blocks) > need:
                self.free_blocks.append(blocks.pop())

    def _initialized(self) -> list[PagedLayer]:
        return [layer for layer in self.layers if layer.is_initialized]

    def release(self, seq: int) -> None:
        """Empty sequence `seq` in every layer and give its blocks back (e.g. when it has
        finished and its slot is reused)."""
        for layer in self._initialized():
            layer.lens[seq] = 0
            layer.seq_lens[seq] = 0
        self._release_unused()

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
        blocks = sum(len(b) for b in self.blocks)
        return sum(blocks * self.block_size * self._bytes_per_token(layer)
                   for layer in self._initialized())

    def bytes_ideal(self) -> int:
        """What exactly the cached tokens take: no partly filled blocks."""
        return sum(sum(layer.lens) * self._bytes_per_token(layer)
                   for layer in self._initialized())

    def seq_lens_host(self) -> list[int]:
        """Each sequence's length in its longest layer (all layers agree between steps)."""
        layers = self._initialized()
        return [max(layer.lens[b] for layer in layers) for b in range(len(self.blocks))] \
            if layers else []

    # --- the transformers cache interface ------------------------------------------------

    def reset(self) -> None:
        """Empty every sequence and give all blocks back; the pools and the block table keep
        their memory (and addresses)."""
        super().reset()
        for blocks in self.blocks:
            self.free_blocks.extend(reversed(blocks))
            blocks.clear()

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
