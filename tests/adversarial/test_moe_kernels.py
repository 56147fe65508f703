"""An outside tester's attack on the fused MoE kernels (`backends/triton/moe.py`: the one-program
align step, the shared per-call workspace and its token chunks, int4 tiles dequantized before
tl.dot, the one-token by-pair path) and the op boundary. Everything is compared with
`reference.moe` / `reference.moe_w4a16` in float64 on fresh random inputs; without a GPU the
kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so the shapes are tiny."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.backends import int4, moe_cpu, reference
from attnopt.backends.reference import ExpertForm
from attnopt.backends.triton import moe as kernel
from tests.conftest import DEVICE

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def experts(e, h, i, dtype=torch.float32, seed=0, biases=False):
    gen = torch.Generator().manual_seed(seed)
    w_gate_up = torch.randn(e, 2 * i, h, generator=gen) / math.sqrt(h)
    w_down = torch.randn(e, h, i, generator=gen) / math.sqrt(i)
    b = (torch.randn(e, 2 * i, generator=gen), torch.randn(e, h, generator=gen)) if biases \
        else (None, None)
    return (w_gate_up.to(DEVICE, dtype), w_down.to(DEVICE, dtype),
            *(None if v is None else v.to(DEVICE) for v in b))


def tokens(t, h, ids, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to(DEVICE, dtype)
    ids = torch.as_tensor(ids).reshape(t, -1).to(DEVICE)
    weights = torch.rand(ids.shape, generator=gen).to(DEVICE)
    return x, ids, weights


def expected(x, ids, weights, w_gate_up, w_down, form="silu", b_gate_up=None, b_down=None):
    d = [None if v is None else v.double() for v in (b_gate_up, b_down)]
    return reference.moe(x.double(), ids, weights.double(), w_gate_up.double(),
                         w_down.double(), form, *d)


def check(x, ids, weights, w_gate_up, w_down, form="silu", b_gate_up=None, b_down=None):
    """The Triton kernel and the CPU path against the float64 reference; the kernel's result."""
    want = expected(x, ids, weights, w_gate_up, w_down, form, b_gate_up, b_down)
    tol = TOL[x.dtype]
    for fn in (moe_cpu.moe, kernel.fused_moe):
        got = fn(x, ids, weights, w_gate_up, w_down, form, b_gate_up, b_down)
        assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, equal_nan=True)
    return got


# --- routing edge cases ----------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 15, 16, 17, 33])
def test_every_token_to_one_expert_the_rest_empty(t):
    # One run of t pairs (block multiples and one past), 4 experts with no pairs at all.
    w = experts(5, 24, 20)[:2]
    check(*tokens(t, 24, [3] * t), *w)


