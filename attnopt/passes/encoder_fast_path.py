"""PyTorch's fused encoder fast path, opened up: `nn.TransformerEncoderLayer` (and
`nn.MultiheadAttention`) in eval call one ATen kernel for the whole layer,
`_transformer_encoder_layer_fwd` (or `_native_multi_head_attention` for the attention alone),
whose attention no pattern can see. Each call is replaced by its math, written in ATen ops
around one `attnopt::attention`:

    qkv = src @ qkv_weightᵀ + qkv_bias        -> q, k, v [B, H, L, D] (heads in that order)
    a = attention(q, k, v, keep, scale 1/sqrt(D)) @ proj_weightᵀ + proj_bias
    layer:  x = LN1(src + a), out = LN2(x + FFN(x))             (norm_first: pre-norm)
            FFN(x) = act(x @ W1ᵀ + b1) @ W2ᵀ + b2, act GELU (erf) or ReLU

The kernels' mask convention, read from ATen's `native_multi_head_attention`: the mask is
turned into a boolean with `.to(bool)` and True *drops* the key — a float mask is not added,
every non-zero entry drops its key (the -inf of a canonical mask, and also a finite bias or a
NaN). mask_type 1 is a key padding mask [B, L], 2 a mask per head [B, H, L, L] (broadcast),
0 one [L, L] mask. A row left with no key is NaN in its masked softmax (`_masked_softmax`,
on CPU and CUDA alike), where the op gives 0: the decomposition puts the NaN back.
The decomposition computes the same math in another order (q·kᵀ scaled inside the op rather
than q scaled first): equal to fp32 rounding.
"""

from __future__ import annotations

import math
import operator
from unittest import mock

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from attnopt.compiler import layout
from attnopt.compiler.graph import fake_value
from attnopt.compiler.pattern import Call, Capture, Match, Rule
from attnopt.passes.attention_call import val

aten = torch.ops.aten
ENCODER_LAYER = aten._transformer_encoder_layer_fwd.default
NATIVE_MHA = aten._native_multi_head_attention.default


def _every_argument(op) -> dict[str, Capture]:
    return {a.name: Capture(a.name) for a in op._schema.arguments}


encoder_layer = Call(ENCODER_LAYER, **_every_argument(ENCODER_LAYER))
native_mha = Call(operator.getitem, Call(NATIVE_MHA, **_every_argument(NATIVE_MHA)), 0)


# --- the math ----------------------------------------------------------------------------------


