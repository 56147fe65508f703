"""The ONNX translations of the attnopt ops, run in ONNX Runtime's CPU provider against the
reference implementations on random inputs: attention (GQA, MQA, boolean and additive masks,
masks broadcast over queries, bottom-right causal, fully masked rows, fp16, new shapes at run
time), softmax (every pre-op) and w4a16_linear (MatMulNBits: padded K, odd block counts, bias,
fp16, packed weights folded into initializers)."""

import math

import numpy as np
import pytest
import torch

from attnopt.backends import int4, reference

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
from attnopt.backends.onnx import OPSET, TRANSLATIONS, optimize  # noqa: E402

TENSOR = object()  # a placeholder in Call's arguments: the next tensor input goes here


class Call(torch.nn.Module):
    """One attnopt op call: tensors are the module's inputs, everything else is fixed."""

    def __init__(self, op, *arguments, **kwargs):
        super().__init__()
        self.op, self.arguments, self.kwargs = op, arguments, kwargs

    def forward(self, *tensors):
        given = iter(tensors)
        args = [next(given) if a is TENSOR else a for a in self.arguments]
        return self.op(*args, **self.kwargs)


def export(module, inputs, dynamic=None):
    program = torch.onnx.export(module.eval(), tuple(inputs), dynamo=True, optimize=False,
                                custom_translation_table=TRANSLATIONS, opset_version=OPSET,
                                dynamic_shapes=dynamic, verbose=False)
    optimize(program.model)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return program.model, session


def run(session, inputs):
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return torch.from_numpy(session.run(None, feeds)[0])


def op_types(model):
    return [node.op_type for node in model.graph]


# --- attention ---------------------------------------------------------------------------------


def qkv(b=2, hq=4, hkv=4, lq=6, lk=6, d=16, dv=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g).to(dtype),
            torch.randn(b, hkv, lk, d, generator=g).to(dtype),
            torch.randn(b, hkv, lk, dv, generator=g).to(dtype))


def bool_mask(*shape, seed=1):
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.3
    m[..., 0] = True  # every row keeps a key: fully masked rows have a test of their own
    return m


def float_mask(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).masked_fill(~bool_mask(*shape, seed=seed), -math.inf)


ATTENTION_CASES = {
    # name: (qkv kwargs, mask maker taking (b, lq, lk) or None, is_causal)
    "mha": ({}, None, False),
    "gqa_bool_mask": ({"hq": 8, "hkv": 2}, lambda b, lq, lk: bool_mask(b, 1, lq, lk), False),
    "mqa_additive_mask": ({"hkv": 1}, lambda b, lq, lk: float_mask(1, 1, lq, lk), False),
    "mask_broadcast_over_queries": ({}, lambda b, lq, lk: bool_mask(b, 1, 1, lk), False),
    "mask_2d": ({"hkv": 2}, lambda b, lq, lk: float_mask(lq, lk), False),
    "mask_1d_over_keys": ({}, lambda b, lq, lk: bool_mask(lk), False),
    "causal_square_gqa": ({"hkv": 2}, None, True),
    "causal_bottom_right": ({"lq": 3, "lk": 7}, None, True),
    "causal_bottom_right_bool_mask": ({"lq": 3, "lk": 7, "hkv": 2},
                                      lambda b, lq, lk: bool_mask(b, 1, lq, lk), True),
    "causal_bottom_right_additive_mask": ({"lq": 3, "lk": 7},
                                          lambda b, lq, lk: float_mask(b, 1, lq, lk), True),
    "value_dim_differs": ({"dv": 8}, None, False),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_matches_reference(name):
    shape, make_mask, causal = ATTENTION_CASES[name]
    q, k, v = qkv(**shape)
    mask = make_mask(q.shape[0], q.shape[2], k.shape[2]) if make_mask else None
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    module = Call(torch.ops.attnopt.attention, TENSOR, TENSOR, TENSOR,
                  TENSOR if mask is not None else None, causal, 0.3)
    model, session = export(module, inputs)
    assert op_types(model).count("Attention") == 1 and "Softmax" not in op_types(model)
    expected = reference.attention(q, k, v, mask, causal, 0.3)
    torch.testing.assert_close(run(session, inputs), expected, rtol=1e-5, atol=1e-5)


def test_attention_fully_masked_row_is_zero():
    q, k, v = qkv(hkv=2)
    mask = bool_mask(2, 1, 6, 6)
    mask[0, 0, 2] = False
    _, session = export(Call(torch.ops.attnopt.attention, TENSOR, TENSOR, TENSOR, TENSOR, False,
                             0.25), [q, k, v, mask])
    got = run(session, [q, k, v, mask])
    assert (got[0, :, 2] == 0).all()
    torch.testing.assert_close(got, reference.attention(q, k, v, mask, False, 0.25))


def test_attention_fp16_gqa_causal():
    q, k, v = qkv(hq=8, hkv=2, dtype=torch.float16)
    _, session = export(Call(torch.ops.attnopt.attention, TENSOR, TENSOR, TENSOR, None, True,
                             0.25), [q, k, v])
    got = run(session, [q, k, v])
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, reference.attention(q, k, v, None, True, 0.25),
                               rtol=2e-3, atol=2e-3)


