"""Why a candidate no rule matched was left alone: the `explain` functions of the attention,
softmax and quantize passes (`compiler/rewrite.PatternPass`).

A rule that matches and refuses states its own reason. These name the rest — a candidate in a
spelling no rule matches at all — so that every softmax, every SDPA or flex-attention call,
every attention-shaped softmax and every linear left as it is leaves one line in the report.
Each looks at a few nodes around the candidate only: the passes stay linear in graph size.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attnopt.compiler.graph import short_target

aten, prims = torch.ops.aten, torch.ops.prims

SOFTMAXES = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
SDPA_CALLS = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_attention_math.default,
}
NATIVE_ATTENTION = {aten._native_multi_head_attention.default,
                    aten._transformer_encoder_layer_fwd.default}
MATMULS = {aten.bmm.default, aten.baddbmm.default, aten.mm.default, aten.addmm.default,
           aten.matmul.default}
# What the attention patterns read through between the scores and the softmax, and between the
# softmax and the second matmul: any other op there is why an attention-shaped softmax was not
# taken (a softcap spelled with a multiply, an op between the sink column and the softmax).
_KNOWN = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.expand.default, aten.clone.default, aten.alias.default, aten.permute.default,
          aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
          aten._to_copy.default, prims.convert_element_type.default, aten.mul.Tensor,
          aten.div.Tensor, aten.add.Tensor, aten.masked_fill.Scalar, aten.where.self,
          aten.scalar_tensor.default, aten.full.default, aten.sub.Tensor, aten.exp.default,
          aten.amax.default, aten.sum.dim_IntList, aten.max.dim, operator.getitem,
          aten.logical_not.default}
_STEPS = 12  # nodes looked at on each side of a softmax


def is_softmax(node: fx.Node) -> bool:
    """softmax as an op, or decomposed: exp(...) / sum(exp(...))."""
    if node.target in SOFTMAXES:
        return True
    return (node.target is aten.div.Tensor and len(node.args) == 2
            and all(isinstance(a, fx.Node) for a in node.args)
            and node.args[0].target is aten.exp.default
            and node.args[1].target is aten.sum.dim_IntList)


def _walk(start: list[fx.Node], step, stop: set) -> tuple[fx.Node | None, list[str]]:
    """Breadth-first from `start` along `step(node)` for at most _STEPS nodes: the first node
    whose target is in `stop`, and the targets passed on the way that `_KNOWN` does not hold."""
    seen, queue, unknown = set(), list(start), []
    while queue and len(seen) < _STEPS:
        node = queue.pop(0)
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in stop:
            return node, unknown
        name = short_target(node)
        if _to_float64(node):  # a known op, but fp64 math the op (fp32) does not do
            name += " to float64"
        if (node.target not in _KNOWN or _to_float64(node)) and name not in unknown:
            unknown.append(name)
        queue.extend(step(node))
    return None, unknown


def _to_float64(node: fx.Node) -> bool:
    """A cast of narrower floats to float64 (the op computes in fp32)."""
    val = node.meta.get("val")
    source = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) \
        else None
    return (node.target in (aten._to_copy.default, prims.convert_element_type.default)
            and isinstance(val, torch.Tensor) and val.dtype == torch.float64
            and isinstance(source, torch.Tensor) and source.dtype != torch.float64)


def explain_attention(node: fx.Node) -> str | None:
    if node.target in SDPA_CALLS:
        return (f"{short_target(node)} left as it is: its arguments or the outputs read are "
                "not a form the pass matches")
    if node.target in NATIVE_ATTENTION:
        return (f"{short_target(node)} (PyTorch's fused encoder fast path) is left as it is: "
                "its outputs are read in a way the pass does not decompose (the attention "
                "weights, say)")
    if getattr(node.target, "__name__", "") == "flex_attention":
        return ("flex_attention is left as it is: its outputs beyond the attention (the "
                "log-sum-exp, for a backward) are read; the call runs as torch compiles it")
    if not is_softmax(node):
        return None
    scores, before = _walk([a for a in node.all_input_nodes], lambda n: n.all_input_nodes,
                           MATMULS)
    values, after = _walk(list(node.users), lambda n: list(n.users), MATMULS)
    if scores is None or values is None:
        return None  # a softmax, not attention: the softmax pass's to explain
    ops = [*(f"{op} before the softmax" for op in before),
           *(f"{op} after it" for op in after)]
    what = (", ".join(ops) if ops else
            "the scores or the values reach the matmuls in a layout the pass does not follow")
    return (f"softmax between {scores.name} (q @ kᵀ) and {values.name} (@ v) is not attention "
            f"as the pass knows it: {what}")


def explain_softmax(node: fx.Node) -> str | None:
    if node.target is aten._log_softmax.default:
        return "log_softmax is not rewritten: attnopt::softmax computes the softmax itself"
    if node.target in SOFTMAXES:
        return "its input is not a floating-point tensor with known shape and dtype"
    if is_softmax(node):
        return ("exp(x) / sum(exp(x)) without the row maximum subtracted over the same dim "
                "(keepdim): it overflows where softmax does not, so it is not a softmax")
    return None


_WEIGHT_PATH = {aten._to_copy.default, prims.convert_element_type.default, aten.t.default,
                aten.transpose.int, aten.permute.default, aten.view.default,
                aten._unsafe_view.default, aten.reshape.default, aten.clone.default,
                aten.expand.default, aten.mul.Tensor, aten.div.Tensor, aten.sub.Tensor}


def explain_linear(node: fx.Node) -> str | None:
    """A matmul one of whose operands is a frozen weight reached through ops a linear's
    pattern does not read through (a cast, a scale, an expand), or a 3-D one."""
    weights = {aten.mm.default: [1], aten.addmm.default: [2], aten.linear.default: [1]}.get(
        node.target, [0, 1] if node.target in MATMULS else [])
    for operand in (node.args[i] for i in weights if isinstance(node.args[i], fx.Node)):
        path, current = [], operand
        while (current.op == "call_function" and current.target in _WEIGHT_PATH
               and len(path) < 4):
            path.append(short_target(current))
            current = current.args[0]
        if current.op != "get_attr":
            continue
        weight = current.meta.get("attnopt_parameter") or current.target
        val = current.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() != 2:
            return (f"{short_target(node)} with a {val.dim()}-D weight {weight}: not a linear "
                    "layer (w4a16 takes 2-D weights)")
        if path[:1] in (["aten.t"], ["aten.transpose.int"], ["aten.permute"]):
            path = path[1:]  # the linear patterns read one transposition of the weight
        if path:
            return (f"weight {weight} reaches the matmul through {' -> '.join(reversed(path))}:"
                    " only a frozen weight used as stored (or transposed) is quantized")
        return (f"{short_target(node)} reads weight {weight} with arguments a linear layer does "
                "not have (addmm's beta or alpha, a bias of another shape): left in float")
    return None