def _attention(query, key, value, heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask,
               mask_type, impl):
    """native_multi_head_attention's output, batch first: [B, L, E]."""
    embed = query.shape[-1]
    if query is key and key is value:
        q, k, v = F.linear(query, qkv_weight, qkv_bias).unflatten(-1, (3, heads, -1)).permute(
            2, 0, 3, 1, 4)
    else:
        weights, biases = qkv_weight.chunk(3), qkv_bias.chunk(3)
        q, k, v = (F.linear(x, w, b).unflatten(-1, (heads, -1)).transpose(1, 2)
                   for x, w, b in zip((query, key, value), weights, biases, strict=True))
    keep = None
    if mask is not None:
        keep = mask == 0  # `mask.to(bool)` is True (drop) exactly where it is not 0
        if mask_type == 1:  # [B, L]: key padding
            keep = keep[:, None, None, :]
    out = torch.ops.attnopt.attention(q, k, v, keep, False, 1.0 / math.sqrt(embed // heads),
                                      impl=impl)
    if keep is not None:  # the masked softmax's NaN for a row with no key (the op gives 0)
        out = torch.where(keep.any(-1, keepdim=True), out, math.nan)
    return F.linear(out.transpose(1, 2).flatten(2), proj_weight, proj_bias)


def _encoder_layer(src, heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                   norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2,
                   ffn_weight_1, ffn_bias_1, ffn_weight_2, ffn_bias_2, mask, mask_type, impl):
    """_transformer_encoder_layer_fwd's output (`transformer_encoder_layer_forward` in ATen)."""
    shape = (src.shape[-1],)
    x = F.layer_norm(src, shape, norm_weight_1, norm_bias_1, eps) if norm_first else src
    x = _attention(x, x, x, heads, qkv_weight, qkv_bias, proj_weight, proj_bias, mask,
                   mask_type, impl) + src
    if not norm_first:
        x = F.layer_norm(x, shape, norm_weight_1, norm_bias_1, eps)
    y = F.layer_norm(x, shape, norm_weight_2, norm_bias_2, eps) if norm_first else x
    y = F.linear(y, ffn_weight_1, ffn_bias_1)
    y = F.linear(F.gelu(y) if use_gelu else F.relu(y), ffn_weight_2, ffn_bias_2) + x
    return y if norm_first else F.layer_norm(y, shape, norm_weight_2, norm_bias_2, eps)


# --- the rules ---------------------------------------------------------------------------------


def _mask_problem(m: Match, src: torch.Tensor, heads: int) -> str | None:
    mask, mask_type = m["mask"], m["mask_type"]
    if mask is None:
        return None
    shape = list(val(mask).shape)
    b, length = src.shape[0], src.shape[1]
    wanted = {1: [b, length], 2: [b, heads, length, length], 0: [length, length]}.get(mask_type)
    if wanted is None:
        return f"mask_type {mask_type} is not one of the fast path's (0, 1, 2)"
    fits = (len(shape) == 2 and all(map(layout.same, shape, wanted)) if mask_type == 1
            else layout.broadcasts_into(shape, wanted))
    if not fits:
        return f"a mask of shape {shape} for mask_type {mask_type} (wants {wanted})"
    return None


def _check(m: Match, query: str, heads: str) -> str | None:
    x = val(m[query])
    if x.dim() != 3 or not x.is_floating_point():
        return f"{m.anchor.name}: the input is {x.dtype} {list(x.shape)}, not a float [B, L, E]"
    if x.shape[-1] != m["embed_dim"] or m["embed_dim"] % m[heads]:
        return f"embed_dim {m['embed_dim']} with {m[heads]} heads and inputs of {x.shape[-1]}"
    return _mask_problem(m, x, m[heads])


def check_layer(m: Match, ctx=None) -> str | None:
    return _check(m, "src", "num_heads")


def check_mha(m: Match, ctx=None) -> str | None:
    # need_weights only adds a second output; a call whose weights are read is not matched
    # (its weights node is a user outside the match), one whose weights are dropped is.
    if val(m["key"]).shape != val(m["value"]).shape:
        return "key and value of different shapes"
    return _check(m, "query", "num_head")


def rewrite_layer(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    names = ("src", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "norm_weight_1",
             "norm_bias_1", "norm_weight_2", "norm_bias_2", "ffn_weight_1", "ffn_bias_1",
             "ffn_weight_2", "ffn_bias_2", "mask")

    def layer(src, qkv_w, qkv_b, proj_w, proj_b, n1w, n1b, n2w, n2b, f1w, f1b, f2w, f2b,
              mask):
        return _encoder_layer(src, m["num_heads"], qkv_w, qkv_b, proj_w, proj_b,
                              m["use_gelu"], m["norm_first"], m["eps"], n1w, n1b, n2w, n2b,
                              f1w, f1b, f2w, f2b, mask, m["mask_type"], ctx.options.kernels)

    return inline(graph, layer, [m[n] for n in names])


def rewrite_mha(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    names = ("query", "key", "value", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
             "mask")
    same = m["query"] is m["key"] and m["key"] is m["value"]

    def mha(query, key, value, qkv_w, qkv_b, proj_w, proj_b, mask):
        if same:  # one input: one projection, as the kernel does it
            key = value = query
        return _attention(query, key, value, m["num_head"], qkv_w, qkv_b, proj_w, proj_b,
                          mask, m["mask_type"], ctx.options.kernels)

    return inline(graph, mha, [m[n] for n in names])


def inline(graph: fx.Graph, fn, args: list) -> fx.Node:
    """fn(*args) traced into ATen ops and copied in at the graph's insertion point, its
    inputs being `args` (nodes, or None); the node of its result. Every copied node keeps
    the fake value it was traced with."""
    tensors = [a for a in args if a is not None]
    fakes = [fake_value(a) for a in tensors]
    positions = [i for i, a in enumerate(args) if a is not None]

    def with_nones(*given):
        full = [None] * len(args)
        for i, t in zip(positions, given, strict=True):
            full[i] = t
        return fn(*full)

    mode = detect_fake_mode([f for f in fakes if isinstance(f, torch.Tensor)])
    with mock.patch.object(mode, "allow_non_fake_inputs", True), mode:
        traced = make_fx(with_nones, tracing_mode="real", _allow_non_fake_inputs=True)(*fakes)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    return graph.graph_copy(traced.graph, dict(zip(placeholders, tensors, strict=True)))


encoder_rules = [
    Rule("encoder_layer_fast_path", encoder_layer, rewrite_layer, check_layer),
    Rule("native_multi_head_attention", native_mha, rewrite_mha, check_mha),
]
