"""attnopt::moe: the fused Triton kernel (`backends/triton/moe.py`) and the CPU path
(`backends/moe_cpu.py`) against `reference.moe` in float64. Without a GPU the kernel runs under
TRITON_INTERPRET=1 with BLOCK_M 16 and one 16 x 16 (BLOCK_N x BLOCK_K) config, and the down GEMM
in two K chunks, so the shapes below, kept tiny for the interpreter, still reach every tail:
H = 40 and I = 24 leave ragged column and K tiles, and odd H = 37, I = 23 also push the CPU path
off `torch._grouped_mm` (which needs 16-byte strides) onto its per-expert loop."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.backends import moe_cpu, reference
from attnopt.backends.triton import moe as kernel
from tests.conftest import CUDA, DEVICE

# fp32 accumulation; 16-bit results are rounded twice (the intermediate and the output).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
PATHS = ("triton", "cpu")
H, I = 40, 24  # noqa: E741  (the hidden and intermediate sizes, as in the docs)


def problem(t=9, k=2, e=6, h=H, i=I, dtype=torch.float32, routing="random", seed=0,
            ids_dtype=torch.int64):
    """x, ids, weights, w_gate_up, w_down with O(1) outputs. Routings: "random" (k distinct
    experts per token, as top-k gives), "one" (every token picks the same k experts: the others
    get nothing), "skewed" (slot 0 is expert 0 for every token), "repeat" (ids drawn with
    replacement, so a token may pick one expert twice)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    w_gate_up = torch.randn(e, 2 * i, h, generator=gen) / math.sqrt(h)
    w_down = torch.randn(e, h, i, generator=gen) / math.sqrt(i)
    if routing == "repeat":
        ids = torch.randint(0, e, (t, k), generator=gen)
    elif routing == "one":
        ids = torch.randperm(e, generator=gen)[:k].expand(t, k).clone()
    else:
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
        if routing == "skewed":
            ids[:, 0] = 0
            ids[:, 1:] = torch.where(ids[:, 1:] == 0, ids[:, :1].new_tensor(e - 1), ids[:, 1:])
    weights = torch.rand(t, k, generator=gen).softmax(-1)
    dense = (x, weights, w_gate_up, w_down)
    x, weights, w_gate_up, w_down = (v.to(DEVICE) for v in dense)
    return (x.to(dtype), ids.to(device=DEVICE, dtype=ids_dtype), weights,
            w_gate_up.to(dtype), w_down.to(dtype))


def expected(x, ids, weights, w_gate_up, w_down, activation="silu"):
    return reference.moe(x.double(), ids, weights.double(), w_gate_up.double(),
                         w_down.double(), activation)


def run(path, *args, **kw):
    if path == "triton":
        return kernel.fused_moe(*args, **kw)
    return moe_cpu.moe(*args, **kw)


def check(path, x, ids, weights, w_gate_up, w_down, activation="silu", **kw):
    got = run(path, x, ids, weights, w_gate_up, w_down, activation, **kw)
    assert got.dtype == x.dtype and got.shape == x.shape and got.is_contiguous()
    tol = TOL[x.dtype]
    torch.testing.assert_close(got.double(), expected(x, ids, weights, w_gate_up, w_down,
                                                      activation), rtol=tol, atol=tol)
    return got


@pytest.mark.parametrize("routing", ["random", "one", "skewed", "repeat"])
@pytest.mark.parametrize("path", PATHS)
def test_routings(path, routing):
    # 9 tokens x 2 over 6 experts: some experts empty ("one": all but two), runs of 1 to 9.
    check(path, *problem(routing=routing))


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("path", PATHS)
def test_top_k(path, k):
    # k = 8 of 8 experts: every token visits every expert.
    check(path, *problem(t=3, k=k, e=8, h=24, i=20, seed=k))


