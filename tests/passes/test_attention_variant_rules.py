"""The attention pass on the variants' spellings — Gemma-2's softcap, GPT-OSS's sinks, Falcon's
ALiBi before the scale, T5's two additive terms — each rewritten into one attnopt::attention
carrying the variant and equal to eager, and every near miss (constants that disagree, a
scale in the wrong place, a sink column that is not exactly the last one and exactly
dropped) refused with its reason and left as eager computes it."""

import math

import pytest
import torch

from attnopt.compiler.options import Options
from attnopt.compiler.pipeline import PassContext
from attnopt.passes.attention import attention_pass
from tests.graphs import aten_graph

B, H, L, D = 2, 4, 8, 16
g = torch.Generator().manual_seed(0)
Q, K, V = (torch.randn(B, H, L, D, generator=g) * 2 for _ in range(3))
KEEP = torch.rand(B, 1, L, L, generator=g) > 0.3
KEEP[..., 0] = True
MASK = torch.zeros(B, 1, L, L).masked_fill(~KEEP, torch.finfo(torch.float32).min)
BIAS = torch.randn(1, H, L, L, generator=g)
ALIBI = torch.randn(B, H, 1, L, generator=g)
SINKS = torch.randn(H, generator=g)
INPUTS = (Q, K, V, MASK, BIAS, ALIBI, SINKS)


def run_pass(gm):
    ctx = PassContext(Options.parse({}), training=False, frozen=True)
    n = attention_pass.apply(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return n, ctx.rejected


def the_call(gm):
    (node,) = [n for n in gm.graph.nodes if "attnopt.attention" in str(n.target)]
    return node


def softcap(s, c_in=30.0, c_out=30.0):
    return torch.tanh(s / c_in) * c_out


def gpt_oss(s, sinks, shift=True, first=False, keep=slice(None, -1)):
    column = sinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], -1)
    logits = torch.cat([column, s] if first else [s, column], -1)
    if shift:
        logits = logits - logits.max(dim=-1, keepdim=True).values
    return torch.softmax(logits, -1)[..., keep]


MATCHED = {
    # name: (fn, the variants the call must carry)
    "gemma2 softcap": (lambda q, k, v, m, b, a, s: torch.softmax(
        softcap(q @ k.transpose(2, 3) * 0.25) + m, -1, dtype=torch.float32) @ v,
        {"softcap": 30.0}),
    "softcap alone": (lambda q, k, v, m, b, a, s: torch.softmax(
        softcap(q @ k.transpose(2, 3)), -1) @ v, {"softcap": 30.0}),
    "gpt-oss sinks": (lambda q, k, v, m, b, a, s: gpt_oss(
        q @ k.transpose(2, 3) * 0.25 + m, s) @ v, {"sinks": True}),
    "sinks without the max": (lambda q, k, v, m, b, a, s: gpt_oss(
        q @ k.transpose(2, 3) * 0.25, s, shift=False) @ v, {"sinks": True}),
    "sinks slice to Lk": (lambda q, k, v, m, b, a, s: gpt_oss(
        q @ k.transpose(2, 3) * 0.25, s, keep=slice(0, L)) @ v, {"sinks": True}),
    "t5 two additive terms": (lambda q, k, v, m, b, a, s: torch.softmax(
        q @ k.transpose(3, 2) * 1.0 + b + m, -1) @ v, {"biases": 1}),
    "t5 zero bias of cross-attention": (lambda q, k, v, m, b, a, s: torch.softmax(
        q @ k.transpose(3, 2) + torch.zeros(1, H, L, L) + m, -1) @ v, {}),
    "falcon alibi before the scale": (lambda q, k, v, m, b, a, s: torch.softmax(
        (q @ k.transpose(-1, -2) + a) * 0.25 + m, -1) @ v, {"biases": 1}),
    "softcap, bias and bool mask": (lambda q, k, v, m, b, a, s: torch.softmax(
        (softcap(q @ k.transpose(2, 3) * 0.25) + b).masked_fill(m < 0, -math.inf), -1) @ v,
        {"softcap": 30.0, "biases": 1}),
}


@pytest.mark.parametrize("name", MATCHED)
def test_each_variant_spelling_becomes_one_op(name):
    fn, carried = MATCHED[name]
    gm = aten_graph(fn, *INPUTS)
    assert run_pass(gm) == (1, [])
    call = the_call(gm)
    assert call.kwargs.get("softcap", 0.0) == carried.get("softcap", 0.0)
    assert len(call.kwargs.get("biases") or []) == carried.get("biases", 0)
    assert ("sinks" in call.kwargs) == ("sinks" in carried)
    assert not [n for n in gm.graph.nodes if n.target in (
        torch.ops.aten.tanh.default, torch.ops.aten.cat.default, torch.ops.aten.bmm.default)]
    torch.testing.assert_close(gm(*INPUTS), fn(*INPUTS), rtol=1e-5, atol=1e-5)


