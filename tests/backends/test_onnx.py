"""The ONNX translations of the attnopt ops, run in ONNX Runtime's CPU provider against the
reference implementations on random inputs: attention (GQA, MQA, boolean and additive masks,
masks broadcast over queries, bottom-right causal, fully masked rows, fp16, new shapes at run
time), attention_with_past (Attention with past and present K/V: GQA, both kinds of mask,
causal, past and new lengths, an empty past at run time), softmax (every pre-op), w4a16_linear
(MatMulNBits: padded K, odd block counts, bias, fp16, packed weights folded into initializers),
moe and moe_w4a16 (top-1 and top-2, every activation, an expert with no tokens, one expert
twice for a token, new token counts at run time, fp16 and fp64; one MatMulNBits per int4 expert
matrix) and a tiny Mixtral exported whole with a dynamic token count."""

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
    "mask_broadcast_over_keys": ({}, lambda b, lq, lk: scores(b, 1, lq, 1), False),
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


# --- attention with past K/V --------------------------------------------------------------------


def run_all(session, inputs):
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def with_past(b=2, hq=4, hkv=2, past=5, new=3, d=16, seed=0):
    """q, k, v of `new` tokens and past K/V of `past` tokens: GQA 4:2 by default."""
    q, k, v = qkv(b=b, hq=hq, hkv=hkv, lq=new, lk=new, d=d, dv=d, seed=seed)
    _, past_k, past_v = qkv(b=b, hq=hq, hkv=hkv, lq=new, lk=past, d=d, dv=d, seed=seed + 1)
    return q, k, v, past_k, past_v


