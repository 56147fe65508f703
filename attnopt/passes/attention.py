"""attention: attention becomes one `attnopt::attention` (flash attention in Triton on GPU).

What it matches so far, the calls that are already fused — what transformers emits with
attn_implementation="sdpa" and what Dynamo makes of F.scaled_dot_product_attention:

    scaled_dot_product_attention(q, k, v, mask, dropout_p=0, is_causal, scale, enable_gqa)
    getitem(_scaled_dot_product_{flash_attention_for_cpu, flash_attention,
                                 efficient_attention, cudnn_attention, attention_math}(...), 0)

K/V with fewer heads than Q (GQA, MQA) are passed as they are, and transformers' repeat_kv
(expand + clone + reshape) in front of K and V is folded away: the kernel indexes the KV head,
so no repeated copy of the cache is made.
A boolean mask that SDPA's decomposition turned into where(mask, 0, -inf) is read as the
boolean it was, and a mask that is a compile-time constant equal to the causal pattern (what
transformers builds from arange when there is no padding) becomes the is_causal flag: the
kernel skips the blocks above the diagonal and reads no mask at all.

And attention written out, as transformers' eager implementations and hand-written modules do:

    matmul(softmax_chain(matmul([q * s], [k * s]ᵀ)), v)

with every spelling of the softmax chain the softmax pass knows (scale, additive mask,
masked_fill/where with -inf, fp32 upcast and cast back, _safe_softmax, decomposed) and the same
repeat_kv folding. One difference from eager is deliberate and documented: a query row whose keys
are *all* masked with -inf is NaN in eager's plain softmax and 0 here, as SDPA gives it.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.compiler.graph import constant_value, insert_call
from attnopt.compiler.pattern import (
    ANY,
    Call,
    Capture,
    Literal,
    Match,
    Pattern,
    Rule,
    is_number,
    is_tensor_node,
)
from attnopt.compiler.rewrite import PatternPass
from attnopt.passes.softmax import dtype_of, softmax_dim, softmax_of, softmax_scale, widening_cast

aten = torch.ops.aten

def repeat_kv(name: str) -> Call:
    """transformers' repeat_kv: x[:, :, None].expand(B, Hkv, n_rep, L, D).reshape(B, Hkv*n_rep,
    L, D), a copy of K or V per query head. Matched so the kernel reads x itself."""
    x = Capture(name, where=is_tensor_node())
    expanded = Call(aten.expand.default, Call(aten.unsqueeze.default, x, 2),
                    Literal(f"{name}_expand"))
    # With one KV head the reshape is a view of the expand (stride 0), so there is no clone.
    copied = Call(aten.clone.default, expanded, memory_format=ANY) | expanded
    return Call((aten._unsafe_view.default, aten.view.default, aten.reshape.default), copied,
                Literal(f"{name}_repeated_shape"))


q = Capture("q", where=is_tensor_node())
k, v = (repeat_kv(n) | Capture(n, where=is_tensor_node()) for n in "kv")
mask = Capture("mask", where=is_tensor_node())
dropout = Literal("dropout_p")
causal = Literal("is_causal", where=lambda c: isinstance(c, bool))
scale = Literal("scale")

sdpa = Call(aten.scaled_dot_product_attention.default, q, k, v, attn_mask=mask | None,
            dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=ANY)


def _first_output(op: object, **kwargs: object) -> Call:
    return Call(operator.getitem, Call(op, q, k, v, **kwargs), 0)


sdpa_backends = (
    _first_output(aten._scaled_dot_product_flash_attention_for_cpu.default, dropout_p=dropout,
                  is_causal=causal, attn_mask=mask | None, scale=scale)
    | _first_output(aten._scaled_dot_product_flash_attention.default, dropout_p=dropout,
                    is_causal=causal, return_debug_mask=False, scale=scale)
    | _first_output(aten._scaled_dot_product_efficient_attention.default, attn_bias=mask | None,
                    compute_log_sumexp=ANY, dropout_p=dropout, is_causal=causal, scale=scale)
    | _first_output(aten._scaled_dot_product_cudnn_attention.default, attn_bias=mask | None,
                    compute_log_sumexp=ANY, dropout_p=dropout, is_causal=causal,
                    return_debug_mask=False, scale=scale)
    | _first_output(aten._scaled_dot_product_attention_math.default, attn_mask=mask | None,
                    dropout_p=dropout, is_causal=causal, dropout_mask=None, scale=scale,
                    enable_gqa=ANY)
)


def _val(node: fx.Node) -> torch.Tensor:
    return node.meta["val"]


def _repeat_problem(m: Match, name: str) -> str | None:
    if f"{name}_expand" not in m.captures:
        return None
    b, hkv, length, d = _val(m[name]).shape
    sizes, out = m[f"{name}_expand"], m[f"{name}_repeated_shape"]
    if len(sizes) != 5 or len(out) != 4:
        return f"{name} is expanded to {sizes}: not repeat_kv"
    rep = sizes[2]
    same = [sizes[0], sizes[1], sizes[3], sizes[4]] == [b, hkv, length, d] and list(out) == [
        b, hkv * rep, length, d]
    return None if same else f"{name} expand {sizes} / reshape {out} is not repeat_kv"


def check(m: Match, ctx=None) -> str | None:
    for name in "kv":
        if reason := _repeat_problem(m, name):
            return reason
    if m["dropout_p"] != 0.0:
        return f"dropout_p={m['dropout_p']}: attention with dropout (training) is left to ATen"
    qv, kv, vv = _val(m["q"]), _val(m["k"]), _val(m["v"])
    if not (qv.dim() == kv.dim() == vv.dim() == 4):
        return f"q/k/v of rank {qv.dim()}/{kv.dim()}/{vv.dim()}; the op takes [B, H, L, D]"
    if not statically_known_true(qv.shape[1] % kv.shape[1] == 0):
        return f"{qv.shape[1]} query heads are not a multiple of {kv.shape[1]} KV heads"
    if m["is_causal"] and not statically_known_true(qv.shape[2] == kv.shape[2]):
        return ("is_causal with q_len != kv_len: SDPA aligns the mask top-left, "
                "attnopt::attention bottom-right")
    if m.get("mask") is not None:
        mv = _val(m["mask"])
        target = (qv.shape[0], qv.shape[1], qv.shape[2], kv.shape[2])
        if mv.dim() > 4 or torch.broadcast_shapes(mv.shape, target) != torch.Size(target):
            return f"mask of shape {list(mv.shape)} does not broadcast to {list(target)}"
    return None


def _boolean_source(mask: fx.Node) -> fx.Node | None:
    """The boolean behind where(b, 0, -inf) — how SDPA's decomposition spells a bool mask."""
    if mask.target is not aten.where.self or not is_tensor_node(
            lambda d: d == torch.bool)(mask.args[0]):
        return None
    fills = [a.args[0] if isinstance(a, fx.Node) and a.target is aten.scalar_tensor.default
             else None for a in mask.args[1:]]
    return mask.args[0] if fills == [0.0, -math.inf] else None


