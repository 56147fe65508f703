"""The mla pass on a hand-written MLA step over a past latent (DeepSeek's attention, written as
transformers writes it, with knobs for its near misses): each form it knows is absorbed and the
output equals eager's; each near miss is left as it is with its reason in the report; the cost
model keeps a long prefill naive; kv_b_proj is read through views, so an in-place update of the
weight is seen without recompiling."""

import math
import re

import pytest
import torch
from torch import nn

import attnopt

HEADS, HIDDEN, RANK, NOPE, ROPE, VALUE = 4, 64, 32, 16, 8, 12


class MLAStep(nn.Module):
    """Queries of `x` over the past latent and rotary key plus its own, DeepSeek-style. `form`
    picks how K and attention are written; the near misses change one thing each."""

    def __init__(self, form: str = "copy", bias: bool = False, value: int = VALUE):
        super().__init__()
        self.form, self.value = form, value
        rope_heads = HEADS if form == "rope per head" else 1
        self.q_proj = nn.Linear(HIDDEN, HEADS * (NOPE + ROPE), bias=False)
        self.kv_a = nn.Linear(HIDDEN, RANK + rope_heads * ROPE, bias=False)
        self.kv_b = nn.Linear(RANK, HEADS * (NOPE + value), bias=bias)
        self.o_proj = nn.Linear(HEADS * value, HIDDEN, bias=False)
        self.scale = 0.1234  # DeepSeek's yarn mscale makes it anything: it is read, not assumed

    def forward(self, x, c_past, r_past, mask):
        b, lq, _ = x.shape
        q = self.q_proj(x).view(b, lq, HEADS, NOPE + ROPE).transpose(1, 2)
        q_nope, q_rot = torch.split(q, [NOPE, ROPE], -1)
        c, r = torch.split(self.kv_a(x), [RANK, self.kv_a.out_features - RANK], -1)
        c = torch.cat((c_past, c.view(b, 1, lq, RANK)), 2)
        r = torch.cat((r_past.expand(-1, r.shape[-1] // ROPE, -1, -1),
                       r.view(b, lq, -1, ROPE).transpose(1, 2)), 2)
        lk = c.shape[2]
        if self.form == "heads last":
            kv = self.kv_b(c).view(b, lk, NOPE + self.value, HEADS).permute(0, 3, 1, 2)
        else:
            kv = self.kv_b(c).view(b, lk, HEADS, NOPE + self.value).transpose(1, 2)
        k_nope, v = torch.split(kv, [NOPE, self.value], -1)
        if self.form == "nope offset":  # K's nope columns overlap V's
            k_nope = kv[..., 2:NOPE + 2]
        q = torch.cat((q_nope, q_rot), -1)
        if self.form in ("cat", "sdpa"):
            k = torch.cat((k_nope, r.expand(-1, HEADS, -1, -1)), -1)
        elif self.form == "rope first":
            k, q = torch.cat((r.expand(-1, HEADS, -1, -1), k_nope), -1), torch.cat(
                (q_rot, q_nope), -1)
        else:  # transformers' expand_kv: two copy_ into new_empty, the rope one broadcasting
            k = kv.new_empty(b, HEADS, lk, NOPE + ROPE)
            k[..., :NOPE].copy_(k_nope)
            k[..., NOPE:].copy_(r)
        if self.form == "sdpa":
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             scale=self.scale)
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scale + mask
            out = torch.matmul(torch.softmax(scores, -1), v)
        return self.o_proj(out.transpose(1, 2).reshape(b, lq, -1))


def inputs(lq=1, past=9, b=2, rope_heads=1):
    """x, the past latent and rope key, and transformers' additive mask: causal, the first 3
    past tokens of sequence 1 padding."""
    g = torch.Generator().manual_seed(lq * 100 + past)
    x = torch.randn(b, lq, HIDDEN, generator=g)
    c_past = torch.randn(b, 1, past, RANK, generator=g)
    r_past = torch.randn(b, 1, past, ROPE, generator=g)
    keys = torch.arange(past + lq)
    keep = keys <= (past + torch.arange(lq))[:, None]  # [Lq, Lk]
    keep = keep & (keys >= torch.tensor([[0], [3]])[:b, :, None])  # [B, Lq, Lk]
    mask = torch.zeros(b, 1, lq, past + lq).masked_fill(~keep[:, None],
                                                        torch.finfo(torch.float32).min)
    return x, c_past, r_past, mask


