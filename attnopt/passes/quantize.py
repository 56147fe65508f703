"""quantize: with `quantize="w4a16"`, every eligible linear becomes `attnopt::w4a16_linear`,
and the experts of every eligible `attnopt::moe` become `attnopt::moe_w4a16`.

A linear is eligible when its weight is a frozen 2-D float parameter (so only inference graphs),
its module is not matched by a `skip` glob (default: `lm_head`, whose error every token sees),
and its activations are fp16, bf16 or fp32. The weight is quantized here, once, at compile time:
round-to-nearest asymmetric uint4 in groups of `group_size` along K (`backends/int4.py`), scales
in the activation dtype. Each layer's relative quantization error ‖W − Ŵ‖ / ‖W‖ goes into the
report. Activation-aware scaling needs calibration data, so it is the offline path's job
(`attnopt.quantization.awq`); a checkpoint it wrote already holds `w4a16_linear` calls.

MoE blocks: the moe pass runs first and leaves `attnopt::moe` calls on frozen stacked expert
weights (gate_up [E, 2I, H], down [E, H, I]; views of the model's own tensors where it stores
them transposed). Each such call whose experts module (named by its weights,
`model.layers.0.mlp.experts`) no `skip` glob names gets every expert matrix quantized the same
way, stacked over E, and becomes one `attnopt::moe_w4a16` with the same expert form and float
biases (GPT-OSS's clamped SwiGLU, interleaved gate/up, Llama-4's weighted input). The router
stays what it was (a linear, quantized or not like any other). These rewrites are not counted
(the counts keep their meaning: `w4a16_linear` counts linears, `moe` MoE blocks whatever their
weights); each block's error goes into the report's notes as
`<experts> [moe ...]: relative error <e>`.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from attnopt.backends import int4, int4_cpu
from attnopt.compiler.graph import call_site, fake_value, insert_call
from attnopt.compiler.options import Options
from attnopt.compiler.pattern import Call, Capture, Literal, Match, Rule
from attnopt.compiler.rewrite import PatternPass
from attnopt.passes.linear import (
    check_linear,
    constant,
    constant_node,
    is_constant,
    linear,
    w4a16_linear,
    weight_nk,
)
from attnopt.passes.misses import explain_linear

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def owner_of(m: Match) -> str | None:
    """The module that owns the weight (`model.embed_tokens` for a tied `lm_head`), when the
    weight is a parameter."""
    name = m["weight"].meta.get("attnopt_parameter")
    return name.rsplit(".", 1)[0] if name and "." in name else name


def module_of(m: Match) -> str | None:
    """The layer as the user knows it: the module whose forward calls this linear (`lm_head`),
    else the weight's owner."""
    return call_site(m.anchor) or owner_of(m)


def layer_name(m: Match) -> str:
    """`module_of`, and the owner of a weight another module owns (a tied one)."""
    module, owner = module_of(m), owner_of(m)
    if module is None:
        return m["weight"].name
    return module if owner in (None, module) else f"{module} (weight of {owner}, tied)"


def skip_glob(module: str | None, globs: tuple[str, ...]) -> str | None:
    """The first glob that names `module` whole or a dotted suffix of it (`lm_head` skips
    `model.lm_head` too)."""
    if module is None:
        return None
    return next((g for g in globs if fnmatch.fnmatchcase(module, g)
                 or fnmatch.fnmatchcase(module, "*." + g)), None)


def skipped_by(m: Match, globs: tuple[str, ...]) -> str | None:
    """The skip glob that names a module using this weight: the layer calling it or the
    weight's owner (a tied `lm_head` is skipped by 'lm_head' and by 'model.embed_tokens')."""
    return skip_glob(module_of(m), globs) or skip_glob(owner_of(m), globs)


def check(m: Match, ctx) -> str | None:
    if reason := check_linear(m):
        return reason
    if m["weight"].meta.get("attnopt_parameter") is None:
        return (f"{m['weight'].name} is a constant the model makes in its forward, not a "
                "parameter: left in float")
    if glob := skipped_by(m, ctx.options.skip):
        return f"{layer_name(m)} is left in float: it matches skip glob {glob!r}"
    dtype = fake_value(m["x"]).dtype
    if dtype not in ACTIVATION_DTYPES:
        return f"activations are {dtype}; w4a16 takes fp16, bf16 or fp32"
    return None


