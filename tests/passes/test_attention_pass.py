"""The attention pass on fused SDPA calls: each spelling becomes one attnopt::attention that
matches eager (fp32 and 16-bit, masks, causal, GQA); near misses stay with a reason."""

import pytest
import torch
import torch.nn.functional as F

import attnopt
from attnopt.compiler.options import Options
from attnopt.compiler.pipeline import PassContext
from attnopt.passes.attention import attention_pass
from attnopt.testing import assert_matches_eager
from tests.graphs import aten_graph, ops, structure

Q = torch.randn(2, 4, 8, 16)
K = torch.randn(2, 4, 8, 16)
V = torch.randn(2, 4, 8, 16)
BOOL = torch.rand(2, 1, 8, 8) > 0.3
ADD = torch.randn(2, 1, 8, 8)
INPUTS = (Q, K, V, BOOL, ADD)

SPELLINGS = {
    "plain": lambda q, k, v, b, a: F.scaled_dot_product_attention(q, k, v),
    "causal": lambda q, k, v, b, a: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "scale": lambda q, k, v, b, a: F.scaled_dot_product_attention(q, k, v, scale=0.3),
    "bool_mask": lambda q, k, v, b, a: F.scaled_dot_product_attention(q, k, v, attn_mask=b),
    "float_mask": lambda q, k, v, b, a: F.scaled_dot_product_attention(q, k, v, attn_mask=a),
    "gqa": lambda q, k, v, b, a: F.scaled_dot_product_attention(
        q, k[:, :2], v[:, :2], attn_mask=b, enable_gqa=True),
    "mqa_causal": lambda q, k, v, b, a: F.scaled_dot_product_attention(
        q, k[:, :1], v[:, :1], is_causal=True, enable_gqa=True),
}


def run_pass(gm):
    ctx = PassContext(Options.parse({}), training=False, frozen=True)
    n = attention_pass.apply(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return n, ctx.rejected


@pytest.mark.parametrize("name", SPELLINGS)
def test_each_sdpa_spelling_becomes_one_op(name):
    gm = aten_graph(SPELLINGS[name], *INPUTS)
    assert run_pass(gm) == (1, [])
    assert [o for o in ops(gm) if "attention" in o] == ["attnopt.attention"]
    assert "aten.where.self" not in ops(gm)  # a bool mask is read as the bool it was
    torch.testing.assert_close(gm(*INPUTS), SPELLINGS[name](*INPUTS))


@pytest.mark.parametrize("kernels", ["auto", "reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal", "gqa", "float_mask"])
def test_end_to_end_matches_eager(name, dtype, kernels):
    if kernels == "triton":
        pytest.importorskip("attnopt.backends.triton.attention")

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, b, a):
            return SPELLINGS[name](q, k, v, b, a)

    with torch.no_grad():
        (report,) = assert_matches_eager(
            Attn(), (*(t.to(dtype) for t in (Q, K, V)), BOOL, ADD.to(dtype)),
            options={"inner": "eager", "kernels": kernels},
            rtol=1.6e-2 if dtype == torch.bfloat16 else None,
            atol=1.6e-2 if dtype == torch.bfloat16 else None)
    assert report.counts["attention"] == 1


def test_causal_with_unequal_lengths_is_refused_with_reason():
    fn = lambda q, k, v: F.scaled_dot_product_attention(q[:, :, :3], k, v, is_causal=True)
    gm = aten_graph(fn, Q, K, V)
    n, rejected = run_pass(gm)
    assert n == 0 and len(rejected) == 1
    assert "is_causal with q_len != kv_len: SDPA aligns the mask top-left" in rejected[0]


def test_dropout_is_refused_with_reason():
    g = torch.fx.Graph()
    q, k, v = (g.placeholder(n) for n in "qkv")
    for node, t in zip((q, k, v), (Q, K, V), strict=True):
        node.meta["val"] = t
    out = g.call_function(torch.ops.aten.scaled_dot_product_attention.default, (q, k, v),
                          {"dropout_p": 0.1}, name="sdpa")
    g.output(out)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    n, rejected = run_pass(gm)
    assert n == 0
    assert rejected == ["sdpa: dropout_p=0.1: attention with dropout "
                        "(training) is left to ATen"]