def compile_and_run(module, args, **options):
    torch.manual_seed(0)
    with torch.no_grad():
        want = module(*args)
        compiled = torch.compile(module, backend="attnopt", options={"inner": "eager",
                                                                      **options})
        got = compiled(*args)
    (report,) = attnopt.reports()
    return want, got, report.pass_record("mla"), report, compiled


@pytest.mark.parametrize(("form", "lq"), [("copy", 1), ("copy", 3), ("cat", 1), ("sdpa", 2)])
def test_mla_forms_are_absorbed_and_equal_eager(form, lq):
    torch.manual_seed(0)
    want, got, record, report, _ = compile_and_run(MLAStep(form).eval(), inputs(lq=lq))
    assert record.rewrites == 1, record.rejected
    after = "\n".join(report.passes[-1].after)
    assert "attnopt.latent_attention(" in after and "attnopt.attention(" not in after
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("form", "bias", "reason"), [
    ("rope per head", False, "not one key shared by the heads"),
    ("rope first", False, "K's first 8 columns are not the first 16 columns"),
    ("heads last", False, "not viewed as \\[B, H, L, n \\+ v\\], heads first"),
    ("nope offset", False, "K's first 16 columns are not the first 16 columns"),
    ("copy", True, "kv_b_proj has a bias"),
])
def test_near_misses_are_left_alone_with_their_reason(form, bias, reason):
    torch.manual_seed(0)
    want, got, record, _, _ = compile_and_run(MLAStep(form, bias).eval(), inputs())
    assert record.rewrites == 0
    assert len(record.rejected) == 1 and re.search(reason, record.rejected[0]), record.rejected
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_long_prefill_stays_naive_for_its_cost():
    # 40 queries over 2 past tokens: expanding 42 latents costs less than absorbing (per head
    # 98,112 against 156,800 multiply-adds with these ranks).
    torch.manual_seed(0)
    want, got, record, _, _ = compile_and_run(MLAStep().eval(), inputs(lq=40, past=2))
    assert record.rewrites == 0
    assert "40 queries: expanding the latent costs less" in record.rejected[0]
    assert "98,112 against 156,800" in record.rejected[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kv_b_proj_is_read_in_place_so_weight_updates_are_seen():
    torch.manual_seed(0)
    module = MLAStep().eval()
    args = inputs()
    _, _, record, _, compiled = compile_and_run(module, args)
    assert record.rewrites == 1
    with torch.no_grad():
        module.kv_b.weight.mul_(-0.5)
        torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)


def test_absorbed_step_is_exact_in_float64():
    # The rewrite reassociates sums only: in float64 it is eager to 1e-12.
    torch.manual_seed(0)
    module = MLAStep().double().eval()
    args = [a.double() for a in inputs(lq=2)]
    want, got, record, _, _ = compile_and_run(module, args)
    assert record.rewrites == 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not math.isnan(got.sum().item())


def test_under_inductor():
    # The absorbed products are aten.matmul calls Inductor decomposes; the latent attention
    # stays an opaque call to its CPU path.
    want, got, record, _, _ = compile_and_run(MLAStep().eval(), inputs(lq=2), inner="inductor")
    assert record.rewrites == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kv_b_proj_is_absorbed_before_quantization():
    # mla runs before quantize: kv_b_proj is absorbed in float (its weight read through views,
    # no linear left to quantize), the other linears become int4.
    _, _, record, report, _ = compile_and_run(MLAStep().eval(), inputs(),
                                              quantize="w4a16", group_size=32)
    assert record.rewrites == 1
    assert report.counts["w4a16_linear"] == 3  # q_proj, kv_a, o_proj
    after = "\n".join(report.passes[-1].after)
    assert "attnopt.latent_attention(" in after and after.count("aten.mm(") == 0

