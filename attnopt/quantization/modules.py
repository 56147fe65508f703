"""`Int4Linear`: a linear layer whose weight is stored as packed int4 (`backends/int4.py`).

Every tensor it holds is an `nn.Parameter` with `requires_grad=False` rather than a buffer: the
attnopt backend freezes parameters into graph constants at compile time, and only constants
let its `linear_fusion` pass concatenate the weights of sibling int4 linears (Q/K/V, gate/up).

An optional `input_scale [K]` multiplies the activations before the matmul. AWQ
(`quantization/awq.py`) quantizes `W · diag(1 / input_scale)` instead of `W`, so that input
channels with large activations keep more weight precision; `x * input_scale` undoes it.

An optional `input_order [K]` (int64) permutes the input features first, `x[..., input_order]`:
a GPTQ checkpoint quantized in activation order (`desc_act`) groups columns that are not
adjacent in W. Its columns are reordered once at load so that each group is contiguous, as the
packed layout needs, and the activations are gathered into that order on each call.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from attnopt.backends import int4, ops  # noqa: F401  (ops registers torch.ops.attnopt.*)


def frozen(t: Tensor) -> nn.Parameter:
    """`t` as a parameter that needs no gradient; a Parameter is kept as is (it may be shared)."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)


def conv1d_class() -> type | None:
    """transformers' `Conv1D` (GPT-2's linear, weight stored [in, out]) if transformers is loaded.
    A model that holds one has imported it, so there is nothing to import here."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def source_weight(module: nn.Module) -> tuple[Tensor, bool] | None:
    """(weight as [out, in], whether it is stored transposed) for an `nn.Linear` or a `Conv1D`
    with a 2-D float weight; None for anything else."""
    conv1d = conv1d_class()
    if isinstance(module, nn.Linear):
        w, transposed = module.weight, False
    elif conv1d is not None and isinstance(module, conv1d):
        w, transposed = module.weight.T, True
    else:
        return None
    return (w, transposed) if w.dim() == 2 and w.is_floating_point() else None


def quantize_weight(w: Tensor, group_size: int, input_scale: Tensor | None = None,
                    dtype: torch.dtype | None = None) -> int4.PackedInt4:
    """RTN-quantize `w [N, K]` (divided column-wise by `input_scale`, if any) in fp32, with
    scales and zeros in `dtype` (default: w's). The AWQ search calls this too, so the error it
    measures is the error of the module it builds."""
    wf = w.detach().float()
    if input_scale is not None:
        wf = wf / input_scale.detach().float()
    return int4.quantize_rtn(wf, group_size, dtype or w.dtype)


class Int4Linear(nn.Module):
    """y = (x * input_scale) @ Ŵᵀ + bias with Ŵ the int4 weight, through
    `torch.ops.attnopt.w4a16_linear`. The constructor makes an empty module of the given
    shape (to load a checkpoint into); `from_linear` quantizes an existing layer."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, *,
                 bias: bool = True, input_scale: bool = False, input_order: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if group_size not in int4.GROUP_SIZES:
            raise ValueError(f"group_size must be one of {int4.GROUP_SIZES}, got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        kp = int4.padded(in_features, group_size)
        float_kw = {"dtype": dtype, "device": device}
        self.qweight = frozen(torch.zeros(out_features, kp // 2, dtype=torch.uint8, device=device))
        self.scales = frozen(torch.ones(out_features, kp // group_size, **float_kw))
        self.zeros = frozen(torch.zeros(out_features, kp // group_size, **float_kw))
        self.bias = frozen(torch.zeros(out_features, **float_kw)) if bias else None
        self.input_scale = frozen(torch.ones(in_features, **float_kw)) if input_scale else None
        self.input_order = frozen(torch.arange(in_features, device=device)) if input_order else None

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int = 128,
                    input_scale: Tensor | None = None) -> Int4Linear:
        """Quantize an `nn.Linear` or a transformers `Conv1D`. A given `input_scale` Parameter
        is used as is, so siblings built with the same one share it (one graph input)."""
        found = source_weight(linear)
        if found is None:
            raise TypeError(f"Int4Linear.from_linear takes an nn.Linear or a transformers Conv1D "
                            f"with a 2-D float weight, got {type(linear).__name__}")
        w, _ = found
        k = w.shape[1]
        if input_scale is not None and tuple(input_scale.shape) != (k,):
            raise ValueError(f"input_scale must have shape [{k}] (one per input feature), "
                             f"got {list(input_scale.shape)}")
        return cls.from_packed(quantize_weight(w, group_size, input_scale), linear.bias,
                               input_scale)

    @classmethod
    def from_packed(cls, packed: int4.PackedInt4, bias: Tensor | None = None,
                    input_scale: Tensor | None = None) -> Int4Linear:
        """The layer holding `packed` (made by any quantizer), with `bias` and `input_scale`
        (kept as the Parameters they are, so siblings can share one)."""
        module = cls(packed.in_features, packed.out_features, packed.group_size,
                     bias=bias is not None, input_scale=input_scale is not None,
                     dtype=packed.scales.dtype, device="meta")
        module.qweight, module.scales, module.zeros = (
            frozen(packed.qweight), frozen(packed.scales), frozen(packed.zeros))
        if bias is not None:
            module.bias = frozen(bias.detach())
        if input_scale is not None:
            module.input_scale = frozen(input_scale)
        return module

    def packed(self) -> int4.PackedInt4:
        return int4.PackedInt4(self.qweight, self.scales, self.zeros, self.group_size,
                               self.in_features)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The [out, in] float weight this layer applies: Ŵ · diag(input_scale), its columns
        put back in input order (column i of Ŵ reads input feature input_order[i])."""
        w = self.packed().dequantize(torch.float32)
        if self.input_scale is not None:
            w = w * self.input_scale.float()
        if self.input_order is not None:
            w = torch.empty_like(w).index_copy_(1, self.input_order, w)
        return w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        # The int4 kernels zero-pad x to the padded K, so a narrower x would run silently. The
        # check also tells torch.export that the feature dim is static (MatMulNBits needs K).
        # (A message built from self or x would make Dynamo break the graph here.)
        torch._check(x.shape[-1] == self.in_features,
                     lambda: "Int4Linear: the input's last dim must equal in_features")
        if self.input_order is not None:
            x = x.index_select(-1, self.input_order)
        if self.input_scale is not None:
            x = x * self.input_scale
        return torch.ops.attnopt.w4a16_linear(x, self.qweight, self.scales, self.zeros, self.bias,
                                              self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"input_scale={self.input_scale is not None}, "
                f"input_order={self.input_order is not None}")