MASKS = {"bool": bool_mask, "additive": float_mask}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("new", [1, 3])
@pytest.mark.parametrize("past", [1, 5])
def test_attention_with_past_is_attention_with_past_and_present(past, new, mask_kind, causal):
    q, k, v, past_k, past_v = with_past(past=past, new=new)
    mask = MASKS[mask_kind](2, 1, new, past + new)
    inputs = [q, k, v, past_k, past_v, mask]
    module = Call(torch.ops.attnopt.attention_with_past, *[TENSOR] * 6, causal, 0.3)
    model, session = export(module, inputs)
    (node,) = [node for node in model.graph if node.op_type == "Attention"]
    assert [i is not None for i in node.inputs] == [True] * 6  # Q, K, V, mask, past K, past V
    got = run_all(session, inputs)
    expected = reference.attention_with_past(q, k, v, past_k, past_v, mask, causal, 0.3)
    assert len(got) == 3
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_attention_with_past_dynamic_lengths_keep_bottom_right_causal():
    """Exported on 5 past and 3 new tokens, every length dynamic (the queries' and the new
    keys' are unrelated sizes, so the causal part is a mask); run on new past lengths, an empty
    past included, and on one new token."""
    auto = torch.export.Dim.AUTO
    dims = {0: auto, 2: auto}
    module = Call(torch.ops.attnopt.attention_with_past, *[TENSOR] * 6, True, 0.25)
    inputs = [*with_past(), bool_mask(2, 1, 3, 8)]
    _, session = export(module, inputs, dynamic=(((dims,) * 5) + ({0: auto, 2: auto,
                                                                   3: auto},),))
    for past, new in ((0, 3), (9, 1), (2, 4)):
        q, k, v, past_k, past_v = with_past(b=3, past=past, new=new, seed=past)
        mask = bool_mask(3, 1, new, past + new, seed=new)
        inputs = [q, k, v, past_k, past_v, mask]
        expected = reference.attention_with_past(q, k, v, past_k, past_v, mask, True, 0.25)
        for g, e in zip(run_all(session, inputs), expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


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


# --- mixture of experts ------------------------------------------------------------------------

EXPERTS, HIDDEN, INTER = 4, 40, 48  # not multiples of 32: the int4 expert weights are padded


def routing(tokens, k, seed, dtype=torch.int64):
    """Random top-k ids below EXPERTS - 1, so that the last expert gets no token, with token 0 on
    expert 0 in every slot (it counts once per slot); weights in [0, 1) that need not sum to 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, EXPERTS - 1, (tokens, k), generator=g)
    ids[0] = 0
    return ids.to(dtype), torch.rand(tokens, k, generator=g)


class Experts(torch.nn.Module):
    """One moe or moe_w4a16 call on (x, topk_ids, topk_weights), its expert weights buffers
    (initializers, as in an exported model)."""

    def __init__(self, op, weights, *arguments):
        super().__init__()
        self.op, self.arguments = op, arguments
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w)

    def forward(self, x, topk_ids, topk_weights):
        return self.op(x, topk_ids, topk_weights, *self.buffers(), *self.arguments)


def export_experts(module, k, ids_dtype, dtype):
    """Exported on 9 tokens with the token count dynamic; run on 9, 17 and 1 tokens."""
    x = torch.randn(9, HIDDEN).to(dtype)
    tokens = {0: torch.export.Dim.AUTO}
    return export(module, [x, *routing(9, k, 0, ids_dtype)], dynamic=(tokens, tokens, tokens))


def moe_inputs(k, ids_dtype, dtype):
    for tokens in (9, 17, 1):
        g = torch.Generator().manual_seed(tokens)
        yield [torch.randn(tokens, HIDDEN, generator=g).to(dtype), *routing(tokens, k, tokens,
                                                                       ids_dtype)]


MOE_CASES = {
    # name: (top-k, activation, ids dtype, dtype, tolerance)
    "top1_silu": (1, "silu", torch.int64, torch.float32, 1e-5),
    "top2_gelu_int32_ids": (2, "gelu", torch.int32, torch.float32, 1e-5),
    "top2_gelu_tanh": (2, "gelu_tanh", torch.int64, torch.float32, 1e-5),
    "top2_fp16": (2, "silu", torch.int64, torch.float16, 2e-3),  # about one fp16 ulp
    "top2_fp64": (2, "silu", torch.int64, torch.float64, 1e-12),
}


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_moe_matches_reference(name):
    k, activation, ids_dtype, dtype, tol = MOE_CASES[name]
    g = torch.Generator().manual_seed(5)
    w_gate_up = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5).to(dtype)
    w_down = (torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / INTER**0.5).to(dtype)
    model, session = export_experts(Experts(torch.ops.attnopt.moe, [w_gate_up, w_down],
                                            activation), k, ids_dtype, dtype)
    ops = op_types(model)
    assert ops.count("Gemm") == 2 * EXPERTS and ops.count("ScatterND") == 1 and "MoE" not in ops
    for inputs in moe_inputs(k, ids_dtype, dtype):
        expected = reference.moe(*inputs, w_gate_up, w_down, activation)
        got = run(session, inputs)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


MOE_W4A16_CASES = {
    # name: (top-k, activation, dtype, group size, tolerance)
    "top1_silu": (1, "silu", torch.float32, 32, 1e-5),
    "top2_gelu": (2, "gelu", torch.float32, 32, 1e-5),
    "top2_fp16_group64": (2, "gelu_tanh", torch.float16, 64, 2e-3),
}


@pytest.mark.parametrize("name", list(MOE_W4A16_CASES))
def test_moe_w4a16_is_matmulnbits_per_expert_and_matches_reference(name):
    k, activation, dtype, group, tol = MOE_W4A16_CASES[name]
    g = torch.Generator().manual_seed(6)
    weights = []
    for rows, cols in ((2 * INTER, HIDDEN), (HIDDEN, INTER)):
        experts = [int4.quantize_rtn(torch.randn(rows, cols, generator=g) / cols**0.5, group,
                                     dtype) for _ in range(EXPERTS)]
        weights += [torch.stack([getattr(p, field) for p in experts])
                    for field in ("qweight", "scales", "zeros")]
    model, session = export_experts(Experts(torch.ops.attnopt.moe_w4a16, weights, group,
                                            activation), k, torch.int64, dtype)
    nodes = [node for node in model.graph if node.op_type == "MatMulNBits"]
    assert len(nodes) == 2 * EXPERTS and "Gemm" not in op_types(model)
    assert sorted(node.attributes["K"].value for node in nodes) == sorted(
        [HIDDEN, INTER] * EXPERTS)
    assert all(v.const_value is not None for node in nodes for v in node.inputs[1:]
               if v is not None), "each expert's packed weights must be initializers"
    assert all(node.inputs[3].dtype.name == "UINT8" for node in nodes)
    for inputs in moe_inputs(k, torch.int64, dtype):
        expected = reference.moe_w4a16(*inputs, *weights, group, activation)
        got = run(session, inputs)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "w4a16"])
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_mixtral_matches_eager_at_any_token_count(tmp_path, impl, quantize):
    """A tiny transformers Mixtral through rewrite_model and export_onnx, with batch and sequence
    dynamic: its MoE blocks become attnopt::moe (moe_w4a16 with quantize), whose translations ORT
    runs within fp32 rounding of eager (of eager on the weights the int4 codes decode to, with
    quantize) on the prompt it was exported with, on another shape and on a one-token decode
    step. A grouped_mm block left unmatched would fail the export: transformers' CPU grouped_mm
    op has no ONNX translation."""
    transformers = pytest.importorskip("transformers")
    import onnx

    from attnopt import export_onnx
    from tests.passes.test_moe_w4a16_pass import dequantized_copy

    torch.manual_seed(0)
    layers, experts = 2, 4
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
        num_experts_per_tok=2, max_position_embeddings=64,
        experts_implementation=impl)).eval()
    path, prompt = tmp_path / "mixtral.onnx", torch.randint(0, 64, (2, 7))
    rewritten = export_onnx(model, path, (prompt,), {"use_cache": False},
                            options={"quantize": quantize, "group_size": 32})
    assert rewritten.report.counts["moe"] == layers
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops.count("NonZero") == layers * experts
    if quantize:
        assert ops.count("MatMulNBits") >= 2 * layers * experts and "Gemm" not in ops
    else:
        assert ops.count("Gemm") == 2 * layers * experts
    reference_model = dequantized_copy(model, 32) if quantize else model
    for ids in (prompt, torch.randint(0, 64, (3, 4)), torch.tensor([[17]])):
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
        with torch.no_grad():
            expected = reference_model(ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