@pytest.mark.parametrize("activation", reference.MOE_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_dtypes_and_activations(path, dtype, activation):
    check(path, *problem(t=4, dtype=dtype), activation)


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("path", PATHS)
def test_id_dtypes(path, ids_dtype):
    check(path, *problem(t=4, ids_dtype=ids_dtype))


@pytest.mark.parametrize("path", PATHS)
def test_odd_sizes(path):
    args = problem(t=7, k=3, e=5, h=37, i=23, dtype=torch.bfloat16)
    if path == "cpu":  # the per-expert loop; test_routings covers torch._grouped_mm
        assert not moe_cpu.grouped_mm_ok(args[0], args[3].transpose(1, 2))
        x0, _, _, w_gate_up0, _ = problem()
        assert moe_cpu.grouped_mm_ok(x0, w_gate_up0.transpose(1, 2))
    check(path, *args)


@pytest.mark.parametrize("path", PATHS)
def test_many_experts(path):
    # E = 64 (fine-grained MoE), top-6 of 64 for 4 tokens: most experts get nothing.
    check(path, *problem(t=4, k=6, e=64, h=20, i=12))


@pytest.mark.parametrize("path", PATHS)
def test_decode_reads_only_the_chosen_experts(path):
    # One token (decode): the weights of every expert it did not pick are NaN, so reading any
    # of them would poison the output.
    x, ids, weights, w_gate_up, w_down = problem(t=1, k=2, e=8)
    unused = torch.ones(8, dtype=torch.bool, device=DEVICE)
    unused[ids[0]] = False
    w_gate_up[unused] = float("nan")
    w_down[unused] = float("nan")
    got = check(path, x, ids, weights, w_gate_up, w_down)
    assert torch.isfinite(got).all()
    if path == "triton":  # one block per chosen expert, no other block
        al = kernel.align_block_size(ids.view(-1), 8, 16)
        assert al.max_blocks == 2 and int(al.num_post_padded) == 32
        assert sorted(al.expert_of_block.tolist()) == sorted(ids[0].tolist())


@pytest.mark.parametrize(("block_m", "split_k"), [(16, 1), (16, 3), (32, 2), (64, 1)])
def test_block_heights_and_k_splits(block_m, split_k):
    # I = 24 in chunks of 16: split_k 3 still gives 2 chunks (16 + 8).
    check("triton", *problem(t=12, k=3, routing="skewed"), block_m=block_m, split_k=split_k)


def test_token_chunks(monkeypatch):
    # More pairs than MAX_PAIRS go through in token chunks; rows are independent, so on a GPU
    # chunking changes no bit. Under the interpreter tl.dot is numpy's matmul, whose BLAS may
    # round a row differently when the matrix has fewer rows: equal to fp32 rounding there.
    args = problem(t=9, k=3)
    whole = kernel.fused_moe(*args)
    monkeypatch.setattr(kernel, "MAX_PAIRS", 7)  # 2 tokens per pass
    chunked = kernel.fused_moe(*args)
    if CUDA:
        assert torch.equal(chunked, whole)
    else:
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_non_contiguous_operands(path):
    x, ids, weights, w_gate_up, w_down = problem(t=6)
    x = torch.cat([x, x], 1)[:, ::2]  # stride (2H, 2)
    w_gate_up = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2)  # stored [E, H, 2I]
    ids, weights = ids.T.contiguous().T, weights.T.contiguous().T  # column-major [T, k]
    assert not (x.is_contiguous() or w_gate_up.is_contiguous() or ids.is_contiguous())
    check(path, x, ids, weights, w_gate_up, w_down)


@pytest.mark.parametrize("path", PATHS)
def test_routing_weight_dtypes(path):
    # OLMoE hands bf16 routing weights; they are applied in fp32 all the same.
    x, ids, weights, w_gate_up, w_down = problem(t=5, dtype=torch.bfloat16)
    check(path, x, ids, weights.bfloat16(), w_gate_up, w_down)


