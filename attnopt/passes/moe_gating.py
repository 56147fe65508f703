"""What every MoE form shares between an expert's two projections: the gating, as patterns, and
the `ExpertForm` a match stands for.

The first projection gives gate and up, either from one [S, 2I] product (split in halves by
`chunk`, or its even and odd columns when the weight interleaves them, GPT-OSS) or from two
products (a ModuleList expert's w1 and w3). Then

    act(gate) ⊙ up                                    act SiLU, GELU or its tanh form
    (clamp(up, -L, L) + 1) ⊙ (g σ(α g)),  g = clamp(gate, max=L)     GPT-OSS ("swiglu_oai")

with the products in either order. The projections themselves differ by form (a grouped GEMM,
a batched one over gathered weights, one `mm` per expert): each form passes its own pattern for
them, and the gating patterns are built around it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from attnopt.backends.reference import ExpertForm
from attnopt.compiler import layout
from attnopt.compiler.graph import fake_value
from attnopt.compiler.pattern import ANY, Call, Capture, Literal, Match, Pattern, is_number

aten = torch.ops.aten
prims = torch.ops.prims
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_TO_THE_END = 2**63 - 1  # what `t[..., ::2]` puts as a slice's end


def _act(gate: Pattern) -> Pattern:
    return (Call(aten.silu.default, gate, name="silu")
            | Call(aten.gelu.default, gate, approximate=Literal("approximate")))


def _activations(gate: Pattern, up: Pattern) -> Pattern:
    """act(gate) ⊙ up, or GPT-OSS's clamped SwiGLU, for given gate and up patterns."""
    plain = Call(aten.mul.Tensor, _act(gate), up, commutative=True)
    # Constants, or tensors where torch.compile(dynamic=True) made Python floats inputs (refused
    # by `gating_problem` with that reason: the op takes them as constants).
    alpha = Literal("alpha", where=is_number) | Call(
        (prims.convert_element_type.default, aten._to_copy.default), Capture("alpha"), ANY)
    g = Call(aten.clamp.default, gate, None, Capture("limit"))
    u = Call(aten.clamp.default, up, Capture("up_min"), Capture("up_max"))
    glu = Call(aten.mul.Tensor, g, Call(aten.sigmoid.default, Call(
        aten.mul.Tensor, g, alpha, commutative=True)), commutative=True)
    oai = Call(aten.mul.Tensor, Call(aten.add.Tensor, u, 1), glu, commutative=True,
               name="swiglu_oai")
    return plain | oai


def gated(gate_up: Pattern) -> Pattern:
    """h from one [.., 2I] gate/up projection: its halves (`chunk` lowers to split; slices
    too), or its even and odd columns (captured as "interleaved")."""
    halves = Call(aten.split.Tensor, gate_up, Capture("intermediate"), Literal("split_dim"),
                  name="gate_up_split")
    sliced_halves = (Call(aten.slice.Tensor, gate_up, Literal("gate_dim"), 0,
                          Capture("intermediate"), name="gate_up_split"),
                     Call(aten.slice.Tensor, gate_up, Literal("up_dim"), Capture("intermediate"),
                          Literal("up_end")))
    even_odd = (Call(aten.slice.Tensor, gate_up, Literal("gate_dim"), 0, Literal("gate_end"), 2,
                     name="interleaved"),  # also the node whose rank the check reads
                Call(aten.slice.Tensor, gate_up, Literal("up_dim"), 1, Literal("up_end"), 2))
    return (_activations(Call(operator.getitem, halves, 0), Call(operator.getitem, halves, 1))
            | _activations(*sliced_halves) | _activations(*even_odd))


def gated_pair(gate: Pattern, up: Pattern) -> Pattern:
    """h from two projections, gate and up (a ModuleList expert's w1 and w3)."""
    return _activations(gate, up)


def form_of(m: Match) -> ExpertForm:
    """The expert form a gating match stands for (its layout, activation and constants)."""
    interleaved = "interleaved" in m.captures
    if "swiglu_oai" in m.captures:
        return ExpertForm("swiglu_oai", interleaved, float(m["alpha"]), float(m["limit"]))
    if "silu" in m.captures:
        return ExpertForm("silu", interleaved)
    return ExpertForm("gelu_tanh" if m["approximate"] == "tanh" else "gelu", interleaved)


def gating_problem(m: Match, gate_up_width: object | None) -> str | None:
    """Why a gating match is not one of the forms the op computes, else None. `gate_up_width`
    is the fused projection's last dim (None for two projections)."""
    if "swiglu_oai" in m.captures:
        limit, lo, hi = m["limit"], m["up_min"], m["up_max"]
        if any(isinstance(v, fx.Node) for v in (m["alpha"], limit, lo, hi)):
            return ("the clamped SwiGLU's alpha or limit is a tensor input (torch.compile's "
                    "dynamic=True makes Python floats inputs); the op takes them as constants: "
                    "compile without dynamic=True (automatic dynamic shapes keep them constant)")
        if not is_number(limit) or not limit > 0 or lo != -limit or hi != limit:
            return (f"clamped SwiGLU with gate clamp max={limit} and up clamp "
                    f"[{lo}, {hi}]: not one positive limit L with up in [-L, L]")
    if gate_up_width is None:
        return None
    width = gate_up_width
    first = fake_value(m.get("gate_up_split", m.get("interleaved")))
    rank = len((first[0] if isinstance(first, list | tuple) else first).shape)
    for key in ("split_dim", "gate_dim", "up_dim"):
        if key in m.captures and m[key] % rank != rank - 1:
            return f"gate and up are taken along dim {m[key]}, not the last"
    if "interleaved" in m.captures:
        if not all(layout.same(m[k], _TO_THE_END) or _same_size(m[k], width)
                   for k in ("gate_end", "up_end")):
            return "the even/odd column slices stop before the end of the gate/up projection"
        return None
    inter = layout.value(m["intermediate"])
    if not (isinstance(inter, int | torch.SymInt) and layout.same(inter * 2, width)):
        return f"gate/up split at {inter}, not at half of {width}"
    if "up_end" in m.captures and not (layout.same(m["up_end"], _TO_THE_END)
                                      or _same_size(m["up_end"], width)):
        return "the up slice stops before the end of the gate/up projection"
    return None


def _same_size(size: object, want: object) -> bool:
    v = layout.value(size)
    return isinstance(v, int | torch.SymInt) and layout.same(v, want)


def noop_reshape(node: fx.Node) -> bool:
    """`squeeze(unsqueeze(v, d), d)` (and the unsqueeze of such pairs): the value v itself.
    Functionalising transformers' in-place bias add on a squeezed bmm result leaves these."""
    if node.target is aten.squeeze.dim:
        inner = node.args[0]
        return (isinstance(inner, fx.Node) and inner.target is aten.unsqueeze.default
                and _dim(inner, inner.args[1]) == _dim(inner, node.args[1]))
    if node.target is aten.unsqueeze.default and node.users:
        return all(noop_reshape(u) and u.args[0] is node for u in node.users)
    return False


def _dim(unsqueezed: fx.Node, d: int) -> int:
    return d % len(fake_value(unsqueezed).shape)
