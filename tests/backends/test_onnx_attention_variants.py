"""The attention variants exported to ONNX and run in ONNX Runtime's CPU provider against
`reference.attention` (and `attention_with_past`): softcap as Attention's own attribute, a
window as a band built at run time, ALiBi and biases as the one additive mask, sinks as a
zero key and value around the op — each alone and together, GQA, causal with fewer queries
than keys, rows that see no key, lengths new at run time."""

import math

import pytest
import torch

from attnopt.backends import reference
from attnopt.backends.reference import ScoreMods

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
from tests.backends.test_onnx import (
    TENSOR,
    Call,
    bool_mask,
    export,
    float_mask,
    op_types,
    qkv,
    run,
    run_all,
    with_past,
)

HQ = 4
g = torch.Generator().manual_seed(7)
SINKS = torch.randn(HQ, generator=g)
SLOPES = torch.tensor([2.0 ** (-i - 1) for i in range(HQ)])

VARIANTS = {
    # name: (softcap, biases given as shapes, alibi, window_left, window_right, sinks)
    "softcap": (3.0, [], False, -1, -1, False),
    "bias": (0.0, [(1, HQ, 1, 1)], False, -1, -1, False),
    "two biases": (0.0, [(1, HQ, -1, -1), (-2, 1, 1, -1)], False, -1, -1, False),
    "alibi": (0.0, [], True, -1, -1, False),
    "window": (0.0, [], False, 2, -1, False),
    "two-sided window": (0.0, [], False, 1, 2, False),
    "sinks": (0.0, [], False, -1, -1, True),
    "everything": (2.0, [(-2, HQ, -1, -1)], True, 3, -1, True),
}


def make(name, b, lq, lk):
    """(ScoreMods, the tensors it holds in the order the module takes them). In the biases'
    shapes -1 stands for Lq (dim 2) or Lk (dim 3), -2 for B."""
    softcap, shapes, alibi, left, right, sinks = VARIANTS[name]
    sizes = {2: lq, 3: lk}
    biases = [torch.randn(*[b if n == -2 else sizes[i] if n == -1 else n
                            for i, n in enumerate(s)], generator=g) for s in shapes]
    mods = ScoreMods(softcap, tuple(biases), SLOPES if alibi else None, left, right,
                     SINKS if sinks else None)
    tensors = [*biases, *([SLOPES] if alibi else []), *([SINKS] if sinks else [])]
    return mods, tensors


def call_args(mods):
    return (mods.softcap, [TENSOR] * len(mods.biases) or None,
            TENSOR if mods.alibi_slopes is not None else None, mods.window_left,
            mods.window_right, TENSOR if mods.sinks is not None else None)


class Variant(Call):
    """One attention call with its biases passed as a list of module inputs."""

    def forward(self, *tensors):
        given = iter(tensors)
        args = [[next(given) for _ in a] if isinstance(a, list)
                else next(given) if a is TENSOR else a for a in self.arguments]
        return self.op(*args, **self.kwargs)


@pytest.mark.parametrize(("causal", "mask_kind"), [(True, "bool"), (False, "float")])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_attention_variants_match_reference(name, causal, mask_kind):
    b, lq, lk = 2, 3 if causal else 5, 6
    q, k, v = qkv(b=b, hq=HQ, hkv=2, lq=lq, lk=lk)
    mods, extra = make(name, b, lq, lk)
    mask = {None: None, "bool": bool_mask(b, 1, lq, lk),
            "float": float_mask(b, 1, lq, lk)}[mask_kind]
    inputs = [q, k, v, *([mask] if mask is not None else []), *extra]
    module = Variant(torch.ops.attnopt.attention, TENSOR, TENSOR, TENSOR,
                     TENSOR if mask is not None else None, causal, 0.3, "auto",
                     *call_args(mods))
    model, session = export(module, inputs)
    assert op_types(model).count("Attention") == 1 and "Softmax" not in op_types(model)
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    assert node.attributes["softcap"].value == mods.softcap
    torch.testing.assert_close(run(session, inputs),
                               reference.attention(q, k, v, mask, causal, 0.3, mods),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fill", [-math.inf, torch.finfo(torch.float32).min])
def test_sinks_on_rows_that_see_no_key(fill):
    q, k, v = qkv(hq=HQ, hkv=2)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, :, 2] = fill
    mods = ScoreMods(sinks=SINKS, window_left=4)
    module = Variant(torch.ops.attnopt.attention, TENSOR, TENSOR, TENSOR, TENSOR, True, 0.3,
                     "auto", *call_args(mods))
    _, session = export(module, [q, k, v, mask, SINKS])
    got = run(session, [q, k, v, mask, SINKS])
    assert (got[0, :, 2] == 0).all() and not got.isnan().any()
    torch.testing.assert_close(got, reference.attention(q, k, v, mask, True, 0.3, mods),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["softcap", "sinks", "everything"])
def test_attention_with_past_variants(name):
    """Past and present K/V, every length dynamic: with sinks the present is concatenated
    beside the op (so the sink key stays out of it), otherwise ORT concatenates it."""
    q, k, v, past_k, past_v = with_past(hq=HQ)
    mods, extra = make(name, 2, 3, 8)
    mask = bool_mask(2, 1, 3, 8)
    auto = torch.export.Dim.AUTO
    dims = {0: auto, 2: auto}
    module = Variant(torch.ops.attnopt.attention_with_past, *[TENSOR] * 6, True, 0.25, "auto",
                     *call_args(mods))
    inputs = [q, k, v, past_k, past_v, mask, *extra]
    dynamic = None if any(t.dim() == 4 for t in extra) else (
        (dims,) * 5 + ({0: auto, 2: auto, 3: auto},) + (None,) * len(extra),)
    _, session = export(module, inputs, dynamic=dynamic)
    for past, new in ((5, 3), (0, 3)) if dynamic else ((5, 3),):
        q, k, v, past_k, past_v = with_past(b=2, hq=HQ, past=past, new=new, seed=past)
        mask = bool_mask(2, 1, new, past + new, seed=new)
        inputs = [q, k, v, past_k, past_v, mask, *extra]
        want = reference.attention_with_past(q, k, v, past_k, past_v, mask, True, 0.25, mods)
        for got, expected in zip(run_all(session, inputs), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fp16_softcap_and_window():
    q, k, v = qkv(hq=HQ, hkv=1, dtype=torch.float16)
    mods = ScoreMods(softcap=5.0, window_left=2)
    module = Variant(torch.ops.attnopt.attention, TENSOR, TENSOR, TENSOR, None, True, 0.25,
                     "auto", *call_args(mods))
    _, session = export(module, [q, k, v])
    got = run(session, [q, k, v])
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, reference.attention(q, k, v, None, True, 0.25, mods),
                               rtol=2e-3, atol=2e-3)
