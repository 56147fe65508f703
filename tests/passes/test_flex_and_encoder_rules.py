"""flex_attention calls and PyTorch's encoder fast path through the attention pass: each
recognisable score_mod / mask_mod (causal, window, softcap, ALiBi, padding, and their
conjunctions) and each fast-path layer (padding and causal masks, pre- and post-norm, GELU and
ReLU, a sequence padded whole) becomes one attnopt::attention equal to eager; every other
function is refused with the reason, and eager's result stands."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from tests.adversarial.helpers import run

B, H, L, D = 2, 4, 24, 16
g = torch.Generator().manual_seed(0)
Q, K, V = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
PAD = torch.ones(B, L, dtype=torch.bool)
PAD[1, :5] = False  # left padding on the second sequence
SLOPES = torch.tensor([2.0 ** (-i - 1) for i in range(H)])


class Flex(torch.nn.Module):
    def __init__(self, score_mod=None, mask_mod=None, kv_len=None, buffers=()):
        super().__init__()
        self.score_mod, self.mask_mod, self.kv_len = score_mod, mask_mod, kv_len
        for name, t in buffers:
            self.register_buffer(name, t)

    def forward(self, q, k, v):
        block_mask = None
        if self.mask_mod is not None:
            mask_mod = self.mask_mod(self)
            block_mask = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2],
                                           device="cpu")
        score_mod = None if self.score_mod is None else self.score_mod(self)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


def causal(module):
    return lambda b, h, q, kv: q >= kv


def window(module):  # transformers' causal and sliding window, as and_masks writes them
    return lambda b, h, q, kv: (kv <= q) & (kv > q - 6)


def padded(module):
    pad = module.pad
    return lambda b, h, q, kv: (kv <= q) & pad[b, kv]


def softcap(module):
    return lambda score, b, h, q, kv: torch.tanh(score / 20.0) * 20.0


def alibi(module):
    slopes = module.slopes
    return lambda score, b, h, q, kv: score + slopes[h] * (kv - q)


def softcap_then_alibi(module):
    slopes = module.slopes
    return lambda score, b, h, q, kv: torch.tanh(score / 20.0) * 20.0 + slopes[h] * (kv - q)


MATCHED = {
    # name: (module, what the call must carry)
    "causal": (Flex(mask_mod=causal), ", True, "),
    "window": (Flex(mask_mod=window), "window_left=5"),
    "two-sided band": (Flex(mask_mod=lambda m: lambda b, h, q, kv: (kv - q <= 2) & (
        q - kv <= 4)), "window_left=4, window_right=2"),
    "padding": (Flex(mask_mod=padded, buffers=[("pad", PAD)]), "unsqueeze"),
    "softcap": (Flex(score_mod=softcap, mask_mod=causal), "softcap=20.0"),
    "alibi": (Flex(score_mod=alibi, buffers=[("slopes", SLOPES)]), "alibi_slopes="),
    "softcap, alibi, window, padding": (Flex(
        score_mod=softcap_then_alibi, mask_mod=lambda m: lambda b, h, q, kv: (kv <= q) & (
            q - kv < 9) & m.pad[b, kv], buffers=[("pad", PAD), ("slopes", SLOPES)]),
        "softcap=20.0, alibi_slopes="),
    "nothing": (Flex(), "attnopt.attention("),
}


def calls(r):
    return [line for rep in r.reports for line in rep.passes[-1].after
            if "attnopt.attention(" in line]


@pytest.mark.parametrize("name", MATCHED)
def test_recognised_flex_attention_becomes_one_op(name):
    module, carried = MATCHED[name]
    r = run(module, Q, K, V)
    r.assert_equal(rtol=1e-5, atol=1e-5)
    assert r.count("attention") == 1, r.rejected
    (call,) = calls(r)
    assert carried in call, call


def test_flex_on_the_triton_kernels():
    module, _ = MATCHED["softcap, alibi, window, padding"]
    r = run(module, Q, K, V, kernels="triton")
    r.assert_equal(rtol=2e-5, atol=2e-5)
    assert r.count("attention") == 1


REFUSED = {
    "unknown score_mod": (Flex(score_mod=lambda m: lambda s, b, h, q, kv: s * 2.0),
                          "a score_mod computing aten.mul.Tensor"),
    "softcap constants differ": (Flex(score_mod=lambda m: lambda s, b, h, q, kv: torch.tanh(
        s / 20.0) * 30.0), "a score_mod computing aten.mul.Tensor"),
    "alibi before the softcap": (Flex(score_mod=lambda m: lambda s, b, h, q, kv: torch.tanh(
        (s + m.slopes[h] * (kv - q)) / 20.0) * 20.0, buffers=[("slopes", SLOPES)]),
        "a score_mod computing"),
    "the diagonal left out": (Flex(mask_mod=lambda m: lambda b, h, q, kv: q > kv),
                              "a band that leaves out the diagonal"),
    "padding read by query": (Flex(mask_mod=lambda m: lambda b, h, q, kv: m.pad[b, q],
                                   buffers=[("pad", PAD)]), "aten.index.Tensor in the mask_mod"),
    "a non-linear mask": (Flex(mask_mod=lambda m: lambda b, h, q, kv: (q * kv) % 3 == 0),
                          "in the mask_mod"),
    "float padding": (Flex(mask_mod=lambda m: lambda b, h, q, kv: m.pad[b, kv] > 0,
                           buffers=[("pad", PAD.float())]), "aten.gt"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_other_flex_functions_are_refused_with_a_reason(name):
    module, reason = REFUSED[name]
    r = run(module, Q, K, V)
    r.assert_equal(rtol=1e-5, atol=1e-5)
    assert r.count("attention") == 0 and r.refused(reason), r.rejected


def test_causal_flex_with_fewer_queries_than_keys_is_refused():
    # flex's q_idx counts from the first query: kv <= q is top-left, the op's causal is
    # bottom-right; with Lq != Lk they differ.
    r = run(Flex(mask_mod=causal), Q[:, :, :8], K, V)
    r.assert_equal(rtol=1e-5, atol=1e-5)
    assert r.count("attention") == 0 and r.refused("they agree only for Lq == Lk")


def test_flex_with_its_logsumexp_read_is_left_alone():
    class WithLse(torch.nn.Module):
        def forward(self, q, k, v):
            out, lse = flex_attention(q, k, v, return_lse=True)
            return out + lse[..., None]

    r = run(WithLse(), Q, K, V)
    r.assert_equal(rtol=1e-5, atol=1e-5)
    assert r.count("attention") == 0 and r.refused("also used by")


# --- the encoder fast path ------------------------------------------------------------------


def encoder(norm_first=False, activation="relu", layers=2):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=norm_first,
                                             activation=activation)
    return torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


class Encode(torch.nn.Module):
    def __init__(self, encoder, masks):
        super().__init__()
        self.encoder, self.masks = encoder, masks

    def forward(self, x, pad):
        if self.masks == "padding":
            return self.encoder(x, src_key_padding_mask=pad)
        if self.masks == "causal":
            mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            return self.encoder(x, mask=mask, is_causal=True)
        return self.encoder(x)


X = torch.randn(3, 7, 32, generator=g)
DROP = torch.zeros(3, 7, dtype=torch.bool)
DROP[1, 4:] = True
DROP[2] = True  # a sequence padded whole: NaN in the fast path's masked softmax


@pytest.mark.parametrize("masks", ["padding", "causal", "none"])
@pytest.mark.parametrize(("norm_first", "activation"), [(False, "relu"), (True, "gelu")])
def test_encoder_fast_path_decomposed_around_one_op(masks, norm_first, activation):
    r = run(Encode(encoder(norm_first, activation), masks), X, DROP)
    r.assert_equal(rtol=1e-5, atol=1e-5)  # NaN exactly where eager has it
    assert r.count("attention") == 2, r.rejected
    lines = [line for rep in r.reports for line in rep.passes[-1].after]
    assert not [line for line in lines if "_transformer_encoder_layer_fwd" in line]


def test_encoder_fast_path_on_the_triton_kernels():
    r = run(Encode(encoder(), "padding"), X, DROP, kernels="triton")
    r.assert_equal(rtol=2e-5, atol=2e-5)
    assert r.count("attention") == 2


def test_native_multi_head_attention_with_and_without_weights():
    # The fast path's mask is `mask.to(bool)`: any non-zero entry drops its key, a finite
    # one too. When its attention weights are read, the call is left as it is, with the
    # reason.
    e, h = 32, 4
    w, b, pw, pb = (torch.randn(*s, generator=g) * 0.2 for s in ((3 * e, e), (3 * e,), (e, e),
                                                                   (e,)))
    mask = torch.zeros(3, 7)
    mask[0, 2], mask[1, 5] = 0.5, -float("inf")

    class Mha(torch.nn.Module):
        def __init__(self, need_weights):
            super().__init__()
            self.need_weights = need_weights

        def forward(self, x, mask):
            out, weights = torch.ops.aten._native_multi_head_attention(
                x, x, x, e, h, w, b, pw, pb, mask, self.need_weights, True, 1)
            return (out, weights) if self.need_weights else out

    r = run(Mha(False), X, mask)
    r.assert_equal(rtol=1e-5, atol=1e-5)
    assert r.count("attention") == 1
    r = run(Mha(True), X, mask)
    r.assert_equal(rtol=1e-5, atol=1e-5)
    assert r.count("attention") == 0
    assert r.refused("intermediate _native_multi_head_attention is also used by getitem")