def test_attention_dynamic_lengths_keep_bottom_right_causal():
    """Exported with Lq == Lk; run with a chunk of 3 new queries against 11 keys."""
    q, k, v = qkv(hkv=2, lq=6, lk=6)
    mask = bool_mask(2, 1, 6, 6)
    auto = torch.export.Dim.AUTO
    dims = {0: auto, 2: auto}
    _, session = export(
        Call(torch.ops.attnopt.attention, TENSOR, TENSOR, TENSOR, TENSOR, True, 0.25),
        [q, k, v, mask], dynamic=((dims, dims, dims, {0: auto, 2: auto, 3: auto}),))
    q, k, v = qkv(b=3, hkv=2, lq=3, lk=11, seed=5)
    mask = bool_mask(3, 1, 3, 11, seed=6)
    torch.testing.assert_close(run(session, [q, k, v, mask]),
                               reference.attention(q, k, v, mask, True, 0.25),
                               rtol=1e-5, atol=1e-5)


# --- softmax -----------------------------------------------------------------------------------


def scores(*shape, dtype=torch.float32, seed=2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


SOFTMAX_CASES = {
    # name: (x, dim, scale, bias, mask, fill, keyword arguments)
    "plain": (scores(2, 3, 5, 7), -1, 1.0, None, None, -math.inf, {}),
    "scale_bias_mask": (scores(2, 3, 5, 7), -1, 0.125, scores(2, 1, 5, 7, seed=3),
                        ~bool_mask(2, 1, 1, 7), -math.inf, {}),
    "keep_mask_finite_fill": (scores(2, 3, 5, 7), -1, 1.0, None, bool_mask(1, 1, 5, 7),
                              -1e4, {"keep_mask": True}),
    "not_last_dim": (scores(4, 6, 5), 1, 2.0, None, None, -math.inf, {}),
    "fp16_in_fp32_out": (scores(2, 5, 7, dtype=torch.float16), -1, 0.5, None, None, -math.inf,
                         {"dtype": torch.float32}),
}


@pytest.mark.parametrize("name", list(SOFTMAX_CASES))
def test_softmax_matches_reference(name):
    x, dim, scale, bias, mask, fill, kwargs = SOFTMAX_CASES[name]
    tensors = [t for t in (x, bias, mask) if t is not None]
    module = Call(torch.ops.attnopt.softmax, TENSOR, dim, scale,
                  TENSOR if bias is not None else None, TENSOR if mask is not None else None,
                  fill, **kwargs)
    model, session = export(module, tensors)
    assert op_types(model).count("Softmax") == 1
    expected = reference.softmax(x, dim, scale, bias, mask, fill, **kwargs)
    got = run(session, tensors)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("safe", [False, True])
def test_softmax_fully_masked_rows_as_eager(safe):
    """NaN from plain softmax, 0 from _safe_softmax, exactly as the reference gives them."""
    x, mask = scores(2, 4, 6), torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, 2] = True
    _, session = export(Call(torch.ops.attnopt.softmax, TENSOR, -1, 1.0, None, TENSOR,
                             -math.inf, safe=safe), [x, mask])
    got = run(session, [x, mask])
    torch.testing.assert_close(got, reference.softmax(x, -1, mask=mask, safe=safe),
                               equal_nan=True)
    assert got[1, 2].isnan().all() != safe


# --- w4a16 linear -------------------------------------------------------------------------------


W4A16_CASES = {
    # name: (M rows as a shape, K, N, group size, bias, dtype)
    "3d_input_bias": ((2, 5), 128, 48, 32, True, torch.float32),
    "padded_k_odd_blocks": ((7,), 150, 32, 32, False, torch.float32),  # Kp 160: 5 blocks
    "padded_k_even_blocks": ((3, 4), 200, 64, 64, True, torch.float32),  # Kp 256: 4 blocks
    "fp16": ((9,), 256, 80, 128, True, torch.float16),
}


@pytest.mark.parametrize("name", list(W4A16_CASES))
def test_w4a16_linear_is_matmulnbits_and_matches_reference(name):
    rows, k, n, group, with_bias, dtype = W4A16_CASES[name]
    g = torch.Generator().manual_seed(4)
    packed = int4.quantize_rtn(torch.randn(n, k, generator=g), group, dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("qweight", "scales", "zeros"):
                self.register_buffer(name, getattr(packed, name))
            self.register_buffer("bias", bias)

        def forward(self, x):
            return torch.ops.attnopt.w4a16_linear(x, self.qweight, self.scales, self.zeros,
                                                  self.bias, group)

    x = torch.randn(*rows, k, generator=g).to(dtype)
    model, session = export(Linear(), [x])
    (node,) = [node for node in model.graph if node.op_type == "MatMulNBits"]
    assert node.domain == "com.microsoft" and node.attributes["K"].value == k
    assert all(v.const_value is not None for v in node.inputs[1:] if v is not None), \
        "the packed weight, scales and zero points must be initializers (ORT prepacks them)"
    assert node.inputs[3].dtype.name == "UINT8"  # packed zero points: MLAS's fast path
    expected = reference.w4a16_linear(x, packed.qweight, packed.scales, packed.zeros, bias, group)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    got = run(session, [x])
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * np.sqrt(k))
