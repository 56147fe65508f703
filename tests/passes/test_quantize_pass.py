"""The quantize and linear_fusion passes: every linear spelling becomes `attnopt::w4a16_linear`,
siblings reading one input become one GEMM, and what is left alone says why.

Judged against the float model whose weights are replaced by their dequantized int4 values
(tight: the rewrite must compute exactly that, up to the bf16 activations of the CPU kernel) and
against the float model itself (loose: the quantization error)."""

import copy

import pytest
import torch
from torch import nn

import attnopt
from attnopt.backends import int4
from attnopt.testing import assert_matches_eager


class Conv1D(nn.Module):
    """GPT-2's linear: the weight is stored [in, out] and applied with addmm."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


class Spellings(nn.Module):
    def __init__(self, k: int = 96) -> None:
        super().__init__()
        self.with_bias = nn.Linear(k, 48)
        self.no_bias = nn.Linear(k, 32, bias=False)
        self.conv1d = Conv1D(k, 64)
        self.matmul_weight = nn.Parameter(torch.randn(k, 16) * 0.1)
        self.lm_head = nn.Linear(k, 40)

    def forward(self, x):
        return (self.with_bias(x), self.no_bias(x[0]), self.conv1d(x), x @ self.matmul_weight,
                self.lm_head(x))


def dequantized_copy(model: nn.Module, group_size: int, dtype, skip=("lm_head",)) -> nn.Module:
    """The float model with each quantized weight replaced by what the int4 code decodes to."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2 and not any(s in name for s in skip) and "embed" not in name \
                    and "wte" not in name and "wpe" not in name:
                w = p.T if name.endswith(("conv1d.weight", "matmul_weight")) else p
                deq = int4.quantize_rtn(w, group_size, dtype).dequantize(torch.float32)
                p.copy_(deq.T if w is not p else deq)
    return ref


def compiled(model, *inputs, **options):
    attnopt.clear_reports()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="attnopt",
                            options={"inner": "eager", "quantize": "w4a16", **options})(*inputs)
    (report,) = attnopt.reports()
    return out, report


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_every_spelling_rewritten_and_exact_to_the_int4_weight(dtype, group_size):
    torch.manual_seed(0)
    model = Spellings().to(dtype).eval()
    x = torch.randn(2, 5, 96).to(dtype)
    out, report = compiled(model, x, group_size=group_size)
    assert report.counts["w4a16_linear"] == 4  # lm_head is skipped by default
    (rejected,) = report.pass_record("quantize").rejected
    assert "lm_head is left in float: it matches skip glob 'lm_head'" in rejected
    with torch.no_grad():
        exact, float_out = dequantized_copy(model, group_size, dtype)(x), model(x)
    for got, want, loose in zip(out, exact, float_out, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        # The CPU kernel rounds activations to bf16 (what A16 means): ~2^-9 relative.
        assert rel_err(got, want) < 1e-2
        assert rel_err(got, loose) < 0.15


def test_layer_errors_in_report_and_skip_globs():
    model = Spellings().eval()
    _, report = compiled(model, torch.randn(2, 5, 96), skip=["with_*", "conv1d"])
    record = report.pass_record("quantize")
    assert report.counts["w4a16_linear"] == 3  # no_bias, matmul_weight, lm_head
    assert sorted(r.split(": ", 1)[1] for r in record.rejected) == [
        "conv1d is left in float: it matches skip glob 'conv1d'",
        "with_bias is left in float: it matches skip glob 'with_*'"]
    errors = {n.split(" [")[0]: float(n.rsplit(" ", 1)[1]) for n in record.notes}
    assert set(errors) == {"no_bias", "matmul_weight", "lm_head"}
    assert all(0 < e < 0.15 for e in errors.values())


def test_off_unless_requested_and_never_on_training_graphs():
    model = Spellings().eval()
    _, report = compiled(model, torch.randn(2, 5, 96), quantize=None)
    record = report.pass_record("quantize")
    assert report.counts["w4a16_linear"] == 0
    assert record.rewrites == 0 and not record.rejected and not record.notes

    torch._dynamo.reset()
    attnopt.clear_reports()
    x = torch.randn(2, 5, 96, requires_grad=True)
    torch.compile(model.train(), backend="attnopt",
                  options={"inner": "eager", "quantize": "w4a16"})(x)[0].sum().backward()
    report = attnopt.reports()[0]
    assert report.counts["w4a16_linear"] == 0
    assert report.pass_record("quantize").skipped == "weights are not frozen (a training graph)"


def test_added_term_that_is_not_a_bias_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 32))

        def forward(self, x, r):
            return torch.addmm(r, x, self.w)  # r is [M, N]: a residual, not a bias

    _, report = compiled(Residual().eval(), torch.randn(4, 64), torch.randn(4, 32))
    assert report.counts["w4a16_linear"] == 0
    (reason,) = report.pass_record("quantize").rejected
    assert "added term has shape [4, 32], not a per-feature bias [32]" in reason


class Block(nn.Module):
    """Q/K/V and gate/up read one input each: two fusion groups; o reads another."""

    def __init__(self, d: int = 128) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, 32, bias=False), nn.Linear(d, 32)
        self.gate, self.up = nn.Linear(d, 256, bias=False), nn.Linear(d, 256, bias=False)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        b, s, _ = x.shape
        h = q.view(b, s, 4, 32) * k.view(b, s, 1, 32) + v.view(b, s, 1, 32)
        h = self.o(h.reshape(b, s, -1))
        return torch.nn.functional.silu(self.gate(h)) * self.up(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_siblings_fuse_into_one_gemm_and_match_unfused(dtype):
    torch.manual_seed(0)
    model = Block().to(dtype).eval()
    x = torch.randn(2, 7, 128).to(dtype)
    fused, report = compiled(model, x)
    assert report.counts == {**report.counts, "w4a16_linear": 6, "linear_fusion": 2}
    after = report.pass_record("linear_fusion").after
    assert sum("attnopt.w4a16_linear(" in line for line in after) == 3  # qkv, o, gate/up
    unfused, _ = compiled(model, x, passes=["quantize"])
    torch.testing.assert_close(fused, unfused, rtol=0, atol=0)


def test_inductor_and_reference_kernels_agree():
    torch.manual_seed(0)
    model = Block().to(torch.bfloat16).eval()
    x = torch.randn(2, 7, 128).to(torch.bfloat16)
    auto, _ = compiled(model, x)
    with torch.no_grad():
        reports = assert_matches_eager(
            model, x, options={"quantize": "w4a16", "kernels": "reference"}, rtol=0.5, atol=0.5)
    ref, _ = compiled(model, x, kernels="reference")
    assert reports[0].counts["linear_fusion"] == 2
    assert rel_err(auto, ref) < 1e-2