def is_standard_causal(mask: fx.Node, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `mask` is a constant equal to the causal pattern: query i attends exactly keys
    j <= i + Lk - Lq (a boolean True there, or an additive 0 there and a value at or below
    half the dtype's minimum elsewhere, which exp() turns into exactly 0 in every row that
    keeps its diagonal). Then the kernel needs the flag, not the tensor."""
    if "attnopt_causal" not in mask.meta:
        mask.meta["attnopt_causal"] = _evaluate_causal(mask, q.shape[-2], k.shape[-2])
    return mask.meta["attnopt_causal"]


def _evaluate_causal(mask: fx.Node, lq: int, lk: int) -> bool:
    if not isinstance(lq, int) or not isinstance(lk, int):
        return False
    value = constant_value(mask)
    if value is None or value.dim() > 4 or value.shape[-2:] != (lq, lk):
        return False
    with unset_fake_temporarily():  # passes run inside the compile's fake mode
        keep = torch.ones(lq, lk, dtype=torch.bool, device=value.device).tril(lk - lq)
        if value.dtype == torch.bool:
            return bool((value == keep).all())
        floor = torch.finfo(value.dtype).min / 2
        return bool(((value == 0) == keep).all() and (value[..., ~keep] <= floor).all())


def _mask_or_causal(attn_mask: fx.Node | None, is_causal: bool, m: Match) -> tuple:
    if attn_mask is not None and not is_causal and is_standard_causal(
            attn_mask, _val(m["q"]), _val(m["k"])):
        return None, True
    return attn_mask, is_causal


def rewrite(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    head_dim = _val(m["q"]).shape[-1]
    scale_value = m["scale"] if m["scale"] is not None else 1.0 / math.sqrt(head_dim)
    attn_mask = m.get("mask")
    if attn_mask is not None:
        attn_mask = _boolean_source(attn_mask) or attn_mask
    attn_mask, is_causal = _mask_or_causal(attn_mask, m["is_causal"], m)
    return insert_call(graph, torch.ops.attnopt.attention.default, (
        m["q"], m["k"], m["v"], attn_mask, is_causal, float(scale_value),
    ), {"impl": ctx.options.kernels})


# --- written-out attention: softmax(q @ kᵀ * scale + mask) @ v -------------------------------


def flat_matmul(a: Pattern, b: Pattern, name: str) -> Pattern:
    """A 4-D matmul as aten.matmul lowers it: expand both sides, fold batch and heads into one
    dim (a view, or a clone and a view when the strides do not allow one), bmm, unfold."""

    def flat(side: Pattern) -> Pattern:
        expanded = Call(aten.expand.default, side, ANY)
        maybe_copied = Call(aten.clone.default, expanded, memory_format=ANY) | expanded
        return Call(_VIEWS, maybe_copied, ANY)

    return Call(_VIEWS, Call(aten.bmm.default, flat(a), flat(b)), Literal(f"{name}_shape"))


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)

q_scaled = Call(aten.mul.Tensor, q, Literal("q_scale", where=is_number), commutative=True) | q
k_scaled = Call(aten.mul.Tensor, k, Literal("k_scale", where=is_number), commutative=True) | k
k_transposed = (Call(aten.transpose.int, k_scaled, Literal("kt_dim0"), Literal("kt_dim1"))
                | Call(aten.permute.default, k_scaled, Literal("kt_perm")))
written_out = flat_matmul(softmax_of(flat_matmul(q_scaled, k_transposed, "scores")), v, "out")


def _is_last_two(m: Match) -> bool:
    if "kt_perm" in m.captures:
        return [d % 4 for d in m["kt_perm"]] == [0, 1, 3, 2]
    return {m["kt_dim0"] % 4, m["kt_dim1"] % 4} == {2, 3}


def check_written_out(m: Match, ctx=None) -> str | None:
    qv, kv = _val(m["q"]), _val(m["k"])
    if qv.dim() != 4 or kv.dim() != 4:
        return f"q/k of rank {qv.dim()}/{kv.dim()}; the op takes [B, H, L, D]"
    if not _is_last_two(m):
        return "k is not transposed over its last two dims: not q @ kᵀ"
    if softmax_dim(m) % 4 != 3:
        return f"softmax over dim {softmax_dim(m)}, not over the keys"
    if dtype_of(m.anchor) != qv.dtype:
        return f"output is {dtype_of(m.anchor)} but q is {qv.dtype}"
    if "mask" in m.captures and m["fill"] != -math.inf:
        return (f"mask fill {m['fill']} is finite: rows masked everywhere would average V in "
                "eager and give 0 in the fused kernel")
    for name in "kv":
        if reason := _repeat_problem(m, name):
            return reason
    if not statically_known_true(qv.shape[1] % kv.shape[1] == 0):
        return f"{qv.shape[1]} query heads are not a multiple of {kv.shape[1]} KV heads"
    if "bias" in m.captures:
        target = (qv.shape[0], qv.shape[1], qv.shape[2], kv.shape[2])
        bv = _val(m["bias"])
        if bv.dim() > 4 or torch.broadcast_shapes(bv.shape, target) != torch.Size(target):
            return f"bias of shape {list(bv.shape)} does not broadcast to {list(target)}"
    return None


def rewrite_written_out(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    scale = softmax_scale(m) * float(m.get("q_scale", 1.0)) * float(m.get("k_scale", 1.0))
    attn_mask = m.get("bias")
    if "mask" in m.captures:  # the kernel's boolean mask marks keys to attend
        attn_mask = m["mask"] if "masked_keep" in m.captures else insert_call(
            graph, aten.logical_not.default, (m["mask"],))
        if "bias" in m.captures:  # both: an additive mask that is -inf where the bool one says
            attn_mask = insert_call(graph, aten.where.ScalarOther,
                                    (attn_mask, m["bias"], -math.inf))
    attn_mask, is_causal = _mask_or_causal(attn_mask, False, m)
    return insert_call(graph, torch.ops.attnopt.attention.default, (
        m["q"], m["k"], m["v"], attn_mask, is_causal, scale), {"impl": ctx.options.kernels})


attention_pass = PatternPass("attention", counts_as="attention", rules=[
    Rule("sdpa", sdpa | sdpa_backends, rewrite, check),
    Rule("written_out", written_out, rewrite_written_out, check_written_out,
         through=widening_cast),
])
