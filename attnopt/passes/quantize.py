"""quantize: with `quantize="w4a16"`, every eligible linear becomes `attnopt::w4a16_linear`.

A linear is eligible when its weight is a frozen 2-D float parameter (so only inference graphs),
its module is not matched by a `skip` glob (default: `lm_head`, whose error every token sees),
and its activations are fp16, bf16 or fp32. The weight is quantized here, once, at compile time:
round-to-nearest asymmetric uint4 in groups of `group_size` along K (`backends/int4.py`), scales
in the activation dtype. Each layer's relative quantization error ‖W − Ŵ‖ / ‖W‖ goes into the
report. Activation-aware scaling needs calibration data, so it is the offline path's job
(`attnopt.quantization.awq`); a checkpoint it wrote already holds `w4a16_linear` calls.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from attnopt.backends import int4, int4_cpu
from attnopt.compiler.graph import fake_value, insert_call
from attnopt.compiler.options import Options
from attnopt.compiler.pattern import Match, Rule
from attnopt.compiler.rewrite import PatternPass
from attnopt.passes.linear import (
    check_linear,
    constant_node,
    linear,
    w4a16_linear,
    weight_nk,
)

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def module_of(m: Match) -> str | None:
    """The linear's module path (`model.layers.0.mlp.up_proj`) when the weight is a parameter."""
    name = m["weight"].meta.get("attnopt_parameter")
    return name.rsplit(".", 1)[0] if name and "." in name else name


def skip_glob(module: str | None, globs: tuple[str, ...]) -> str | None:
    """The first glob that names `module` whole or a dotted suffix of it (`lm_head` skips
    `model.lm_head` too)."""
    if module is None:
        return None
    return next((g for g in globs if fnmatch.fnmatchcase(module, g)
                 or fnmatch.fnmatchcase(module, "*." + g)), None)


def check(m: Match, ctx) -> str | None:
    if reason := check_linear(m):
        return reason
    if glob := skip_glob(module_of(m), ctx.options.skip):
        return f"{module_of(m)} is left in float: it matches skip glob {glob!r}"
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
    ctx.note(f"{module_of(m) or m['weight'].name} [{w.shape[0]}x{w.shape[1]}]: "
             f"relative error {error:.4f}")
    return insert_call(graph, w4a16_linear, (x, q, s, z, m.get("bias"), packed.group_size),
                       {"impl": ctx.options.kernels})


def relative_error(w: torch.Tensor, packed: int4.PackedInt4) -> float:
    wf = w.float()
    return ((packed.dequantize(torch.float32) - wf).norm() / wf.norm().clamp_min(1e-30)).item()


def _requested(options: Options) -> str | None:
    return None if options.quantize == "w4a16" else "quantize is not set"


quantize_pass = PatternPass("quantize", counts_as="w4a16_linear", rules=[
    Rule("w4a16", linear, rewrite, check),
], needs_frozen_weights=True, applies=_requested)