@pytest.mark.parametrize("t", [1, 2, 17])
def test_same_expert_in_every_slot_counts_each_time(t):
    # top-k = 3 all naming expert 1: the output is Σ_j w_j · expert_1(x), not one copy.
    w_gate_up, w_down, _, _ = experts(4, 24, 20)
    x, ids, weights = tokens(t, 24, [1] * (3 * t))
    got = check(x, ids, weights, w_gate_up, w_down)
    once = expected(x, ids[:, :1], weights.sum(1, keepdim=True), w_gate_up, w_down)
    torch.testing.assert_close(got.double(), once, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", range(1, 9))
def test_one_token_every_k_including_k_equal_e(k):
    e = 8 if k == 8 else 6
    gen = torch.Generator().manual_seed(k)
    check(*tokens(1, 24, torch.randperm(e, generator=gen)[:k], seed=k), *experts(e, 24, 20)[:2])


def test_top_k_equals_the_number_of_experts():
    check(*tokens(5, 24, [torch.randperm(4).tolist() for _ in range(5)]), *experts(4, 24, 20)[:2])


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("t", [1, 7])
def test_id_dtypes(ids_dtype, t):
    x, ids, weights = tokens(t, 24, torch.randint(0, 5, (t, 2), generator=torch.Generator()
                                                  .manual_seed(t)))
    check(x, ids.to(ids_dtype), weights, *experts(5, 24, 20)[:2])


def test_zero_negative_and_nan_routing_weights():
    w = experts(4, 24, 20)[:2]
    x, ids, weights = tokens(6, 24, [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    weights[0, 0], weights[1, 1], weights[2, 0] = 0.0, -0.7, float("nan")
    got = check(x, ids, weights, *w)
    assert got[2].isnan().all() and not got[[0, 1, 3, 4, 5]].isnan().any()


def test_inf_in_one_token_stays_in_that_token():
    # Rows of one block are computed independently: a token full of inf poisons only itself.
    w = experts(2, 24, 20)[:2]
    x, ids, weights = tokens(20, 24, [0] * 20)
    x[3] = float("inf")
    got = check(x, ids, weights, *w)
    assert not got[torch.arange(20) != 3].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 5])
def test_non_contiguous_everything(dtype, t):
    w_gate_up, w_down, _, _ = experts(5, 24, 20, dtype)
    x, ids, weights = tokens(t, 48, torch.randint(0, 5, (t, 3), generator=torch.Generator()
                                                  .manual_seed(3)), dtype)
    x = x[:, 1::2]  # stride (48, 2), offset 1
    ids = torch.cat([ids, ids], 1)[:, ::2]  # stride (6, 2)
    weights = torch.cat([weights, weights], 1)[:, 1::2]
    assert not (x.is_contiguous() or ids.is_contiguous() or weights.is_contiguous())
    check(x, ids, weights, w_gate_up.transpose(1, 2).contiguous().transpose(1, 2), w_down)


def test_empty_input_of_every_kind():
    w = experts(3, 24, 20)[:2]
    x, ids, weights = tokens(4, 24, [[0, 1]] * 4)
    assert kernel.fused_moe(x[:0], ids[:0], weights[:0], *w).shape == (0, 24)
    assert torch.equal(kernel.fused_moe(x, ids[:, :0], weights[:, :0], *w),
                       torch.zeros_like(x))


@settings(max_examples=10, deadline=None)
@given(t=st.integers(1, 40), e=st.integers(1, 9), k=st.integers(1, 4), skew=st.floats(0, 1),
       block_m=st.sampled_from([16, 32]), seed=st.integers(0, 2**16))
def test_random_routings_across_block_boundaries(t, e, k, skew, block_m, seed):
    # Runs of 0 to 160 pairs per expert over block heights 16 and 32, ids drawn with
    # replacement (repeats within a token), a `skew` share of them forced onto expert 0.
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, e, (t, k), generator=gen)
    ids[torch.rand(t, k, generator=gen) < skew] = 0
    x, ids, weights = tokens(t, 24, ids, seed=seed)
    w_gate_up, w_down, _, _ = experts(e, 24, 20, seed=seed)
    got = kernel.fused_moe(x, ids, weights, w_gate_up, w_down, block_m=block_m)
    torch.testing.assert_close(got.double(), expected(x, ids, weights, w_gate_up, w_down),
                               rtol=1e-5, atol=1e-5)


# --- token chunks and the shared workspace ----------------------------------------------------


@pytest.mark.parametrize(("max_pairs", "t", "k"), [(7, 9, 3), (5, 11, 2), (4, 5, 8), (12, 7, 4)])
def test_token_chunks_with_an_uneven_last_chunk(monkeypatch, max_pairs, t, k):
    # Chunks of MAX_PAIRS // k tokens (at least one): the last chunk is shorter, maybe one
    # token (the by-pair plan), and all of them share one workspace sized for the largest.
    monkeypatch.setattr(kernel, "MAX_PAIRS", max_pairs)
    gen = torch.Generator().manual_seed(t)
    ids = torch.randint(0, 6, (t, k), generator=gen)
    check(*tokens(t, 24, ids), *experts(6, 24, 20)[:2])


