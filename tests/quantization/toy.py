"""Small models for the quantization tests: an attention block whose Q/K/V read one input (the
siblings AWQ gives one scale and linear_fusion packs into one GEMM), and a tiny LM around it
with the usual tied embedding / lm_head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

D, HEADS, VOCAB = 64, 4, 96
OUTLIERS = (3, 17, 40)  # input channels whose activations are ~20x the rest, as in real LLMs


class Attention(nn.Module):
    def __init__(self, d: int = D, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, d))


class TinyLM(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.attn = Attention(d)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        return self.lm_head(self.norm(h + self.attn(h)))


def attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention().eval()


def tiny_lm(seed: int = 0) -> TinyLM:
    """A TinyLM whose embeddings have the outlier channels, so AWQ finds scales worth keeping."""
    torch.manual_seed(seed)
    model = TinyLM().eval()
    with torch.no_grad():
        model.embed.weight[:, list(OUTLIERS)] *= 20
    return model


def activations(rows: int = 40, batch: int = 2, seed: int = 1) -> Tensor:
    """[batch, rows, D] activations with a few large-magnitude input channels."""
    x = torch.randn(batch, rows, D, generator=torch.Generator().manual_seed(seed))
    x[..., list(OUTLIERS)] *= 20
    return x


def token_ids(rows: int = 40, batch: int = 2, seed: int = 2) -> Tensor:
    return torch.randint(0, VOCAB, (batch, rows), generator=torch.Generator().manual_seed(seed))
