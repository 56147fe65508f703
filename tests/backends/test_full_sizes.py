"""The Triton kernels at the shapes of real models (Llama-3-8B, Mixtral-8x7B), against the
reference, on a GPU; `python -m benchmarks.gpu` runs this file first. Without a GPU the same
code runs at small shapes under the interpreter, so the checks themselves stay tested.

On a GPU this also checks what only a GPU can show: a W4A16 decode step captured in a CUDA
graph (a bucket never tuned before: no benchmark runs during the capture, the replay matches
eager, and the bucket is tuned at its first call afterwards)."""

import pytest
import torch

from attnopt.backends import int4, reference
from attnopt.backends.triton import attention, moe, softmax, tuning
from attnopt.backends.triton import w4a16 as w4a16_kernel
from tests.conftest import CUDA, DEVICE

BF16 = torch.bfloat16
# Llama-3-8B's q/o projection and attention, Mixtral's experts; tiny stand-ins for the interpreter.
W4A16_NK = (4096, 4096) if CUDA else (96, 256)
W4A16_MS = (1, 16, 64, 512, 2048) if CUDA else (1, 16, 40, 70)
ATTENTION = (32, 8, 128, 2048, 4096) if CUDA else (4, 2, 32, 40, 72)  # Hq, Hkv, D, L, decode Lk
MOE = (8, 4096, 14336, 2, 64) if CUDA else (4, 64, 48, 2, 5)  # E, H, I, top-k, tokens
SOFTMAX = (1, 32, 2048, 2048) if CUDA else (1, 2, 40, 40)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def int4_weight(n: int, k: int, dtype=BF16) -> int4.PackedInt4:
    torch.manual_seed(0)
    return int4.quantize_rtn(torch.randn(n, k, device=DEVICE) / k**0.5, 128, dtype=dtype)


@pytest.mark.parametrize("m", W4A16_MS)
def test_w4a16_at_model_shapes(m):
    # Every path multiplies the same 16-bit W (int4.dequantize in x's dtype) in fp32: against
    # that product in fp32 only the summation order and the final rounding to bf16 (relative
    # RMS ~1.5e-3) differ.
    n, k = W4A16_NK
    p = int4_weight(n, k)
    x = torch.randn(m, k, device=DEVICE, dtype=BF16)
    got = w4a16_kernel.w4a16_matmul(x, p.qweight, p.scales, p.zeros, 128)
    w = int4.dequantize(p.qweight, p.scales, p.zeros, 128, k, BF16)
    assert relative_error(got, x.float() @ w.float().T) < 3e-3


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_w4a16_decode_step_in_a_cuda_graph():
    n, k = W4A16_NK
    p = int4_weight(n, k)
    x = torch.randn(3, k, device=DEVICE, dtype=BF16)  # bucket 4: never tuned in this file
    args = (p.qweight, p.scales, p.zeros, 128)
    tuner = w4a16_kernel._gemv
    key = (4, n, k, 128)
    assert not any(c[:4] == key for c in tuner.cache)
    benchmarks = []
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    original, on_disk = tuner._bench, tuner.cache_results
    tuner._bench = lambda *a, **kw: benchmarks.append(1) or original(*a, **kw)
    tuner.cache_results = False  # a tuning result from an earlier run must not hide the case
    try:
        # "relaxed": the first config is compiled and loaded during the capture.
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side,
                                                       capture_error_mode="relaxed"):
            out = w4a16_kernel.w4a16_matmul(x, *args)
        assert benchmarks == [] and not any(c[:4] == key for c in tuner.cache)
        graph.replay()
        torch.cuda.synchronize()
        eager = w4a16_kernel.w4a16_matmul(x, *args)  # tunes the bucket now
        assert benchmarks and any(c[:4] == key for c in tuner.cache)
    finally:
        tuner._bench, tuner.cache_results = original, on_disk
    assert relative_error(out, eager) < 5e-3


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("masking", ["causal", "additive"])
def test_attention_at_model_shapes(decode, masking):
    hq, hkv, d, length, context = ATTENTION
    lq, lk = (1, context) if decode else (length, length)
    torch.manual_seed(0)
    q = torch.randn(1, lq, hq, d, device=DEVICE, dtype=BF16).transpose(1, 2)
    k, v = (torch.randn(1, lk, hkv, d, device=DEVICE, dtype=BF16).transpose(1, 2)
            for _ in range(2))
    mask = None
    if masking == "additive":  # a padding mask: the first quarter of the keys hidden
        mask = torch.zeros(1, 1, lq, lk, device=DEVICE, dtype=BF16)
        mask[..., : lk // 4] = torch.finfo(BF16).min
    causal = masking == "causal"
    got = attention.attention(q, k, v, mask, causal, d**-0.5)
    want = reference.attention(q, k, v, mask, causal, d**-0.5)
    assert relative_error(got, want) < 1e-2


@pytest.mark.parametrize("int4_weights", [False, True], ids=["bf16", "int4"])
def test_moe_at_model_shapes(int4_weights):
    e, h, i, top_k, t = MOE
    torch.manual_seed(0)
    x = torch.randn(t, h, device=DEVICE, dtype=BF16)
    probs = torch.randn(t, e, device=DEVICE).softmax(-1)
    weights, ids = probs.topk(top_k, -1)
    w_gate_up = (torch.randn(e, 2 * i, h, device=DEVICE) / h**0.5).to(BF16)
    w_down = (torch.randn(e, h, i, device=DEVICE) / i**0.5).to(BF16)
    if not int4_weights:
        got = moe.fused_moe(x, ids, weights, w_gate_up, w_down)
        want = reference.moe(x, ids, weights, w_gate_up, w_down)
    else:
        packed = [int4.quantize_rtn(w.reshape(-1, w.shape[-1]), 128) for w in (w_gate_up, w_down)]
        shaped = [(pk.qweight.view(e, -1, pk.qweight.shape[-1]),
                   pk.scales.view(e, -1, pk.scales.shape[-1]),
                   pk.zeros.view(e, -1, pk.zeros.shape[-1])) for pk in packed]
        got = moe.fused_moe_w4a16(x, ids, weights, *shaped[0], *shaped[1], 128)
        want = reference.moe_w4a16(x, ids, weights, *shaped[0], *shaped[1], 128)
    assert relative_error(got, want) < 1e-2


def test_softmax_at_model_shape():
    torch.manual_seed(0)
    x = torch.randn(SOFTMAX, device=DEVICE, dtype=BF16)
    causal = torch.ones(SOFTMAX[-2:], device=DEVICE, dtype=torch.bool).triu(1)
    got = softmax.softmax(x, -1, SOFTMAX[-1] ** -0.5, None, causal, float("-inf"), False, False,
                          BF16)
    want = reference.softmax(x, -1, SOFTMAX[-1] ** -0.5, None, causal)
    assert relative_error(got, want) < 1e-2


def test_device_properties_are_cached():
    if not CUDA:
        pytest.skip("no CUDA device")
    first = tuning.device_info(torch.device("cuda"))
    assert tuning.device_info(torch.device("cuda", torch.cuda.current_device())) is first
