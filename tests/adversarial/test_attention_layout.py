"""The output layout of a rewritten attention (`attnopt::attention(..., layout=)`): whatever the
graph does with the output afterwards (returns it, reads it twice, views it, writes into it,
reads its raw memory, feeds it to another attention), compiled equals eager in values and in
the strides of what is returned; and asking the op for a layout never hides a rule's mistake
from the PatternPass backstop."""

import operator

import pytest
import torch
import torch.nn.functional as F

import attnopt.backends.ops  # noqa: F401  (registers attnopt::attention)
from attnopt.compiler.graph import insert_call
from attnopt.compiler.pattern import Call, Capture, Rule
from attnopt.compiler.rewrite import PatternPass
from tests.adversarial.helpers import run
from tests.compiler.test_pattern import Ctx
from tests.graphs import aten_graph

aten = torch.ops.aten
B, H, L, D = 2, 3, 5, 8


def heads_last(*shape: int) -> torch.Tensor:
    """[B, H, L, D] laid out as [B, L, H, D], as a projection's view(B, L, H, D).transpose(1, 2)
    gives it: CPU SDPA then returns its output in that layout too."""
    b, h, seq, d = shape
    return torch.randn(b, seq, h, d).transpose(1, 2)


# --- the backstop ------------------------------------------------------------------------------

def _sdpa_as_wrong_dtype(m, graph, ctx):
    """A broken rule: attention in float64 for a float32 SDPA (wrong dtype out)."""
    q, k, v = (insert_call(graph, aten._to_copy.default, (m[n],), {"dtype": torch.float64})
               for n in "qkv")
    return insert_call(graph, torch.ops.attnopt.attention.default,
                       (q, k, v, None, False, D ** -0.5))


SDPA = Call(operator.getitem, Call(aten._scaled_dot_product_flash_attention_for_cpu.default,
                                  Capture("q"), Capture("k"), Capture("v")), 0)


@pytest.mark.parametrize("layout_of_q", ["bhld", "blhd"])
def test_backstop_refuses_a_wrong_dtype_whatever_the_layout(layout_of_q):
    """The backstop compares the replacement's dtype with the node's: asking the op to write
    the node's layout must not copy the node's value over the replacement's first."""
    q, k, v = ((torch.randn(B, H, L, D) if layout_of_q == "bhld" else heads_last(B, H, L, D))
               for _ in range(3))
    gm = aten_graph(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    broken = PatternPass("broken", "attention", [Rule("sdpa", SDPA, _sdpa_as_wrong_dtype)])
    ctx = Ctx()
    assert broken.apply(gm, ctx) == 0
    assert len(ctx.rejected) == 1 and "would give torch.float64" in ctx.rejected[0]


# --- compiled beside eager: what the graph does with the output --------------------------------

def _sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q, k, v, **kw)


class Returned(torch.nn.Module):
    def forward(self, q, k, v):
        # SDPA's causal flag is top-left: rewritten only where that is bottom-right too.
        return _sdpa(q, k, v, is_causal=q.shape[2] == k.shape[2])


class MergedAndViewed(torch.nn.Module):
    """The output read twice: merged into [B, L, H·D] and viewed flat as [B·H·L·D] memory."""

    def forward(self, q, k, v):
        o = _sdpa(q, k, v)
        b, h, seq, d = o.shape
        return o.transpose(1, 2).reshape(b, seq, h * d), o.reshape(b * h, seq, d)


class ContiguousView(torch.nn.Module):
    """`.view` after `.contiguous()`: only valid on memory in the merged order."""

    def forward(self, q, k, v):
        o = _sdpa(q, k, v)
        b, h, seq, d = o.shape
        return o.transpose(1, 2).contiguous().view(b, seq, h * d)


class WrittenInPlace(torch.nn.Module):
    def forward(self, q, k, v):
        o = _sdpa(q, k, v)
        o.mul_(2.0).add_(1.0)
        return o.transpose(1, 2).flatten(2)


class RawMemory(torch.nn.Module):
    """The output's raw memory, in storage order: depends on every stride."""

    def forward(self, q, k, v):
        o = _sdpa(q, k, v)
        return o.as_strided((o.numel(),), (1,))


class Stacked(torch.nn.Module):
    """The output of one attention is the query of the next, transposed another way."""

    def forward(self, q, k, v):
        o = _sdpa(q, k, v)
        return _sdpa(o, k, v).permute(0, 3, 1, 2)


MODULES = [Returned, MergedAndViewed, ContiguousView, WrittenInPlace, RawMemory, Stacked]
SHAPES = [(B, H, L, D, L), (B, H, 1, D, 7), (1, 1, L, D, L), (B, 1, L, D, 6), (1, H, 1, D, 1)]


@pytest.mark.parametrize("kernels", ["auto", "reference", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("make", [torch.randn, heads_last], ids=["bhld_in", "blhd_in"])
@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_compiled_output_layout_is_eagers(module, make, shape, kernels):
    b, h, lq, d, lk = shape
    q, k, v = make(b, h, lq, d), make(b, h, lk, d), make(b, h, lk, d)
    r = run(module(), q, k, v, kernels=kernels)
    assert r.count("attention") >= 1, r.rejected
    r.assert_equal()
    for want, got in zip(r.want if isinstance(r.want, tuple) else (r.want,),
                         r.got if isinstance(r.got, tuple) else (r.got,), strict=True):
        # Strides of size-1 dims address nothing; every other stride is eager's.
        assert [s for s, n in zip(got.stride(), got.shape, strict=True) if n > 1] == \
            [s for s, n in zip(want.stride(), want.shape, strict=True) if n > 1]
