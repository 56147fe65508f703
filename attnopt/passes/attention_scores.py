"""What written-out attention does to q·kᵀ before its softmax, read into an `AttentionPlan`.

The pieces, in eager's order, each optional (the softmax chain's own scale, bias and mask
follow, `softmax.masked_scores`):

    s = q·kᵀ ─[view to the same shape]─[· a | / d]─[/ c, tanh, · c]─[+ b0]
      ─[· α]─[+ b1]─[mask]─softmax

    Gemma 2     (q·kᵀ · a / c).tanh() · c + mask            softcap c (both c must agree)
    T5          q·kᵀ · 1.0 + position_bias + mask            two additive terms, scale 1
    Falcon      (q·kᵀ + alibi) · inv_norm + mask             ALiBi as a bias, scale folded

A scale α after an additive term b0 is folded into it, (s + b0)·α = s·α + b0·α: the op
multiplies the (small, broadcast) b0 by α once and adds it to s·α. In fp32 the two sides
round differently unless α is a power of two (Falcon's 1/sqrt(head_dim) is one for head
dims 16, 64, 256): they agree to fp32 rounding, one ulp of the larger term per score, not to
the last bit. A scale after the softcap, c·tanh(s/c)·α, is no softcap of scaled scores, and
is refused.
"""

from __future__ import annotations

import torch

from attnopt.compiler import layout
from attnopt.compiler.pattern import (
    Call,
    Capture,
    Literal,
    Match,
    Pattern,
    is_number,
    is_tensor_node,
    optional,
)
from attnopt.passes.attention_call import AttentionPlan, float_mask_fill_problem, val
from attnopt.passes.softmax import softmax_scale

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _float_tensor(node: object) -> bool:
    return is_tensor_node(lambda d: d.is_floating_point)(node)


def score_chain(qk: Pattern) -> Pattern:
    """The pieces between q·kᵀ and the softmax chain (see the top). Captures: scores_view,
    qk_scale | qk_divisor, softcap_in + softcap_out, pre_bias."""
    viewed = optional(Call(_VIEWS, qk, Literal(), name="scores_view"), through=qk)
    scaled = optional(
        Call(aten.mul.Tensor, viewed, Literal("qk_scale", where=is_number), commutative=True)
        | Call(aten.div.Tensor, viewed, Literal("qk_divisor", where=is_number)),
        through=viewed)
    capped = optional(
        Call(aten.mul.Tensor,
             Call(aten.tanh.default, Call(aten.div.Tensor, scaled,
                                          Literal("softcap_in", where=is_number))),
             Literal("softcap_out", where=is_number), commutative=True),
        through=scaled)
    return optional(Call(aten.add.Tensor, capped, Capture("pre_bias", where=_float_tensor),
                         commutative=True), through=capped)


def plan_scores(m: Match, scores: torch.Size) -> AttentionPlan | str:
    """The plan of the scores a written-out match computes (scores: the shape of q·kᵀ), with
    the scale of q·kᵀ alone (q or k pre-scaled, or a tensor scale, are the rule's), or why
    the op cannot compute them."""
    if "scores_view" in m.captures and not same_shape_view(m["scores_view"]):
        return "the scores are reshaped between q·kᵀ and the softmax"
    a = 1.0 / m["qk_divisor"] if "qk_divisor" in m.captures else float(m.get("qk_scale", 1.0))
    alpha = softmax_scale(m)
    softcap = 0.0
    if "softcap_in" in m.captures:
        c_in, c_out = float(m["softcap_in"]), float(m["softcap_out"])
        if c_in != c_out or not (c_in > 0 and c_in < float("inf")):
            return (f"tanh(s / {c_in}) · {c_out} is not a softcap c · tanh(s / c): the two "
                    "constants must be one positive number")
        if alpha != 1.0 and "pre_bias" not in m.captures:
            return f"a scale {alpha} after the softcap: c · tanh(s / c) · α is no softcap"
        softcap = c_in
    additive = []
    if "pre_bias" in m.captures:
        if softcap and alpha != 1.0:
            return f"a scale {alpha} after the softcap and a bias: not the op's order"
        additive.append((m["pre_bias"], alpha))  # (s + b0)·α = s·α + b0·α, see the top
    if "bias" in m.captures:
        additive.append((m["bias"], 1.0))
    for node, _ in additive:
        if not layout.broadcasts_into(val(node).shape, scores):
            return (f"the additive term {node.name} of shape {list(val(node).shape)} does not "
                    f"broadcast into the scores {list(scores)}")
    if "mask" in m.captures and (reason := float_mask_fill_problem(m["fill"])):
        return reason
    return AttentionPlan(scale=a * alpha, softcap=softcap, additive=additive,
                         bool_mask=m.get("mask"), drop="masked_keep" not in m.captures)


def same_shape_view(view: object) -> bool:
    """Whether a view node keeps its input's shape (a no-op the models write)."""
    before, after = val(view.args[0]), val(view)
    return len(before.shape) == len(after.shape) and all(
        map(layout.same, before.shape, after.shape))