def test_consecutive_calls_never_read_stale_workspace():
    # Large, small, large, other dtypes and sizes: the caching allocator hands back the same
    # bytes, so each call must write every slot it later reads.
    cases = [(33, 3, 8, 40, 24, torch.float32), (1, 2, 3, 16, 8, torch.float16),
             (17, 1, 2, 24, 40, torch.bfloat16), (2, 4, 5, 8, 16, torch.float32),
             (33, 3, 8, 40, 24, torch.float32), (1, 8, 8, 40, 24, torch.bfloat16)]
    for n, (t, k, e, h, i, dtype) in enumerate(cases):
        gen = torch.Generator().manual_seed(n)
        ids = torch.randint(0, e, (t, k), generator=gen)
        check(*tokens(t, h, ids, dtype, seed=n), *experts(e, h, i, dtype, seed=n)[:2])


# --- every expert form, on the by-pair path (T = 1) and the align path ------------------------


FORMS = {
    "silu": ExpertForm("silu"),
    "gelu": ExpertForm("gelu"),
    "gelu_tanh_interleaved": ExpertForm("gelu_tanh", interleaved=True),
    "swiglu_oai": ExpertForm("swiglu_oai", interleaved=True, alpha=1.3, limit=0.8),
    "on_input": ExpertForm("silu", weight_on_input=True),
}


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("name", FORMS)
@pytest.mark.parametrize("t", [1, 6])
def test_forms(t, name, biases):
    w_gate_up, w_down, b_gate_up, b_down = experts(5, 24, 20, biases=biases)
    x, ids, weights = tokens(t, 24, torch.randint(0, 5, (t, 2), generator=torch.Generator()
                                                  .manual_seed(t)))
    check(x * 3, ids, weights, w_gate_up, w_down, FORMS[name], b_gate_up, b_down)


def int4_experts(w_gate_up, w_down, g, asym_seed=None):
    """(q, s, z) of both stacks, packed per expert as the op takes them, and the dequantized
    stacks; with asym_seed the zeros are moved off the quantizer's own choice (still exact)."""
    out = []
    for w in (w_gate_up, w_down):
        packed = [int4.quantize_rtn(m.float().cpu(), g, w.dtype) for m in w]
        q, s, z = (torch.stack([getattr(p, f) for p in packed]) for f in
                   ("qweight", "scales", "zeros"))
        if asym_seed is not None:
            gen = torch.Generator().manual_seed(asym_seed)
            z = (z + torch.randint(-3, 4, z.shape, generator=gen)).to(z.dtype)
        out.append((q.to(DEVICE), s.to(DEVICE), z.to(DEVICE)))
    (gq, gs, gz), (dq, ds, dz) = out
    h, i = w_gate_up.shape[2], w_down.shape[2]
    deq = [torch.stack([int4.dequantize(q[e], s[e], z[e], g, k, torch.float64)
                        for e in range(q.shape[0])]) for q, s, z, k in
           ((gq, gs, gz, h), (dq, ds, dz, i))]
    return (gq, gs, gz, dq, ds, dz), deq


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("name", FORMS)
@pytest.mark.parametrize(("t", "g", "dtype"), [(1, 32, torch.float16), (6, 64, torch.bfloat16),
                                               (1, 128, torch.float32), (5, 32, torch.float32)])
def test_int4_forms_against_the_dequantized_weights(t, g, dtype, name, biases):
    w_gate_up, w_down, b_gate_up, b_down = experts(5, 40, 24, dtype, biases=biases)
    packed, (dg, dd) = int4_experts(w_gate_up, w_down, g, asym_seed=g + t)
    x, ids, weights = tokens(t, 40, torch.randint(0, 5, (t, 2), generator=torch.Generator()
                                                  .manual_seed(t)), dtype)
    got = kernel.fused_moe_w4a16(x, ids, weights, *packed, g, FORMS[name], b_gate_up, b_down)
    d = [None if v is None else v.double() for v in (b_gate_up, b_down)]
    # The kernel rounds each dequantized weight to x's dtype once (its documented precision).
    dg, dd = dg.to(dtype).double(), dd.to(dtype).double()
    want = reference.moe(x.double(), ids, weights.double(), dg, dd, FORMS[name], *d)
    tol = TOL[dtype] if dtype == torch.float32 else 2 * TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


