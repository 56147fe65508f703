"""Attention sinks as GPT-OSS writes them: a per-head logit appended to every row of scores as
one more column, a softmax over keys and sink, and the sink's column sliced off again:

    logits = cat([scores, sinks.view(1, H, 1, 1).expand(B, H, Lq, 1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values          (optional)
    probs = softmax(logits, dim=-1)[..., :-1]

which is the op's `sinks`: a term e^(sink_h) in each row's denominator with no value row.
What must hold, and is checked: the sink column is the last column of the cat (and one
column wide), it is sinks[h] for every (batch, query) of head h, the max subtracted is the
row maximum over that same last dim (softmax(x - max x) is softmax(x) to the last bit: the
softmax subtracts the row maximum itself, which is then 0), the softmax is over the last
dim, and the slice keeps exactly the key columns [0, Lk), one by one.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attnopt.compiler import layout
from attnopt.compiler.pattern import ANY, Call, Capture, Literal, Match, Pattern, optional
from attnopt.passes.attention_call import val

aten, prims = torch.ops.aten, torch.ops.prims
_SINK_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
               aten.unsqueeze.default}


def sink_softmax(scores: Pattern) -> Pattern:
    """softmax(cat([scores, sink column]) [- row max])[..., :Lk] [cast]. Captures: sink_cat,
    cat_dim, sink_column, max_dim, sink_softmax_dim, slice_dim + slice_start + slice_end,
    sink_out_dtype."""
    logits = Call(aten.cat.default, [scores, Capture("sink_column")], Literal("cat_dim"),
                  name="sink_cat")
    row_max = (Call(operator.getitem, Call(aten.max.dim, logits, Literal("max_dim"), True), 0)
               | Call(aten.amax.default, logits, Literal("max_dim"), True))
    shifted = optional(Call(aten.sub.Tensor, logits, row_max), through=logits)
    dim = Literal("sink_softmax_dim", where=lambda d: isinstance(d, int))
    probs = (Call(aten._softmax.default, shifted, dim, False)
             | Call(aten.softmax.int, shifted, dim, Literal("dtype_arg")))  # chain_problem's
    kept = Call(aten.slice.Tensor, probs, Literal("slice_dim"), Literal("slice_start"),
                Literal("slice_end"), 1)
    cast_dtype = Literal("sink_out_dtype", where=lambda d: isinstance(d, torch.dtype))
    return optional(
        Call(aten._to_copy.default, kept, dtype=cast_dtype, layout=ANY, device=ANY)
        | Call(prims.convert_element_type.default, kept, cast_dtype),
        through=kept)


def sinks_of(m: Match) -> fx.Node | str:
    """The [Hq] sinks behind the match's sink column, or why it is not one."""
    cat = m["sink_cat"]
    scores = val(cat.args[0][0])
    rank = len(scores.shape)
    if rank != 4:
        return f"scores of rank {rank} beside a sink column"
    last = {rank - 1, -1}
    if m["cat_dim"] not in last:
        return f"the sink column is concatenated along dim {m['cat_dim']}, not the keys"
    column = m["sink_column"]
    b, h, lq = scores.shape[:3]
    if not all(map(layout.same, val(column).shape, [b, h, lq, 1])):
        return (f"the concatenated {list(val(column).shape)} is not one column per row of the "
                f"scores {list(scores.shape)}")
    source = _per_head_source(column, h)
    if source is None:
        return "the sink column is not sinks[h] broadcast over batch and queries"
    if "max_dim" in m.captures:
        dims = m["max_dim"] if isinstance(m["max_dim"], list | tuple) else [m["max_dim"]]
        if len(dims) != 1 or dims[0] not in last:
            return f"the max subtracted is over dims {dims}, not the row"
    if m["sink_softmax_dim"] not in last:
        return f"softmax over dim {m['sink_softmax_dim']}, not over keys and sink"
    lk = scores.shape[3]
    end = m["slice_end"]
    if m["slice_dim"] not in last or m["slice_start"] not in (0, None) or not (
            end == -1 or (isinstance(end, int) and layout.same(end, lk))):
        return (f"slice(dim={m['slice_dim']}, {m['slice_start']}, {end}) does not keep exactly "
                "the key columns and drop the sink")
    return source


def _per_head_source(column: fx.Node, heads: object) -> fx.Node | None:
    """x when `column` is expand(views(x)) with x 1-D of `heads` values and the views giving
    [1, heads, 1, 1]: one value per head, the same for every batch and query."""
    if column.target is not aten.expand.default:
        return None
    node = column.args[0]
    shape = val(node).shape
    if len(shape) != 4 or not all(map(layout.same, shape, [1, heads, 1, 1])):
        return None
    while node.op == "call_function" and node.target in _SINK_VIEWS:
        node = node.args[0]
    x = node.meta.get("val")
    ok = isinstance(x, torch.Tensor) and x.dim() == 1 and layout.same(x.shape[0], heads)
    return node if ok else None