def test_training_keeps_sdpa_whose_logsumexp_feeds_backward():
    q, k, v = (t.clone().requires_grad_() for t in (Q, K, V))
    compiled = torch.compile(SPELLINGS["causal"], backend="attnopt", options={"inner": "eager"})
    compiled(q, k, v, BOOL, ADD).sum().backward()
    (report,) = attnopt.reports()
    ref = [t.clone().requires_grad_() for t in (Q, K, V)]
    SPELLINGS["causal"](*ref, BOOL, ADD).sum().backward()
    for got, want in zip((q, k, v), ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad)
    assert report.counts["attention"] == 0
    assert any("also used by" in r for r in report.rejected)


def test_op_is_differentiable():
    q, k, v = (t.double().requires_grad_() for t in (Q, K, V))
    torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.attnopt.attention(q, k[:, :2], v[:, :2], ADD.double(), True,
                                                    0.3, "auto"), (q, k, v))


# --- written-out attention -----------------------------------------------------------------

KV2 = torch.randn(2, 2, 8, 16)  # two KV heads for GQA spellings
CAUSAL_KEEP = torch.ones(8, 8, dtype=torch.bool).tril()


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


WRITTEN = {
    "mul_scale": lambda q, k, v, b, a: torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v,
    "div_scale_matmul": lambda q, k, v, b, a: torch.matmul(
        torch.softmax(torch.matmul(q, k.transpose(2, 3)) / 4.0, dim=-1), v),
    "q_prescaled": lambda q, k, v, b, a: torch.softmax((q * 0.25) @ k.transpose(-2, -1), -1) @ v,
    "additive_mask": lambda q, k, v, b, a: torch.softmax(
        q @ k.transpose(-1, -2) * 0.25 + a, -1) @ v,
    "masked_fill": lambda q, k, v, b, a: torch.softmax(
        (q @ k.transpose(-1, -2) * 0.25).masked_fill(~b, float("-inf")), -1) @ v,
    "where_keep": lambda q, k, v, b, a: torch.softmax(
        torch.where(b, q @ k.transpose(-1, -2) * 0.25, float("-inf")), -1) @ v,
    "mask_and_bias": lambda q, k, v, b, a: torch.softmax(
        (q @ k.transpose(-1, -2) * 0.25 + a).masked_fill(~b, float("-inf")), -1) @ v,
    "fp32_softmax": lambda q, k, v, b, a: F.softmax(
        q @ k.transpose(-1, -2) * 0.25 + a, dim=-1, dtype=torch.float32).to(q.dtype) @ v,
    "safe_softmax": lambda q, k, v, b, a: torch.ops.aten._safe_softmax(
        (q @ k.transpose(-1, -2) * 0.25).masked_fill(~b, float("-inf")), -1) @ v,
    "decomposed_softmax": lambda q, k, v, b, a: (lambda e: e / e.sum(-1, keepdim=True))(
        torch.exp((s := q @ k.transpose(-1, -2) * 0.25) - s.amax(-1, keepdim=True))) @ v,
    "sqrt_scale_both": lambda q, k, v, b, a: torch.softmax(
        (q * 0.5) @ (k * 0.5).transpose(-1, -2), -1) @ v,
    "permute_k": lambda q, k, v, b, a: torch.softmax(q @ k.permute(0, 1, 3, 2) * 0.25, -1) @ v,
    "gqa_repeat_kv": lambda q, k, v, b, a: torch.softmax(
        q @ repeat_kv(k[:, :2], 2).transpose(2, 3) * 0.25 + a, -1) @ repeat_kv(v[:, :2], 2),
    "mqa_repeat_kv": lambda q, k, v, b, a: torch.softmax(
        q @ repeat_kv(k[:, :1], 4).transpose(2, 3) * 0.25, -1) @ repeat_kv(v[:, :1], 4),
}


@pytest.mark.parametrize("name", WRITTEN)
def test_each_written_out_spelling_becomes_one_op(name):
    mask = BOOL | CAUSAL_KEEP  # no row masked everywhere: eager would give NaN there
    args = (Q, K, V, mask, ADD)
    gm = aten_graph(WRITTEN[name], *args)
    assert run_pass(gm) == (1, [])
    fused = [o for o in ops(gm) if o not in ("aten.slice.Tensor", "aten.logical_not",
                                             "aten.bitwise_not", "aten.where.ScalarOther")]
    assert fused == ["attnopt.attention"], ops(gm)
    torch.testing.assert_close(gm(*args), WRITTEN[name](*args), rtol=1e-5, atol=1e-5)


