"""A reason for every miss: each candidate a pass looks at and leaves alone — a softmax or an
attention in a spelling no rule matches, a fused call the pass cannot open, a linear whose
weight is not used as stored — leaves one line in the report naming the node and the reason,
and a graph cut by a Dynamo graph break says so in its notes. Outputs stay eager's."""

import pytest
import torch
import torch.nn.functional as F

from tests.adversarial.helpers import run

Q, K, V = (torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))


class SoftcapByReciprocal(torch.nn.Module):
    """tanh(s · (1/c)) · c: the softcap spelled with a multiply, which the rule does not read
    (its c · tanh(s / c) divides)."""

    def forward(self, q, k, v):
        s = torch.tanh(q @ k.transpose(-1, -2) * (1 / 30.0)) * 30.0
        return torch.softmax(s, -1) @ v


class SinksFirst(torch.nn.Module):
    """The sink column in front of the keys and sliced off there: not GPT-OSS's last column."""

    def __init__(self):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.linspace(-1, 1, 3))

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        sink = self.sinks.view(1, 3, 1, 1).expand(s.shape[0], 3, s.shape[2], 1)
        return torch.softmax(torch.cat([sink, s], -1), -1)[..., 1:] @ v


class NoMax(torch.nn.Module):
    def forward(self, x):
        e = torch.exp(x)
        return e / e.sum(-1, keepdim=True)


class LogSoftmax(torch.nn.Module):
    def forward(self, x):
        return torch.log_softmax(x, -1)


class CastWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return F.linear(x, self.proj.weight.to(torch.float64).float() * 2.0)


class ScaledAddmm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.addmm(self.proj.bias, x, self.proj.weight.t(), alpha=0.5)


def flex(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s * 2.0)


CASES = {
    "softcap by reciprocal": (SoftcapByReciprocal(), (Q, K, V), {},
                              "aten.tanh before the softmax"),
    "sinks first": (SinksFirst(), (Q, K, V), {},
                    "aten.cat before the softmax, aten.slice.Tensor after"),
    "exp over sum": (NoMax(), (torch.randn(3, 4),), {}, "without the row maximum subtracted"),
    "log_softmax": (LogSoftmax(), (torch.randn(3, 4),), {}, "log_softmax is not rewritten"),
    "cast weight": (CastWeight(), (torch.randn(3, 16),), {"quantize": "w4a16"},
                    "reaches the matmul through aten._to_copy"),
    "addmm alpha": (ScaledAddmm(), (torch.randn(3, 16),), {"quantize": "w4a16"},
                    "with arguments a linear layer does not have"),
}


@pytest.mark.parametrize("case", CASES)
def test_every_miss_has_a_reason(case):
    module, inputs, options, reason = CASES[case]
    r = run(module.eval(), *inputs, **options)
    r.assert_equal(rtol=1e-4, atol=1e-4)
    assert r.refused(reason), r.rejected


def test_flex_attention_is_named():
    q = torch.randn(1, 2, 128, 16)

    class Flex(torch.nn.Module):
        def forward(self, q, k, v):
            return flex(q, k, v)

    r = run(Flex(), q, q, q)
    r.assert_equal(rtol=1e-4, atol=1e-4)
    assert r.refused("flex_attention with a score_mod computing aten.mul.Tensor of the score")


def test_a_graph_break_is_named_in_the_notes():
    class Broken(torch.nn.Module):
        def forward(self, x):
            scores = x @ x.transpose(-1, -2)
            torch._dynamo.graph_break()  # the softmax lands in the next graph
            return torch.softmax(scores, -1) @ x

    r = run(Broken(), torch.randn(2, 4, 8))
    r.assert_equal()
    notes = [n for report in r.reports for n in report.notes]
    assert any(n.startswith("graph break before this graph was compiled:") for n in notes)
