"""linear: what `x @ Wᵀ + b` with a frozen weight looks like in an ATen graph, and the
`linear_fusion` pass that packs int4 linears reading the same input into one GEMM.

Spellings of one linear layer (x is [M, K]; N-D inputs are flattened by views around the call):

    addmm(b, x, t(W))     nn.Linear / F.linear with a bias; W stored [N, K]
    mm(x, t(W))           ... without a bias
    addmm(b, x, W)        GPT-2's Conv1D: W stored [K, N]
    mm(x, W)              x @ W with a 2-D parameter
    linear(x, W, b)       graphs that keep F.linear whole (torch.export), any rank of x

`t(W)` may also be spelled `transpose(W, 0, 1)` or `permute(W, [1, 0])`.

Horizontal fusion: Q/K/V projections (and gate/up) read the same activations. Packed int4
weights concatenate along N for free (rows are independent), so k such linears become one GEMM
over the concatenation and k column slices: one launch and one read of x instead of k. Only
int4 linears are fused: concatenating float weights would copy them (the frozen weights are
the model's own parameters).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily

from attnopt.backends import int4_cpu, ops  # noqa: F401  (ops registers torch.ops.attnopt.*)
from attnopt.compiler.graph import fake_value, insert_call
from attnopt.compiler.options import Options
from attnopt.compiler.pattern import Call, Capture, Literal, Match, bound_arguments

aten = torch.ops.aten
w4a16_linear = torch.ops.attnopt.w4a16_linear.default


def is_constant(v: object) -> bool:
    return isinstance(v, fx.Node) and v.op == "get_attr"


weight = Capture("weight", where=is_constant)
weight_t = (Call(aten.t.default, weight, name="transposed")
            | Call(aten.transpose.int, weight, Literal("t0"), Literal("t1"), name="transposed")
            | Call(aten.permute.default, weight, [1, 0], name="transposed"))
x, bias = Capture("x"), Capture("bias")
linear = (Call(aten.addmm.default, bias, x, weight_t | weight)
          | Call(aten.mm.default, x, weight_t | weight)
          | Call(aten.linear.default, x, weight, name="transposed")  # W is [N, K] as stored
          | Call(aten.linear.default, x, weight, bias, name="transposed"))


def constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    return getattr(gm, node.target)


def weight_nk(m: Match, gm: fx.GraphModule) -> torch.Tensor:
    """The weight as [out_features, in_features], whichever way it is stored."""
    w = constant(gm, m["weight"])
    return w if "transposed" in m.captures else w.T


def check_linear(m: Match) -> str | None:
    """Structural checks every linear rewrite needs; the pass adds its own."""
    w, xv = fake_value(m["weight"]), fake_value(m["x"])
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return "the weight is not a 2-D tensor"
    if "t0" in m.captures and {m["t0"] % 2, m["t1"] % 2} != {0, 1}:
        return "the weight's transpose is not over its two dims"
    n = w.shape[0] if "transposed" in m.captures else w.shape[1]
    k = w.shape[1] if "transposed" in m.captures else w.shape[0]
    if xv.shape[-1] != k:
        return f"x has {xv.shape[-1]} features but the weight has {k} inputs"
    if not w.dtype.is_floating_point or not xv.dtype.is_floating_point:
        return f"weight {w.dtype} / activations {xv.dtype} are not floating point"
    if "bias" in m.captures:
        b = fake_value(m["bias"])
        if not isinstance(b, torch.Tensor) or tuple(b.shape) not in ((n,), (1, n)):
            shape = list(b.shape) if isinstance(b, torch.Tensor) else b
            return f"addmm's added term has shape {shape}, not a per-feature bias [{n}]"
    return None


# --- horizontal fusion of int4 linears ---------------------------------------------------------


class LinearFusion:
    name = counts_as = "linear_fusion"
    needs_frozen_weights = True

    def not_applicable(self, options: Options) -> str | None:
        # Runs whether or not `quantize` is set: an already-int4 model (Int4Linear, from
        # quantize_model or load_quantized) has w4a16_linear calls without it. It only ever
        # fuses those, never float linears (concatenating float weights would copy them).
        return None

    def apply(self, gm: fx.GraphModule, ctx) -> int:
        groups: dict[tuple, list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if node.target is w4a16_linear:
                args = bound_arguments(node)
                packed = [args[k] for k in ("qweight", "scales", "zeros")]
                if all(map(is_constant, packed)) and (args["bias"] is None
                                                      or is_constant(args["bias"])):
                    scales = constant(gm, args["scales"])
                    groups[(_source(args["x"]), args["group_size"], args["impl"], scales.dtype,
                            scales.shape[1])].append(node)
        fused = 0
        for nodes in groups.values():
            if len(nodes) > 1:
                _fuse(gm, nodes)
                fused += 1
        return fused


def _source(x: fx.Node) -> tuple:
    """A key equal for inputs that compute the same value from the same tensor: each linear of
    a 3-D input flattens it with a view of its own, and AWQ-scaled siblings each multiply it by
    the one shared scale, so the key looks through views and products with a constant."""
    if x.op == "call_function" and x.target in (aten.view.default, aten._unsafe_view.default,
                                                 aten.reshape.default):
        # A symbolic size is unhashable: key it by its expression, equal for equal sizes.
        return ("view", _source(x.args[0]), tuple(
            d.node.expr if isinstance(d, torch.SymInt) else d for d in fake_value(x).shape))
    if x.target is aten.mul.Tensor and len(x.args) == 2 and is_constant(x.args[1]):
        return ("mul", _source(x.args[0]), x.args[1].target)
    return (x,)


def _fuse(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    graph = gm.graph
    calls = [bound_arguments(n) for n in nodes]
    with unset_fake_temporarily():
        parts = {k: [constant(gm, c[k]) for c in calls] for k in ("qweight", "scales", "zeros")}
        sizes = [q.shape[0] for q in parts["qweight"]]
        packed = {k: torch.cat(v) for k, v in parts.items()}
        if any(c["bias"] is not None for c in calls):
            ref = parts["scales"][0]
            packed["bias"] = torch.cat([
                constant(gm, c["bias"]).reshape(-1).to(ref.dtype) if c["bias"] is not None
                else ref.new_zeros(n) for c, n in zip(calls, sizes, strict=True)])
        if fake_value(calls[0]["x"]).device.type == "cpu":
            int4_cpu.prepare(packed["qweight"], packed["scales"], packed["zeros"],
                             calls[0]["group_size"])
    with graph.inserting_before(nodes[0]):
        prefix = f"{nodes[0].name}_w4a16_fused"
        attrs = {k: constant_node(gm, f"{prefix}_{k}", t) for k, t in packed.items()}
        first = calls[0]
        out = insert_call(graph, w4a16_linear, (
            first["x"], attrs["qweight"], attrs["scales"], attrs["zeros"], attrs.get("bias"),
            first["group_size"]), {"impl": first["impl"]})
    start = 0
    for node, call, n in zip(nodes, calls, sizes, strict=True):
        with graph.inserting_before(node):
            piece = insert_call(graph, aten.slice.Tensor, (out, -1, start, start + n))
            if not _views_accept(node, fake_value(piece)):
                piece = insert_call(graph, aten.clone.default, (piece,),
                                    {"memory_format": torch.contiguous_format})
        start += n
        node.replace_all_uses_with(piece)
        graph.erase_node(node)
        for k in ("qweight", "scales", "zeros", "bias"):
            if call[k] is not None and not call[k].users:
                _erase_constant(gm, call[k])


def _erase_constant(gm: fx.GraphModule, node: fx.Node) -> None:
    """Free a constant nothing reads any more. The graph's namespace keeps erased nodes (names
    stay unique), so their meta must let go of the tensor too."""
    gm.graph.erase_node(node)
    node.meta.clear()
    if hasattr(gm, node.target):
        delattr(gm, node.target)


def _views_accept(node: fx.Node, value: torch.Tensor) -> bool:
    """Whether every view downstream of `node` (traced on a contiguous result) is still a valid
    view of `value`, a column slice; if so their fake values are updated to its strides."""
    views = (aten.view.default, aten._unsafe_view.default)
    for user in node.users:
        if user.target not in views:
            continue
        try:
            with detect_fake_mode([value]) or contextlib.nullcontext():
                new = user.target(value, *user.args[1:])
        except RuntimeError:
            return False
        if not _views_accept(user, new):
            return False
        user.meta["val"] = new
    return True


def constant_node(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> fx.Node:
    gm.register_buffer(name, tensor, persistent=False)
    node = gm.graph.get_attr(name)
    node.meta["val"] = tensor
    return node


linear_fusion_pass = LinearFusion()