def test_written_out_before_expected():
    before = aten_graph(WRITTEN["gqa_repeat_kv"], *INPUTS)
    expected = aten_graph(lambda q, k, v, b, a: torch.ops.attnopt.attention(
        q, k[:, :2], v[:, :2], a, False, 0.25), *INPUTS)
    run_pass(before)
    from tests.graphs import structure

    assert structure(before) == structure(expected)


@pytest.mark.parametrize("fn, reason", [
    (lambda q, k, v, b, a: torch.softmax(q @ k.transpose(-1, -2) * 0.25, 2) @ v,
     "softmax over dim 2, not over the keys"),
    (lambda q, k, v, b, a: torch.softmax(
        (q @ k.transpose(-1, -2)).masked_fill(~b, -1e9), -1) @ v,
     "mask fill -1000000000.0 is not -inf"),
])
def test_written_out_near_misses_are_reported(fn, reason):
    gm = aten_graph(fn, *INPUTS)
    n, rejected = run_pass(gm)
    assert n == 0 and len(rejected) == 1 and reason in rejected[0]
    torch.testing.assert_close(gm(*INPUTS), fn(*INPUTS))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_written_out_16_bit_end_to_end(dtype):
    class Attn(torch.nn.Module):
        def forward(self, q, k, v, b, a):
            return WRITTEN["fp32_softmax"](q, k, v, b, a)

    with torch.no_grad():
        (report,) = assert_matches_eager(
            Attn(), (*(t.to(dtype) for t in (Q, K, V)), BOOL, ADD.to(dtype)),
            options={"inner": "eager", "kernels": "triton"}, rtol=2e-2, atol=2e-2)
    assert report.counts["attention"] == 1 and report.counts["softmax"] == 0


# --- batched: einsum and 3-D bmm / baddbmm, through any chain of views ---------------------


def flat(t):
    """[B, H, L, D] as the [B*H, L, D] that 3-D attention code works on."""
    return t.reshape(-1, *t.shape[2:])