def rewrite(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    gm, x = graph.owning_module, m["x"]
    xv = fake_value(x)
    with unset_fake_temporarily():
        w = weight_nk(m, gm)
        packed = int4.quantize_rtn(w, ctx.options.group_size, xv.dtype)
        error = relative_error(w, packed)
        if xv.device.type == "cpu":
            int4_cpu.prepare(packed.qweight, packed.scales, packed.zeros, packed.group_size)
    name = f"{m.anchor.name}_w4a16"
    q, s, z = (constant_node(gm, f"{name}_{k}", getattr(packed, k))
               for k in ("qweight", "scales", "zeros"))
    ctx.note(f"{layer_name(m)} [{w.shape[0]}x{w.shape[1]}]: "
             f"relative error {error:.4f}")
    return insert_call(graph, w4a16_linear, (x, q, s, z, m.get("bias"), packed.group_size),
                       {"impl": ctx.options.kernels})


def relative_error(w: torch.Tensor, packed: int4.PackedInt4) -> float:
    wf = w.float()
    return ((packed.dequantize(torch.float32) - wf).norm() / wf.norm().clamp_min(1e-30)).item()


# --- MoE experts ------------------------------------------------------------------------------

# The expert form and the float biases carry over to moe_w4a16 unchanged.
FORM_ARGUMENTS = ("b_gate_up", "b_down", "interleaved", "alpha", "limit", "weight_on_input")
moe = Call(torch.ops.attnopt.moe.default, Capture("x"), Capture("topk_ids"),
           Capture("topk_weights"), Capture("w_gate_up", where=is_constant),
           Capture("w_down", where=is_constant), Literal("activation"), Literal("impl"),
           **{name: Capture(name) for name in FORM_ARGUMENTS})


def experts_of(m: Match) -> str | None:
    """The experts module (`model.layers.0.mlp.experts`) when the weights are parameters."""
    name = m["w_gate_up"].meta.get("attnopt_parameter")
    return name.rsplit(".", 1)[0] if name and "." in name else name


def check_moe(m: Match, ctx) -> str | None:
    if glob := skip_glob(experts_of(m), ctx.options.skip):
        return f"{experts_of(m)} is left in float: it matches skip glob {glob!r}"
    dtype = fake_value(m["x"]).dtype
    if dtype not in ACTIVATION_DTYPES:
        return f"activations are {dtype}; w4a16 takes fp16, bf16 or fp32"
    return None


def quantize_experts(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> int4.PackedInt4:
    """`int4.quantize_rtn` of each expert matrix of w [E, N, K], stacked: qweight
    [E, N, Kp/2], scales and zeros [E, N, Kp/g]. One expert at a time, so the fp32
    temporaries are one matrix's, not the whole layer's."""
    parts = [int4.quantize_rtn(m, group_size, dtype) for m in w]
    return int4.PackedInt4(*(torch.stack([getattr(p, k) for p in parts])
                             for k in ("qweight", "scales", "zeros")), group_size, w.shape[2])


def rewrite_moe(m: Match, graph: fx.Graph, ctx) -> fx.Node:
    gm, x = graph.owning_module, m["x"]
    xv = fake_value(x)
    with unset_fake_temporarily():
        weights = [constant(gm, m[k]) for k in ("w_gate_up", "w_down")]
        packed = [quantize_experts(w, ctx.options.group_size, xv.dtype) for w in weights]
        error = experts_error(weights, packed)
        if xv.device.type == "cpu":
            for p in packed:
                int4_cpu.prepare(p.qweight, p.scales, p.zeros, p.group_size)
    name = f"{m.anchor.name}_w4a16"
    args = [constant_node(gm, f"{name}_{part}_{k}", getattr(p, k))
            for part, p in zip(("gate_up", "down"), packed, strict=True)
            for k in ("qweight", "scales", "zeros")]
    e, two_i, h = weights[0].shape
    ctx.note(f"{experts_of(m) or m['w_gate_up'].name} [moe: {e} experts, gate_up "
             f"{two_i}x{h}, down {h}x{two_i // 2}]: relative error {error:.4f}")
    return insert_call(graph, torch.ops.attnopt.moe_w4a16.default, (
        x, m["topk_ids"], m["topk_weights"], *args, ctx.options.group_size, m["activation"]),
        {"impl": ctx.options.kernels, **{name: m[name] for name in FORM_ARGUMENTS}})


def experts_error(weights: list[torch.Tensor], packed: list[int4.PackedInt4]) -> float:
    """‖W − Ŵ‖ / ‖W‖ over all the expert matrices of one block together."""
    diff = ref = 0.0
    for w, p in zip(weights, packed, strict=True):
        for e in range(w.shape[0]):  # one expert at a time, as `quantize_experts`
            deq = int4.dequantize(p.qweight[e], p.scales[e], p.zeros[e], p.group_size,
                                  p.in_features, torch.float32)
            wf = w[e].float()
            diff += (deq - wf).square().sum().item()
            ref += wf.square().sum().item()
    return (diff / max(ref, 1e-30)) ** 0.5


class QuantizePass:
    """The linear rule, counted as `w4a16_linear`, then the MoE rule, which adds no count.

    A model that is int4 already (`Int4Linear`s, from `quantize_model` or `load_quantized`)
    arrives with `w4a16_linear` calls on constant weights: they count as `w4a16_linear` too,
    whether or not `quantize` is set (issue 18), so the count is the graph's int4 linears, and
    they run on the implementation the `kernels` option names. Without `quantize`, nothing
    else is done."""

    name = "quantize"
    counts_as = "w4a16_linear"
    needs_frozen_weights = True

    def __init__(self) -> None:
        self.linears = PatternPass("quantize", counts_as="w4a16_linear", rules=[
            Rule("w4a16", linear, rewrite, check)], needs_frozen_weights=True,
            explain=explain_linear)
        self.experts = PatternPass("quantize", counts_as="w4a16_linear", rules=[
            Rule("moe_w4a16", moe, rewrite_moe, check_moe)], needs_frozen_weights=True)

    def not_applicable(self, options: Options) -> str | None:
        return None  # int4 linears already in the graph are counted either way

    def apply(self, gm: fx.GraphModule, ctx) -> int:
        arrived = [node for node in gm.graph.nodes if node.target is w4a16_linear
                   and is_constant(node.args[1])]
        for node in arrived:  # the `kernels` option picks their implementation too
            node.kwargs = {**node.kwargs, "impl": ctx.options.kernels}
        already = len(arrived)
        if already:
            ctx.note(f"{already} linears arrived in int4 (Int4Linear): counted, kept as they are")
        if ctx.options.quantize != "w4a16":
            return already
        rewrites = self.linears.apply(gm, ctx)
        self.experts.apply(gm, ctx)  # recorded in the notes, not in the counts
        return already + rewrites


quantize_pass = QuantizePass()