@pytest.mark.parametrize("path", [*PATHS, "reference"])
def test_empty(path):
    x, ids, weights, w_gate_up, w_down = problem(t=3)
    fn = reference.moe if path == "reference" else lambda *a: run(path, *a)
    assert fn(x[:0], ids[:0], weights[:0], w_gate_up, w_down).shape == (0, H)
    got = fn(x, ids[:, :0], weights[:, :0], w_gate_up, w_down)  # k = 0: nothing routed
    assert torch.equal(got, torch.zeros_like(x))


@settings(max_examples=8, deadline=None)
@given(t=st.integers(1, 4), k=st.integers(1, 4), e=st.integers(1, 10),
       h=st.integers(1, 36), i=st.integers(1, 20), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_random_shapes(t, k, e, h, i, seed, dtype):
    args = problem(t=t, k=k, e=e, h=h, i=i, dtype=dtype, routing="repeat", seed=seed)
    for path in PATHS:
        check(path, *args)


# --- routing ids out of range ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 6])
def test_out_of_range_ids(bad):
    x, ids, weights, w_gate_up, w_down = problem(t=4)
    ids[2, 1] = bad
    for fn in (reference.moe, moe_cpu.moe):
        with pytest.raises(ValueError, match=rf"expert id {bad}, outside \[0, 6\)"):
            fn(x, ids, weights, w_gate_up, w_down)
    # The kernel cannot check (a device sync): it reads nothing out of bounds and makes that
    # token's row NaN; the other tokens are exact.
    got = kernel.fused_moe(x, ids, weights, w_gate_up, w_down)
    assert got[2].isnan().all() and not got[[0, 1, 3]].isnan().any()
    torch.testing.assert_close(got[[0, 1, 3]].double(),
                               expected(x, ids.clamp(0, 5), weights, w_gate_up,
                                        w_down)[[0, 1, 3]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [None, -1, 6])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_one_token_goes_by_pair(k, bad):
    # A decode step: a block per pair, no align step. Ids drawn with replacement may repeat
    # (that expert's weights are read twice); an id out of range makes the row NaN.
    x, ids, weights, w_gate_up, w_down = problem(t=1, k=k, routing="repeat", dtype=torch.float16)
    if bad is not None:
        ids[0, -1] = bad
        assert kernel.fused_moe(x, ids, weights, w_gate_up, w_down).isnan().all()
        return
    got = kernel.fused_moe(x, ids, weights, w_gate_up, w_down)
    tol = TOL[torch.float16]
    torch.testing.assert_close(got.double(), expected(x, ids, weights, w_gate_up, w_down),
                               rtol=tol, atol=tol)


def test_bad_arguments():
    x, ids, weights, w_gate_up, w_down = problem(t=3)
    with pytest.raises(ValueError, match="activation"):
        moe_cpu.moe(x, ids, weights, w_gate_up, w_down, "relu")
    with pytest.raises(ValueError, match="w_down must be"):
        reference.moe(x, ids, weights, w_gate_up, w_down[:, :, :-1])
    with pytest.raises(ValueError, match="share one dtype"):
        kernel.fused_moe(x, ids, weights, w_gate_up.half(), w_down)
    with pytest.raises(ValueError, match="int32 or int64"):
        moe_cpu.moe(x, ids.float(), weights, w_gate_up, w_down)
    with pytest.raises(TypeError, match="fp16, bf16 and fp32"):
        kernel.fused_moe(*(a.double() if a.is_floating_point() else a
                           for a in (x, ids, weights, w_gate_up, w_down)))
    with pytest.raises(ValueError, match="block_m"):
        kernel.fused_moe(x, ids, weights, w_gate_up, w_down, block_m=24)


# --- the align step ------------------------------------------------------------------------------


@pytest.mark.parametrize(("s", "e", "block_m"), [(1, 1, 16), (37, 5, 16), (200, 64, 16),
                                                  (90, 3, 32)])
def test_alignment(s, e, block_m):
    gen = torch.Generator().manual_seed(s)
    ids = torch.randint(0, e, (s,), generator=gen, dtype=torch.int32).to(DEVICE)
    al = kernel.align_block_size(ids, e, block_m)
    counts = torch.bincount(ids.cpu().long(), minlength=e)
    padded = (counts + block_m - 1) // block_m * block_m
    used = int(al.num_post_padded)
    assert used == int(padded.sum()) <= al.max_blocks * block_m
    rows, blocks = al.sorted_ids[:used].cpu().long(), al.expert_of_block.cpu().long()
    # The runs, expert by expert: its pairs (each once), then the sentinel S up to a block end.
    start = 0
    for x in range(e):
        run = rows[start:start + int(padded[x])]
        real = run[: int(counts[x])]
        assert torch.equal(real.sort().values, (ids.cpu() == x).nonzero().view(-1))
        assert (run[int(counts[x]):] == s).all()
        assert (blocks[start // block_m:(start + int(padded[x])) // block_m] == x).all()
        start += int(padded[x])
    assert (blocks[used // block_m:] == -1).all()


# --- the op ----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_op(impl):
    x, ids, weights, w_gate_up, w_down = problem(t=5, dtype=torch.bfloat16)
    got = torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down, "gelu_tanh", impl)
    tol = TOL[torch.bfloat16]
    torch.testing.assert_close(got.double(), expected(x, ids, weights, w_gate_up, w_down,
                                                      "gelu_tanh"), rtol=tol, atol=tol)
    if impl == "auto" and DEVICE == "cpu":  # "auto" on CPU tensors is the CPU path
        assert torch.equal(got, moe_cpu.moe(x, ids, weights, w_gate_up, w_down, "gelu_tanh"))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, ids = torch.empty(11, 40, dtype=torch.bfloat16), torch.empty(11, 3, dtype=torch.int32)
        out = torch.ops.attnopt.moe(x, ids, torch.empty(11, 3),
                                    torch.empty(8, 48, 40, dtype=torch.bfloat16),
                                    torch.empty(8, 40, 24, dtype=torch.bfloat16))
        assert out.shape == (11, 40) and out.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="w_down must be"):
            torch.ops.attnopt.moe(x, ids, torch.empty(11, 3),
                                  torch.empty(8, 48, 40, dtype=torch.bfloat16),
                                  torch.empty(8, 40, 25, dtype=torch.bfloat16))


def test_opcheck():
    # Schema, fake implementation and autograd registration agree with the CPU path.
    x, ids, weights, w_gate_up, w_down = problem(t=4, h=16, i=8)
    args = (x.requires_grad_(), ids, weights.requires_grad_(), w_gate_up, w_down, "silu", "auto")
    torch.library.opcheck(torch.ops.attnopt.moe.default, args)


@pytest.mark.parametrize("activation", reference.MOE_ACTIVATIONS)
def test_gradients_match_the_reference(activation):
    # The backward (`reference.moe_backward`, by hand) against autograd through the reference,
    # in fp64; "repeat" routing has a token pick one expert twice.
    x, ids, weights, w_gate_up, w_down = (
        a.double() if a.is_floating_point() else a
        for a in problem(t=5, k=3, e=4, h=12, i=8, routing="repeat"))
    leaves = [a.requires_grad_() for a in (x, weights, w_gate_up, w_down)]
    out = torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down, activation, "auto")
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref = reference.moe(x, ids, weights, w_gate_up, w_down, activation)
    for g, w in zip(grads, torch.autograd.grad(ref.square().sum(), leaves), strict=True):
        torch.testing.assert_close(g, w)


def test_inside_torch_compile():
    x, ids, weights, w_gate_up, w_down = problem(t=7, dtype=torch.bfloat16)

    def block(x, ids, weights):
        y = torch.ops.attnopt.moe(x * 2, ids, weights, w_gate_up, w_down, "silu", "auto")
        return y + x

    compiled = torch.compile(block, backend="attnopt", options={"inner": "eager"})
    torch.testing.assert_close(compiled(x, ids, weights), block(x, ids, weights))


def test_matches_transformers_mixtral_experts():
    # The semantics are transformers' MixtralExperts (same [E, 2I, H] / [E, H, I] layout, gate
    # before up), checked against its eager forward itself.
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=6,
                           num_experts_per_tok=2, experts_implementation="eager")
    x, ids, weights, w_gate_up, w_down = problem(t=6, dtype=torch.bfloat16)
    experts = mixtral.MixtralExperts(config).to(device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w_gate_up)
        experts.down_proj.copy_(w_down)
        eager = experts(x, ids, weights)
    for impl in ("auto", "triton"):
        got = torch.ops.attnopt.moe(x, ids, weights, w_gate_up, w_down, "silu", impl)
        torch.testing.assert_close(got, eager, rtol=2e-2, atol=2e-2)


# --- CUDA configuration, checked without a GPU ---------------------------------------------


def test_cuda_heuristics():
    # Block heights by rows per expert; Mixtral decode on a 132-SM H100 (2 blocks x 64 column
    # tiles) splits I = 14336 in 5 chunks; prefill does not split.
    assert [kernel.choose_block_m(s, 8) for s in (2, 128, 512, 4096, 8192)] == \
        [16, 16, 32, 64, 128]
    assert kernel.default_splits(132, 2 * 64, 14336) == 5
    assert kernel.default_splits(132, 300 * 64, 14336) == 1
    assert kernel.default_splits(132, 6 * 32, 200) == 1
    assert kernel.max_blocks(2, 8, 16) == 2  # decode: one block per chosen expert
    assert kernel.max_blocks(8192, 8, 64) == 135  # 128 full blocks + at most 7 partial


# The opt-in shared memory per block of A100 and H100 (what `tuning.device_info` reads).
SMEM = {"sm80": 166912, "sm90": 232448}


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [None, 32, 128])
@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
def test_cuda_autotune_spaces_fit(block_m, group, dtype, arch):
    a_bytes = dtype.itemsize
    w_bytes = 0.5 if group else a_bytes
    for lists, w_tiles in ((kernel.GATE_UP_CONFIGS, 2), (kernel.DOWN_CONFIGS, 1)):
        kept = kernel.keep_configs(lists[arch], arch, SMEM[arch], block_m, a_bytes, w_bytes,
                                   w_tiles, group)
        assert kept
        for c in kept:
            n, k = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            assert kernel.SPLIT_GRANULE % k == 0
            assert c.num_stages * (block_m * k * a_bytes + w_tiles * n * k * w_bytes) <= SMEM[arch]
            assert w_tiles * block_m * n // (32 * c.num_warps) <= kernel.MAX_ACC_REGS
            if group:
                assert k <= kernel.INT4_MAX_BLOCK_K and group % k == 0


def test_cuda_pruning_drops_the_configs_that_spilled():
    # The compile audit's int4 spills: gate/up 64x128x64 with 4 warps on sm_80 (128
    # accumulators a thread; with 8 warps the tile stays), BLOCK_K=128 tiles on both arches.
    def kept(arch, w_tiles, block_m=64):
        lists = kernel.GATE_UP_CONFIGS if w_tiles == 2 else kernel.DOWN_CONFIGS
        return {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in
                kernel.keep_configs(lists[arch], arch, SMEM[arch], block_m, 2, 0.5, w_tiles,
                                    128)}

    assert (128, 64, 4) not in kept("sm80", 2) and (128, 64, 8) in kept("sm80", 2)
    for arch in ("sm80", "sm90"):
        assert all(k <= 64 for _, k, _ in kept(arch, 2) | kept(arch, 1) | kept(arch, 2, 16))
    assert (32, 64, 4) in kept("sm90", 2, 16)  # the decode config 16x32x128 becomes 16x32x64