# --- expert ids outside [0, E): every path refuses them ---------------------------------------


def int4_problem(t, k, e, g=32):
    w_gate_up, w_down, _, _ = experts(e, 40, 24)
    packed, _ = int4_experts(w_gate_up, w_down, g)
    return packed, g


@pytest.mark.parametrize("bad", [-1, 4, 2**40])
@pytest.mark.parametrize("t", [1, 5])
def test_out_of_range_ids_are_an_error_or_nan_on_every_path(t, bad):
    # reference.moe documents a ValueError; the paths that cannot raise without a device sync
    # (Triton) must not return a plausible row either: that token's row is NaN, the others
    # exact. Before: the Triton path dropped the pair, a finite wrong row.
    w_gate_up, w_down, _, _ = experts(4, 24, 20)
    x, ids, weights = tokens(t, 24, [[0, 1, 2]] * t)
    ids[t - 1, 1] = bad
    for impl in ("reference", "auto"):
        with pytest.raises(ValueError, match=f"expert id {bad}, outside"):
            torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down, "silu", impl)
    got = torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down, "silu", "triton")
    assert got[t - 1].isnan().all() and not got[:t - 1].isnan().any()
    want = expected(x, ids.clamp(0, 3), weights, w_gate_up, w_down)
    torch.testing.assert_close(got[:t - 1].double(), want[:t - 1], rtol=1e-5, atol=1e-5)
    packed, g = int4_problem(t, 3, 4)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.attnopt.moe_w4a16(x.new_zeros(t, 40), ids, weights, *packed, g)
    got = torch.ops.attnopt.moe_w4a16(x.new_zeros(t, 40), ids, weights, *packed, g, "silu",
                                      "triton")
    assert got[t - 1].isnan().all() and not got[:t - 1].isnan().any()


def test_out_of_range_ids_make_a_nan_row_in_onnx_runtime():
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from tests.backends.test_onnx import export
    from tests.backends.test_onnx import run as run_onnx

    w_gate_up, w_down, _, _ = experts(4, 24, 20)

    class Experts(torch.nn.Module):
        def forward(self, x, ids, weights):
            return torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down)

    x, ids, weights = tokens(5, 24, [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    _, session = export(Experts(), (x, ids, weights))
    assert torch.equal(run_onnx(session, [x, ids, weights]).isnan(), torch.zeros_like(x).bool())
    ids[3, 0] = 7
    got = run_onnx(session, [x, ids, weights])
    assert got[3].isnan().all() and not got[[0, 1, 2, 4]].isnan().any()


def test_no_experts_with_routed_pairs_is_a_clear_error_everywhere():
    # E = 0 makes every id out of range, which needs no look at the data: a ValueError on
    # every path, the fake one too. Before: ZeroDivisionError inside the Triton launcher.
    x, ids, weights = tokens(2, 8, [[0], [0]])
    w_gate_up, w_down = x.new_empty(0, 8, 8), x.new_empty(0, 8, 4)
    for impl in ("reference", "auto", "triton"):
        with pytest.raises(ValueError, match="no experts"):
            torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down, "silu", impl)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(ValueError, match="no experts"):
        torch.ops.attnopt.moe(torch.empty(2, 8), torch.zeros(2, 1, dtype=torch.long),
                              torch.empty(2, 1), torch.empty(0, 8, 8), torch.empty(0, 8, 4))
    # No routed pair at all (k = 0) stays a zero output.
    assert torch.equal(kernel.fused_moe(x, ids[:, :0], weights[:, :0], w_gate_up, w_down),
                       torch.zeros_like(x))


# --- two MoE layers in one compiled graph, on the Triton kernels -------------------------------


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_two_moe_layers_compiled_on_the_kernels_match_eager(monkeypatch, name):
    # Two layers, so two calls per forward whose workspaces come from the same allocator; a
    # prompt (align path) and a single token (by-pair path), each against eager transformers.
    pytest.importorskip("transformers")
    from tests.moe_models import VOCAB, build

    model = build(name, layers=2).to(DEVICE)
    calls = []
    real = kernel.fused_moe
    monkeypatch.setattr(kernel, "fused_moe", lambda *a, **kw: calls.append(a[0].shape[0])
                        or real(*a, **kw))
    compiled = torch.compile(model, backend="attnopt", options={"kernels": "triton"})
    gen = torch.Generator().manual_seed(7)
    for length in (9, 1):
        ids = torch.randint(0, VOCAB, (1, length), generator=gen).to(DEVICE)
        with torch.no_grad():
            want, got = model(ids).logits, compiled(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert calls == [9, 9, 1, 1]


@pytest.mark.parametrize("t", [1, 4])
def test_a_repeated_expert_counts_twice_as_in_transformers_eager(t):
    # transformers' eager MixtralExperts loops over (expert, slot) hits, so an expert named in
    # two slots of one token runs twice, each weighted: the op's documented semantics.
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=24, intermediate_size=20, num_local_experts=4,
                           num_experts_per_tok=3, experts_implementation="eager")
    w_gate_up, w_down, _, _ = experts(4, 24, 20)
    x, ids, weights = tokens(t, 24, [[2, 0, 2]] * t)
    module = mixtral.MixtralExperts(config).to(DEVICE)
    with torch.no_grad():
        module.gate_up_proj.copy_(w_gate_up)
        module.down_proj.copy_(w_down)
        eager = module(x, ids, weights)
    for impl in ("auto", "triton", "reference"):
        got = torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down, "silu", impl)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