BATCHED = {
    "einsum": lambda q, k, v, b, a: torch.einsum(
        "bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).div(4.0).softmax(-1), v),
    "einsum_blhd": lambda q, k, v, b, a: torch.einsum(  # [B, L, H, D] activations
        "bhqk,bkhd->bqhd", (torch.einsum("bqhd,bkhd->bhqk", q.transpose(1, 2),
                                         k.transpose(1, 2)) * 0.25 + a).softmax(-1),
        v.transpose(1, 2)),
    "einsum_masked": lambda q, k, v, b, a: torch.einsum("bhij,bhjd->bhid", torch.softmax(
        torch.einsum("bhid,bhjd->bhij", q * 0.25, k).masked_fill(~b, float("-inf")), -1), v),
    "bmm_4d_softmax": lambda q, k, v, b, a: torch.bmm(torch.softmax(
        torch.bmm(flat(q), flat(k).transpose(1, 2)).view(2, 4, 8, 8) * 0.25 + a, -1).view(
            8, 8, 8), flat(v)).view(2, 4, 8, 16),
    "baddbmm_bias": lambda q, k, v, b, a: torch.bmm(torch.baddbmm(
        flat(a.expand(2, 4, 8, 8)), flat(q), flat(k).transpose(1, 2), beta=1.0, alpha=0.25
    ).softmax(-1), flat(v)),
    "baddbmm_alibi": lambda q, k, v, b, a: torch.bmm(torch.baddbmm(  # BLOOM: [B*H, 1, Lk]
        flat(a[:, :, :1].expand(2, 4, 1, 8)), flat(q), flat(k).transpose(1, 2), alpha=0.25
    ).softmax(-1), flat(v)),
    "bmm_fp32_softmax": lambda q, k, v, b, a: torch.bmm(F.softmax(torch.bmm(
        flat(q), flat(k).transpose(1, 2)) / 4.0, -1, dtype=torch.float32).to(q.dtype), flat(v)),
}


@pytest.mark.parametrize("name", BATCHED)
def test_each_batched_spelling_becomes_one_op(name):
    args = (Q, K, V, BOOL | CAUSAL_KEEP, ADD)
    gm = aten_graph(BATCHED[name], *args)
    assert run_pass(gm) == (1, [])
    # Views, mask algebra, and a q pre-scale, which the batched form keeps as it is.
    allowed = {"aten.view", "aten._unsafe_view", "aten.reshape", "aten.permute",
               "aten.transpose.int", "aten.clone", "aten.unsqueeze", "aten.expand",
               "aten.slice.Tensor", "aten.logical_not", "aten.bitwise_not", "aten.add.Tensor",
               "aten.mul.Tensor", "aten.flatten.using_ints", "aten.unflatten.int"}
    assert [o for o in ops(gm) if o not in allowed] == ["attnopt.attention"], ops(gm)
    assert "aten.bmm" not in ops(gm) and "aten.baddbmm" not in ops(gm)
    torch.testing.assert_close(gm(*args), BATCHED[name](*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["einsum", "einsum_blhd", "einsum_masked", "baddbmm_alibi",
                                  "bmm_fp32_softmax"])
def test_batched_decode_step_with_one_query(name):
    # Lq = 1: the products' row axis has size 1, and the lowering moves or drops that dim
    # (einsum puts it after the head dim; a reshape to [B·H, 1, D] attaches it to the batch).
    args = (Q[:, :, -1:], K, V, BOOL[:, :, -1:], ADD[:, :, -1:])
    gm = aten_graph(BATCHED[name], *args)
    assert run_pass(gm) == (1, [])
    assert "aten.bmm" not in ops(gm)
    torch.testing.assert_close(gm(*args), BATCHED[name](*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn, reason", [
    # At one query a softmax over the rows (dim 1) sees a single score: all ones, not attention.
    (lambda q, k, v, b, a: torch.bmm(torch.bmm(flat(q), flat(k).transpose(1, 2)).softmax(1),
                                     flat(v)), "softmax over dim 1, not over the keys"),
    (lambda q, k, v, b, a: torch.bmm(torch.bmm(flat(q), flat(k).transpose(1, 2)).softmax(-1),
                                     flat(v.transpose(0, 1))), "q, k and v batch dims differ"),
])
def test_batched_decode_near_misses_are_reported(fn, reason):
    args = (Q[:, :, -1:], K, V, BOOL, ADD)
    gm = aten_graph(fn, *args)
    n, rejected = run_pass(gm)
    assert n == 0 and len(rejected) == 1 and reason in rejected[0], rejected
    torch.testing.assert_close(gm(*args), fn(*args))


def test_einsum_before_expected():
    before = aten_graph(BATCHED["einsum"], *INPUTS)
    run_pass(before)
    expected = aten_graph(lambda q, k, v, b, a: torch.ops.attnopt.attention(
        q, k, v, None, False, 0.25).flatten(0, 1).view(2, 4, 8, 1, 16).permute(
            0, 1, 2, 4, 3).view(2, 4, 8, 16), *INPUTS)
    # Retraced, as the backend retraces for Inductor: flatten becomes the view it is.
    assert structure(aten_graph(before, *INPUTS)) == structure(expected)


@pytest.mark.parametrize("fn, reason", [
    (lambda q, k, v, b, a: torch.bmm(torch.bmm(flat(q), flat(k).transpose(1, 2)).softmax(1),
                                     flat(v)), "softmax over dim 1, not over the keys"),
    (lambda q, k, v, b, a: torch.bmm(torch.bmm(flat(q), flat(k).transpose(1, 2)).softmax(-1),
                                     flat(v.transpose(0, 1))),  # heads and batch swapped in v
     "q, k and v batch dims differ"),
    (lambda q, k, v, b, a: torch.bmm(torch.baddbmm(flat(a.expand(2, 4, 8, 8)), flat(q), flat(
        k).transpose(1, 2), beta=0.5).softmax(-1), flat(v)), "baddbmm beta=0.5"),
])
def test_batched_near_misses_are_reported(fn, reason):
    gm = aten_graph(fn, *INPUTS)
    n, rejected = run_pass(gm)
    assert n == 0 and len(rejected) == 1 and reason in rejected[0], rejected
    torch.testing.assert_close(gm(*INPUTS), fn(*INPUTS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_end_to_end(dtype):
    class Attn(torch.nn.Module):
        def forward(self, q, k, v, b, a):
            return BATCHED["einsum_blhd"](q, k, v, b, a) + BATCHED["baddbmm_bias"](
                q, k, v, b, a).view(2, 4, 8, 16).transpose(1, 2)

    with torch.no_grad():
        (report,) = assert_matches_eager(
            Attn(), (*(t.to(dtype) for t in (Q, K, V)), BOOL, ADD.to(dtype)),
            options={"inner": "inductor"}, rtol=2e-2 if dtype != torch.float32 else None,
            atol=2e-2 if dtype != torch.float32 else None)
    assert report.counts["attention"] == 2


# --- a constant causal mask becomes the flag -----------------------------------------------

def masked_by_arange(q, k, v, offset=0, window=None):
    lq, lk = q.shape[-2], k.shape[-2]
    rows = torch.arange(lq)[:, None] + (lk - lq) + offset
    cols = torch.arange(lk)[None, :]
    keep = cols <= rows
    if window is not None:
        keep = keep & (cols > rows - window)
    bias = torch.where(keep, 0.0, torch.finfo(q.dtype).min)[None, None]
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + bias, -1) @ v


def causal_from_arange(q, k, v, b, a):
    return masked_by_arange(q, k, v)


def attention_node(gm):
    (node,) = [n for n in gm.graph.nodes if "attnopt.attention" in str(n.target)]
    return node


def test_constant_causal_mask_becomes_is_causal():
    gm = aten_graph(causal_from_arange, *INPUTS)
    assert run_pass(gm) == (1, [])
    node = attention_node(gm)
    assert node.args[3] is None and node.args[4] is True
    assert not [o for o in ops(gm) if o in ("aten.arange", "aten.where.self")]  # mask gone
    torch.testing.assert_close(gm(*INPUTS), causal_from_arange(*INPUTS))


def test_chunked_prefill_causal_is_bottom_right():
    short_q = Q[:, :, :3]
    fn = causal_from_arange
    gm = aten_graph(fn, short_q, K, V, BOOL, ADD)
    assert run_pass(gm) == (1, [])
    assert attention_node(gm).args[4] is True
    torch.testing.assert_close(gm(short_q, K, V, BOOL, ADD), fn(short_q, K, V, BOOL, ADD))


@pytest.mark.parametrize(("lq", "window"), [(8, 3), (3, 3), (8, 1), (8, 8)])
def test_constant_sliding_window_mask_becomes_flag_and_window(lq, window):
    # Mistral's and Gemma's sliding window without padding: keys p - window < j <= p. The
    # window 8 covers every key: just causal. The kernel reads no mask.
    fn = lambda q, k, v, b, a: masked_by_arange(q, k, v, window=window)
    args = (Q[:, :, :lq], K, V, BOOL, ADD)
    gm = aten_graph(fn, *args)
    assert run_pass(gm) == (1, [])
    node = attention_node(gm)
    assert node.args[3] is None and node.args[4] is True
    assert node.kwargs.get("window_left", -1) == (window - 1 if window < 8 else -1)
    torch.testing.assert_close(gm(*args), fn(*args))


def test_shifted_causal_mask_stays_a_tensor():
    fn = lambda q, k, v, b, a: masked_by_arange(q, k, v, offset=-1)
    gm = aten_graph(fn, *INPUTS)
    assert run_pass(gm) == (1, [])
    node = attention_node(gm)
    assert node.args[3] is not None and node.args[4] is False


def test_mask_that_reads_an_input_stays_a_tensor():
    gm = aten_graph(WRITTEN["additive_mask"], *INPUTS)
    run_pass(gm)
    assert attention_node(gm).args[3] is not None


def test_batched_with_dynamic_shapes_matches_without_recompiling():
    """The layout algebra compares symbolic sizes without guarding on them: one dynamic graph
    serves every length, and it is rewritten too."""

    def attend(x, mask):  # 3-D attention over [B, L, D] with a [B, L, L] mask
        scores = torch.bmm(x * 0.5, x.transpose(1, 2)).masked_fill(mask, float("-inf"))
        return torch.bmm(scores.softmax(-1), x)

    compiled = torch.compile(attend, backend="attnopt", options={"inner": "eager"})
    with torch.no_grad():
        for length in (6, 9, 13):
            x = torch.randn(2, length, 16)
            mask = torch.rand(2, length, length) > 0.8
            mask[..., 0] = False
            torch.testing.assert_close(compiled(x, mask), attend(x, mask))
    assert [r.counts["attention"] for r in attnopt.reports()] == [1, 1]
