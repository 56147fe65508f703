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


def seq_first(*shape: int) -> torch.Tensor:
    """[B, H, L, D] laid out as [L, B, H, D] (nn.MultiheadAttention's order): a layout the op
    does not write, so the rewrite copies into it."""
    b, h, seq, d = shape
    return torch.randn(seq, b, h, d).permute(1, 2, 0, 3)


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
@pytest.mark.parametrize("make", [torch.randn, heads_last, seq_first],
                         ids=["bhld_in", "blhd_in", "lbhd_in"])
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


# --- the op itself in each layout: fake vs real, autograd, every implementation --------------

@pytest.mark.parametrize("impl", ["auto", "reference", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_opcheck_in_each_layout(layout, shape, impl):
    """torch.library's checks (fake tensor, schema, autograd registration, AOT dispatch) with
    the output in each layout, and the gradients equal eager's."""
    b, h, lq, d, lk = shape
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for n in (lq, lk, lk))
    torch.library.opcheck(torch.ops.attnopt.attention.default, (q, k, v, None, False, 0.3),
                          {"impl": impl, "layout": layout})
    out = torch.ops.attnopt.attention(q, k, v, None, False, 0.3, impl, layout=layout)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, scale=0.3), (q, k, v),
                               grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bad_layout_is_refused_with_the_choices():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        torch.ops.attnopt.attention(q, q, q, None, False, 0.3, layout="lbhd")


# --- the offline path: torch.export, new sizes, ONNX ------------------------------------------

class HeadsLastBlock(torch.nn.Module):
    """q, k, v projected as [B, L, H, D] and transposed (SDPA's output is then [B, L, H, D]
    memory), the output both merged into the model width and returned as it is."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(24, 72), torch.nn.Linear(24, 24)

    def forward(self, x):
        b, seq, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, seq, 3, 3, 8).unbind(2))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, seq, 24)), o


def test_offline_rewrite_and_onnx_in_the_heads_last_layout(tmp_path):
    from attnopt import rewrite_model
    from attnopt.compiler.export import save_onnx
    from attnopt.compiler.verify import run_onnx

    torch.manual_seed(0)
    model = HeadsLastBlock().eval()
    rewritten = rewrite_model(model, (torch.randn(2, 6, 24),))
    calls = [n for n in rewritten.module.graph.nodes
             if n.target is torch.ops.attnopt.attention.default]
    assert len(calls) == 1 and calls[0].kwargs.get("layout") == "blhd"
    path = save_onnx(rewritten, tmp_path / "block.onnx")
    for shape in [(2, 6), (3, 9), (1, 1)]:  # other batch sizes and lengths than exported
        x = torch.randn(*shape, 24)
        with torch.no_grad():
            want, got = model(x), rewritten.module(x)
        for w, g, o in zip(want, got, run_onnx(path, (x,), {})[0], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            assert g.stride() == w.stride()
            torch.testing.assert_close(torch.from_numpy(o), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ["auto", "triton"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("module", [Returned, MergedAndViewed, RawMemory],
                         ids=lambda m: m.__name__)
def test_inductor_around_the_op_keeps_eagers_layout(module, shape, kernels):
    """Inductor checks the op's real strides against its fake's: size-1 dims (one head, one
    query) are where the two could disagree."""
    b, h, lq, d, lk = shape
    r = run(module(), heads_last(b, h, lq, d), heads_last(b, h, lk, d), heads_last(b, h, lk, d),
            kernels=kernels, inner="inductor")
    assert r.count("attention") == 1, r.rejected
    r.assert_equal()