# --- the op boundary's checks under tracing -----------------------------------------------------


@pytest.mark.parametrize("int4_weights", [False, True])
def test_a_data_dependent_token_count_traces(int4_weights):
    # Tokens picked by a mask (a token-dropping router) have an unbacked count u0. The
    # data-free checks must not guard on it: check_moe_w4a16's stand-in weights (a view of x
    # if x.numel() else a new tensor) raised "Could not guard on data-dependent expression
    # Ne(40*u0, 0)" when traced.
    w_gate_up, w_down, _, _ = experts(4, 40, 24)
    packed, _ = int4_experts(w_gate_up, w_down, 32)

    def routed(x, ids, weights, keep):
        x, ids, weights = x[keep], ids[keep], weights[keep]
        if int4_weights:
            return torch.ops.attnopt.moe_w4a16(x, ids, weights, *packed, 32)
        return torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down)

    x, ids, weights = tokens(6, 40, torch.randint(0, 4, (6, 2), generator=torch.Generator()
                                                  .manual_seed(0)))
    keep = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=DEVICE)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(routed, fullgraph=True, backend="eager")(x, ids, weights, keep)
    assert got.shape == (4, 40)
    torch.testing.assert_close(got, routed(x, ids, weights, keep), rtol=0, atol=0)


def test_two_int4_moe_layers_compiled_on_the_kernels_match_the_reference_kernels(monkeypatch):
    # The quantize pass turns both layers' experts into attnopt::moe_w4a16: the Triton kernels
    # (prompt: align path; one token: by pair) against the same graph on the reference ops.
    pytest.importorskip("transformers")
    from tests.moe_models import VOCAB, build

    model = build("qwen3_moe", layers=2).to(DEVICE)
    calls = []
    real = kernel.fused_moe_w4a16
    monkeypatch.setattr(kernel, "fused_moe_w4a16", lambda *a, **kw: calls.append(a[0].shape[0])
                        or real(*a, **kw))
    options = {"quantize": "w4a16", "group_size": 32}
    on_kernels = torch.compile(model, backend="attnopt", options={**options, "kernels": "triton"})
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (1, n), generator=gen).to(DEVICE) for n in (9, 1)]
    with torch.no_grad():
        got = [on_kernels(ids).logits for ids in prompts]
        torch._dynamo.reset()
        on_reference = torch.compile(model, backend="attnopt",
                                     options={**options, "kernels": "reference"})
        want = [on_reference(ids).logits for ids in prompts]
    assert calls == [9, 9, 1, 1]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