def falcon(c):
    def attend(q, k, v, m, b, a, s):
        logits = ((q @ k.transpose(-1, -2)).float() + a) * c + m
        return torch.softmax(logits, -1, dtype=torch.float32).to(q.dtype) @ v

    return attend


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_falcon_scale_folded_into_the_bias_is_exact_to_fp32_rounding(kernels, dtype):
    # (s + alibi)·c = s·c + alibi·c: to the last bit when c is a power of two (Falcon's
    # 1/sqrt(head_dim) for head dim 16), to one rounding of a score otherwise.
    for c in (0.25, 1 / math.sqrt(32)):
        fn = falcon(c)
        # Unit-variance q and k: eager rounds q·kᵀ to bf16 before adding ALiBi, which the
        # kernel does not, so larger scores would move bf16 results past its tolerance.
        args = (*(t.div(2).to(dtype) for t in (Q, K, V)), MASK, BIAS, ALIBI, SINKS)
        gm = aten_graph(fn, *args)
        ctx = PassContext(Options.parse({"kernels": kernels}), training=False, frozen=True)
        assert attention_pass.apply(gm, ctx) == 1
        gm.recompile()
        got, want = gm(*args), fn(*args)
        if dtype == torch.float32 and c == 0.25 and kernels == "reference":
            assert torch.equal(got, want)
        tol = 1e-6 if dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_sinks_on_rows_that_see_no_key():
    # A row masked everywhere with -inf: eager's cat-softmax-slice gives it all to the sink,
    # so 0; the op gives 0 too (no NaN on either side).
    mask = MASK.clone()
    mask[0, :, 3] = -math.inf
    fn = MATCHED["gpt-oss sinks"][0]
    args = (Q, K, V, mask, BIAS, ALIBI, SINKS)
    gm = aten_graph(fn, *args)
    assert run_pass(gm)[0] == 1
    got = gm(*args)
    assert (got[0, :, 3] == 0).all() and not got.isnan().any()
    torch.testing.assert_close(got, fn(*args), rtol=1e-5, atol=1e-5)


NEAR_MISSES = {
    "softcap constants differ": (lambda q, k, v, m, b, a, s: torch.softmax(
        softcap(q @ k.transpose(2, 3), 30.0, 20.0), -1) @ v, "must be one positive number"),
    "negative softcap": (lambda q, k, v, m, b, a, s: torch.softmax(
        softcap(q @ k.transpose(2, 3), -5.0, -5.0), -1) @ v, "must be one positive number"),
    "scale after the softcap": (lambda q, k, v, m, b, a, s: torch.softmax(
        softcap(q @ k.transpose(2, 3)) * 0.5, -1) @ v, "a scale 0.5 after the softcap"),
    "the last key dropped with the sink": (lambda q, k, v, m, b, a, s: gpt_oss(
        q @ k.transpose(2, 3), s, keep=slice(None, -2)) @ v[:, :, 1:],
        "does not keep exactly the key columns"),
    "a key column dropped too": (lambda q, k, v, m, b, a, s: gpt_oss(
        q @ k.transpose(2, 3), s, keep=slice(1, -1)) @ (v[:, :, 1:]),
        "does not keep exactly the key columns"),
    "max over the queries": (lambda q, k, v, m, b, a, s: torch.softmax(
        (lambda x: x - x.max(dim=-2, keepdim=True).values)(torch.cat(
            [q @ k.transpose(2, 3), s.reshape(1, -1, 1, 1).expand(B, -1, L, -1)], -1)),
        -1)[..., :-1] @ v, "not the row"),
    "sinks softmax in float64": (lambda q, k, v, m, b, a, s: torch.softmax(torch.cat(
        [q @ k.transpose(2, 3), s.reshape(1, -1, 1, 1).expand(B, -1, L, -1)], -1), -1,
        dtype=torch.float64)[..., :-1].float() @ v, "aten._to_copy to float64"),
    "sinks per query, not per head": (lambda q, k, v, m, b, a, s: torch.softmax(torch.cat(
        [q @ k.transpose(2, 3), torch.linspace(0, 1, L).reshape(1, 1, -1, 1).expand(
            B, H, -1, 1)], -1), -1)[..., :-1] @ v, "not sinks[h]"),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_misses_are_refused_with_their_reason(name):
    fn, reason = NEAR_MISSES[name]
    gm = aten_graph(fn, *INPUTS)
    n, rejected = run_pass(gm)
    assert n == 0 and any(reason in r for r in rejected), rejected
    torch.testing.assert_close(gm(*INPUTS), fn(*INPUTS))
