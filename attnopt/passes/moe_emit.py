"""Emitting one `attnopt::moe` for a matched MoE block: the stacked expert weights as frozen
constants in the op's layout (gate_up [E, 2I, H], down [E, H, I], biases [E, 2I] and [E, H]),
and the call with its `ExpertForm`.

A model that stores its experts transposed ([E, H, 2I], GPT-OSS and Llama-4) gets a transposed
*view* of its own tensor: nothing is copied, and the kernels read it through its strides. Only
forms that keep one matrix per expert (a ModuleList) or split gate and up in two tensors are
stacked into new tensors, once, at compile time.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from attnopt.backends.ops import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT
from attnopt.backends.reference import ExpertForm
from attnopt.compiler.graph import fake_value, insert_call
from attnopt.passes.linear import constant_node

aten = torch.ops.aten
Weight = fx.Node | torch.Tensor  # a frozen constant already in the op's layout, or a tensor


def as_constant(gm: fx.GraphModule, weight: Weight, name: str,
                parameter: str | None = None) -> fx.Node:
    """`weight` as a constant node of the graph (a tensor becomes one, named `name`, and keeps
    the parameter name the report and `skip` globs use)."""
    if isinstance(weight, fx.Node):
        return weight
    node = constant_node(gm, name, weight)
    if parameter:
        node.meta["attnopt_parameter"] = parameter
    return node


def transposed_view(gm: fx.GraphModule, node: fx.Node, name: str) -> fx.Node:
    """A constant holding node's tensor with its last two dims swapped: a view, not a copy."""
    with unset_fake_temporarily():
        view = getattr(gm, node.target).transpose(-2, -1)
    return as_constant(gm, view, name, node.meta.get("attnopt_parameter"))


def emit_moe(gm: fx.GraphModule, ctx, x: fx.Node, topk_ids: fx.Node, topk_weights: fx.Node,
             gate_up: fx.Node, down: fx.Node, form: ExpertForm,
             b_gate_up: fx.Node | None = None, b_down: fx.Node | None = None) -> fx.Node:
    """The op call at the graph's insertion point; only settings that differ from the defaults
    are spelled out, so graphs of plain SwiGLU experts read as before."""
    kwargs: dict = {"impl": ctx.options.kernels}
    for key, value, default in (("b_gate_up", b_gate_up, None), ("b_down", b_down, None),
                                ("interleaved", form.interleaved, False),
                                ("alpha", form.alpha, SWIGLU_OAI_ALPHA),
                                ("limit", form.limit, SWIGLU_OAI_LIMIT),
                                ("weight_on_input", form.weight_on_input, False)):
        if value is not default and value != default:
            kwargs[key] = value
    out = insert_call(gm.graph, torch.ops.attnopt.moe.default,
                      (x, topk_ids, topk_weights, gate_up, down, form.activation), kwargs)
    return out


def cast_like(graph: fx.Graph, out: fx.Node, like: fx.Node) -> fx.Node:
    """out in like's dtype (the summed fp32 result eager returned before its cast)."""
    want = fake_value(like).dtype
    if want == fake_value(out).dtype:
        return out
    return insert_call(graph, aten._to_copy.default, (out,), {"dtype": want})
