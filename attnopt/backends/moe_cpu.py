"""The CPU path of `attnopt::moe` (semantics: `reference.moe`): sorted and grouped, in plain
PyTorch.

The T·k (token, expert) pairs are sorted by expert (a stable sort, so within an expert the
pairs keep token order), which makes each expert's rows one contiguous slice of the gathered
activations. Each projection is then one grouped GEMM over those slices: ATen's
`torch._grouped_mm` (which has a CPU kernel in torch 2.13) where its layout rules hold, else one
`torch.mm` per *non-empty* expert — the Python loop runs over the histogram of experts, never
over tokens. The weighted expert outputs go back to pair order and the k outputs of each token
are summed in fp32, in slot order.

Precision (compare `reference.moe`): ATen's CPU GEMMs return their input dtype, so with 16-bit
x the gate/up and down products are rounded to 16 bits (as in eager transformers); activation,
gating, biases, routing weights and the sum over k run in fp32, and the intermediate and the
result are rounded once each to x's dtype (and, with `weight_on_input`, the scaled input, as in
eager).

`moe_w4a16` (int4 expert weights) keeps that structure and replaces each grouped GEMM by a loop
over the non-empty experts, each one ATen's int4 CPU kernel on that expert's packed matrix
(`int4_cpu`: activations rounded to bf16, per-expert repacks cached on the stacked weight and
made at compile time by the quantize pass), or, for a shape that kernel does not take (N not a
multiple of 16), a GEMM on that one expert's dequantized weight. Either way only the experts a
token picked are read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnopt.backends import int4, int4_cpu, reference
from attnopt.backends.reference import ExpertForm

# dtypes torch._grouped_mm takes on CPU; its operands' non-unit strides and base addresses must
# be multiples of 16 bytes (odd H or I fall back to the per-expert loop).
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_ok(*mats: Tensor) -> bool:
    """True if `torch._grouped_mm` accepts these operands: a supported dtype, a 16-byte aligned
    base, and (ATen's rule) one of the last two dims of unit stride with the other's stride, as
    every other stride, a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    for m in mats:
        if m.dtype not in _GROUPED_DTYPES or m.data_ptr() % 16:
            return False
        align = 16 // m.element_size()
        (rows, cols), (s_row, s_col) = m.shape[-2:], m.stride()[-2:]
        if s_row == 1 and s_col >= max(1, rows):
            lead = s_col
        elif s_col == 1 and s_row >= max(1, cols):
            lead = s_row
        else:
            return False
        if lead % align or any(s % align for s in m.stride()[:-2]):
            return False
    return True


def grouped_linear(a: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Rows of `a` [S, K] sorted by expert, `counts[e]` of them for expert e, each times
    w[e]ᵀ (w [E, N, K]): the [S, N] result, in a's dtype."""
    wt = w.transpose(1, 2)
    offsets = counts.cumsum(0, dtype=torch.int32)
    if grouped_mm_ok(a, wt):
        return torch._grouped_mm(a, wt, offs=offsets)
    out = torch.empty((a.shape[0], w.shape[1]), dtype=a.dtype, device=a.device)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(a[start:end], wt[e], out=out[start:end])
        start = end
    return out


def grouped_linear_int4(a: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                        group_size: int, counts: Tensor) -> Tensor:
    """`grouped_linear` with int4 expert weights (qweight [E, N, Kp/2], scales and zeros
    [E, N, Kp/g]): one int4 GEMM per non-empty expert, see the module docstring."""
    n, kp, k = qweight.shape[1], qweight.shape[2] * 2, a.shape[1]
    out = torch.empty((a.shape[0], n), dtype=a.dtype, device=a.device)
    aten_kernel = int4_cpu.supported(n, group_size) is None
    if aten_kernel:
        repacked = int4_cpu.repack_experts(qweight, scales, zeros)
        a = torch.nn.functional.pad(a.to(torch.bfloat16), (0, kp - k))
    start = 0
    for e, end in enumerate(counts.cumsum(0).tolist()):
        if end > start:
            if aten_kernel:
                packed, table = repacked[e]
                out[start:end] = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    a[start:end], packed, group_size, table)
            else:
                w = int4.dequantize(qweight[e], scales[e], zeros[e], group_size, k, a.dtype)
                torch.mm(a[start:end], w.T, out=out[start:end])
        start = end
    return out


def moe(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate_up: Tensor, w_down: Tensor,
        activation: str | ExpertForm = "silu", b_gate_up: Tensor | None = None,
        b_down: Tensor | None = None) -> Tensor:
    """`reference.moe`, sorted by expert and grouped; see the module docstring."""
    reference.check_moe(x, topk_ids, topk_weights, w_gate_up, w_down, activation, b_gate_up,
                        b_down)
    return _sorted_experts(x, topk_ids, topk_weights, w_gate_up.shape[0],
                           ExpertForm.of(activation), b_gate_up, b_down,
                           lambda a, counts: grouped_linear(a, w_gate_up, counts),
                           lambda a, counts: grouped_linear(a, w_down, counts))


def moe_w4a16(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, gate_up_qweight: Tensor,
              gate_up_scales: Tensor, gate_up_zeros: Tensor, down_qweight: Tensor,
              down_scales: Tensor, down_zeros: Tensor, group_size: int,
              activation: str | ExpertForm = "silu", b_gate_up: Tensor | None = None,
              b_down: Tensor | None = None) -> Tensor:
    """`reference.moe_w4a16`, sorted by expert, one int4 GEMM per non-empty expert."""
    reference.check_moe_w4a16(x, topk_ids, topk_weights, gate_up_qweight, gate_up_scales,
                              gate_up_zeros, down_qweight, down_scales, down_zeros, group_size,
                              activation, b_gate_up, b_down)
    return _sorted_experts(
        x, topk_ids, topk_weights, gate_up_qweight.shape[0], ExpertForm.of(activation),
        b_gate_up, b_down,
        lambda a, counts: grouped_linear_int4(a, gate_up_qweight, gate_up_scales, gate_up_zeros,
                                              group_size, counts),
        lambda a, counts: grouped_linear_int4(a, down_qweight, down_scales, down_zeros,
                                              group_size, counts))


def _sorted_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, num_experts: int,
                    form: ExpertForm, b_gate_up: Tensor | None, b_down: Tensor | None,
                    gate_up_mm: Callable, down_mm: Callable) -> Tensor:
    """The sorted, grouped body of `moe`; `gate_up_mm(a, counts)` and `down_mm(a, counts)` are
    the two grouped GEMMs (rows of `a` sorted by expert, `counts[e]` for expert e). Biases are
    gathered per row by the sorted expert ids and added in the compute dtype."""
    reference.check_moe_ids(topk_ids, num_experts)
    t, k = topk_ids.shape
    cdt = reference.compute_dtype(x.dtype)
    if t * k == 0:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)

    # index_select / index_copy_ rather than advanced indexing: the same gathers and scatter,
    # without the milliseconds advanced indexing spends per call on CPU for a few rows.
    expert_sorted, order = torch.sort(topk_ids.reshape(-1), stable=True)
    counts = torch.bincount(expert_sorted, minlength=num_experts)
    routing = topk_weights.reshape(-1).index_select(0, order).to(cdt)[:, None]    # [S, 1]
    xs = x.index_select(0, order // k)                             # [S, H], grouped by expert
    if form.weight_on_input:                                       # rounded to x's dtype
        xs = (xs.to(cdt) * routing).to(x.dtype)
    gate_up = gate_up_mm(xs, counts).to(cdt)                       # [S, 2I]
    if b_gate_up is not None:
        gate_up += b_gate_up.to(cdt).index_select(0, expert_sorted)
    h = form.gated(gate_up).to(x.dtype)                            # [S, I]
    y = down_mm(h, counts).to(cdt)                                 # [S, H]
    if b_down is not None:
        y += b_down.to(cdt).index_select(0, expert_sorted)
    if not form.weight_on_input:
        y.mul_(routing)
    pairs = torch.empty_like(y).index_copy_(0, order, y)           # back to (token, slot) order
    return pairs.view(t, k, -1).sum(1).to(x.dtype)
