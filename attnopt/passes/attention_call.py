"""The `attnopt::attention` call every attention rule ends in: what its q/k/v must be, the
plan of a rewrite (scale, softcap, the additive terms in their order, a boolean mask, the
variants), and a constant mask read as the causal flag and a window instead of a tensor.

The op adds its additive terms one after another, as the models write them (`s + b_1 + ... +
b_n + mask`, `reference.ScoreMods`): the last additive term of a plan is passed as the op's
float `mask` when there is no boolean mask (the slot the kv_cache pass reads), the others as
`biases`; with a boolean mask every additive term is a bias and the boolean is the mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import statically_known_true

from attnopt.backends import ops  # noqa: F401  (registers torch.ops.attnopt.*)
from attnopt.compiler import layout
from attnopt.compiler.graph import constant_value, insert_call

aten = torch.ops.aten


def val(node: fx.Node) -> torch.Tensor:
    return node.meta["val"]


def qkv_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why q, k, v are not the op's q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]
    with Hq a multiple of Hkv, or None. K/V broadcast over the batch, or V with other heads than
    K, would be read out of bounds by a kernel that indexes them per sequence and KV head.
    Sizes are refused only where they provably differ: two symbols the graph does not relate
    (a past key's and a past value's length, say) are equal whenever eager runs at all."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        return f"q/k/v of rank {q.dim()}/{k.dim()}/{v.dim()}; the op takes [B, H, L, D]"
    if layout.differ(k.shape[0], q.shape[0]) or layout.differ(v.shape[0], q.shape[0]):
        return (f"batch sizes q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]} differ: K/V "
                "broadcast over the batch")
    if layout.differ(v.shape[1], k.shape[1]) or layout.differ(v.shape[2], k.shape[2]):
        return f"v {list(v.shape)} has other heads or length than k {list(k.shape)}"
    if layout.differ(k.shape[3], q.shape[3]):
        return f"head dims of q ({q.shape[3]}) and k ({k.shape[3]}) differ"
    if not statically_known_true(q.shape[1] % k.shape[1] == 0):
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
    return None


def scores_shape(q: torch.Tensor, k: torch.Tensor) -> list:
    return [q.shape[0], q.shape[1], q.shape[2], k.shape[2]]


# --- a constant mask as the causal flag and a window --------------------------------------------


@dataclass(frozen=True)
class Band:
    """Keys j <= p_i (causal) and j >= p_i - window_left (-1: no left edge), p_i = i + Lk - Lq."""

    window_left: int = -1


def constant_band(mask: fx.Node, q: torch.Tensor, k: torch.Tensor) -> Band | None:
    """The band `mask` is, when it is a compile-time constant equal to the causal pattern,
    possibly cut to a sliding window: query i attends exactly keys p_i - w <= j <= p_i (a
    boolean True there, or an additive 0 there and a value at or below half the dtype's
    minimum elsewhere, which exp() turns into exactly 0 in every row that keeps its
    diagonal). Then the kernel needs the flag and the window, not the tensor. With Lq > Lk
    the first Lq - Lk rows keep no key: the flag gives them 0, as -inf gives them, but a
    finite fill averages V there, so an additive mask with finite fills is no band then."""
    if "attnopt_band" not in mask.meta:
        mask.meta["attnopt_band"] = _evaluate_band(mask, q.shape[-2], k.shape[-2])
    return mask.meta["attnopt_band"]


def _evaluate_band(mask: fx.Node, lq: int, lk: int) -> Band | None:
    if not isinstance(lq, int) or not isinstance(lk, int) or lk == 0:
        return None
    value = constant_value(mask)
    if value is None or value.dim() > 4 or value.shape[-2:] != (lq, lk):
        return None
    with unset_fake_temporarily():  # passes run inside the compile's fake mode
        kept = value if value.dtype == torch.bool else value == 0
        # The window from the last row (p = Lk - 1): the keys it keeps, counted back from it.
        last = kept.reshape(-1, lq, lk)[0, -1]
        width = int(last.flip(0).cumprod(0).sum())
        if width == 0:  # the last query does not see the last key: not causal
            return None
        rel = (torch.arange(lk, device=value.device)[None, :]
               - torch.arange(lq, device=value.device)[:, None] - (lk - lq))
        keep = (rel <= 0) & (rel >= 1 - width)
        if value.dtype == torch.bool:
            ok = bool((value == keep).all())
        else:
            masked = value[..., ~keep]
            if lq > lk and bool(masked.isfinite().any()):
                return None
            floor = torch.finfo(value.dtype).min / 2
            ok = bool((kept == keep).all() and (masked <= floor).all())
    if not ok:
        return None
    return Band(window_left=-1 if width >= lk else width - 1)


# --- the plan of a rewrite, and the call ---------------------------------------------------------


@dataclass
class AttentionPlan:
    """What one attnopt::attention call computes, in the op's order (`reference.ScoreMods`):
    q·kᵀ·scale, softcap, the additive terms in order (each a node times a constant, which is
    multiplied in when it is not 1), a boolean mask (True = attend, or True = drop when
    `drop` is set), the causal flag and a window, ALiBi slopes and sinks."""

    scale: float
    softcap: float = 0.0
    additive: list[tuple[fx.Node, float]] = field(default_factory=list)
    bool_mask: fx.Node | None = None
    drop: bool = False
    is_causal: bool = False
    window_left: int = -1
    window_right: int = -1
    alibi_slopes: fx.Node | None = None
    sinks: fx.Node | None = None


def emit_attention(graph: fx.Graph, ctx, q: fx.Node, k: fx.Node, v: fx.Node,
                   plan: AttentionPlan) -> fx.Node:
    """The attention call for `plan`, at the graph's insertion point. A constant causal (or
    causal and windowed) mask in the mask slot becomes the flag and the window."""
    terms = [node if factor == 1.0 else insert_call(graph, aten.mul.Tensor, (node, factor))
             for node, factor in plan.additive if not _constant_zeros(node)]
    mask = plan.bool_mask
    if mask is not None and plan.drop:  # the kernel's boolean mask marks keys to attend
        mask = insert_call(graph, aten.logical_not.default, (mask,))
    if mask is None and terms:
        mask = terms.pop()
    is_causal, window_left = plan.is_causal, plan.window_left
    if (mask is not None and not terms and not is_causal and plan.window_right < 0
            and window_left < 0 and (band := constant_band(mask, val(q), val(k)))):
        mask, is_causal, window_left = None, True, band.window_left
    variants = {"softcap": plan.softcap, "biases": terms or None,
                "alibi_slopes": plan.alibi_slopes, "window_left": window_left,
                "window_right": plan.window_right, "sinks": plan.sinks}
    return insert_call(graph, torch.ops.attnopt.attention.default,
                       (q, k, v, mask, is_causal, plan.scale),
                       {"impl": ctx.options.kernels, **given_variants(variants)})


# The variants' defaults (the schema's): a call passes only the others, so a plain
# attention keeps its short form in graphs and reports.
VARIANT_DEFAULTS = {"softcap": 0.0, "biases": None, "alibi_slopes": None, "window_left": -1,
                    "window_right": -1, "sinks": None}


def given_variants(variants: dict) -> dict:
    """The variants (by name) that are not their default."""
    return {name: value for name, value in variants.items()
            if value is not None and value != VARIANT_DEFAULTS[name]}


def _constant_zeros(node: fx.Node) -> bool:
    """A compile-time constant that is all zeros (T5's position bias in cross-attention):
    adding it changes no score, so it is left out."""
    value = constant_value(node)
    with unset_fake_temporarily():
        return value is not None and value.is_floating_point() and not bool(value.any())


def float_mask_fill_problem(fill: float) -> str | None:
    """masked_fill replaces masked scores by `fill`; the op drops the keys: the same only for
    -inf."""
    if fill == -math.inf:
        return None
    return (f"mask fill {fill} is not -inf: masked_fill replaces the masked scores (a row "
            "masked everywhere averages V), where the op drops the keys")
