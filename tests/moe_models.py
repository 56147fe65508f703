"""Tiny MoE models for the tests, random weights, built from configs (nothing downloaded): the
transformers architectures of issue 15 and two hand-written forms (the classic ModuleList loop,
an all-experts einsum MoE)."""

from __future__ import annotations

import torch

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)


def config(name: str, layers: int = 1, impl: str = "eager"):
    """The config of `build(name, layers, impl)`."""
    import transformers as t

    c = dict(COMMON, num_hidden_layers=layers)
    if name == "qwen3_moe":
        return t.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                                num_experts_per_tok=2, head_dim=16, **c,
                                experts_implementation=impl)
    if name == "qwen2_moe":  # a gated shared expert beside the routed ones
        return t.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=48,
                                shared_expert_intermediate_size=80, num_experts=8,
                                num_experts_per_tok=2, **c, experts_implementation=impl)
    if name == "olmoe":
        return t.OlmoeConfig(intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                             eos_token_id=0, pad_token_id=0, **c, experts_implementation=impl)
    if name == "mixtral":
        return t.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                               **c, experts_implementation=impl)
    if name == "gpt_oss":
        # Attention with sinks and sliding windows is another pass's; full attention here.
        return t.GptOssConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                              head_dim=16, sliding_window=8,
                              layer_types=["full_attention"] * layers,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                              **c, experts_implementation=impl)
    if name == "llama4":
        return t.Llama4TextConfig(intermediate_size=48, intermediate_size_mlp=80,
                                  num_local_experts=4, num_experts_per_tok=1, head_dim=16,
                                  interleave_moe_layer_step=1, **c)
    if name == "dbrx":
        return t.DbrxConfig(d_model=64, n_heads=4, n_layers=layers, max_seq_len=64,
                            vocab_size=VOCAB,
                            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                            ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2))
    if name == "jetmoe":
        return t.JetMoeConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers,
                              num_key_value_heads=2, kv_channels=16, intermediate_size=48,
                              num_local_experts=4, num_experts_per_tok=2,
                              max_position_embeddings=64)
    if name == "switch":
        return t.SwitchTransformersConfig(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96,
                                          num_layers=layers, num_decoder_layers=layers,
                                          num_heads=4, num_experts=4, expert_capacity=64,
                                          encoder_sparse_step=1, decoder_sparse_step=1)
    raise ValueError(name)


MODELS = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
          "olmoe": "OlmoeForCausalLM", "mixtral": "MixtralForCausalLM",
          "gpt_oss": "GptOssForCausalLM", "llama4": "Llama4ForCausalLM",
          "dbrx": "DbrxForCausalLM", "jetmoe": "JetMoeForCausalLM",
          "switch": "SwitchTransformersEncoderModel"}


def build(name: str, layers: int = 1, impl: str = "eager") -> torch.nn.Module:
    """A transformers causal LM (Switch: its encoder) with `layers` MoE layers and 4-8
    experts of intermediate size 48; `impl` is the experts implementation where the model has
    one."""
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, MODELS[name])(config(name, layers, impl)).eval()


class Expert(torch.nn.Module):
    def __init__(self, h: int, i: int, act=torch.nn.functional.silu, down_bias=False) -> None:
        super().__init__()
        self.w1 = torch.nn.Linear(h, i, bias=False)
        self.w3 = torch.nn.Linear(h, i, bias=False)
        self.w2 = torch.nn.Linear(i, h, bias=down_bias)
        self.act = act

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class ClassicMoE(torch.nn.Module):
    """Mixtral as transformers v4 wrote it: softmax, top-k, renormalise, a loop over the
    experts with `where` and `index_add_`. Near misses: `order` (which experts the loop visits,
    in which order), `acts` (each expert's activation), `down_bias`, `softmax_first=False`
    (top-k of the logits, then a softmax over the k), `break_at` (a graph break before the
    loop's step for that expert; -1: between the router and the loop)."""

    def __init__(self, h: int = 32, i: int = 48, experts: int = 4, k: int = 2,
                 order: list[int] | None = None, acts: list | None = None,
                 down_bias: bool = False, softmax_first: bool = True,
                 break_at: int | None = None) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(h, experts, bias=False)
        acts = acts or [torch.nn.functional.silu] * experts
        self.experts = torch.nn.ModuleList(Expert(h, i, a, down_bias) for a in acts)
        self.k, self.order = k, order if order is not None else list(range(experts))
        self.softmax_first, self.break_at = softmax_first, break_at

    def forward(self, x):
        b, s, h = x.shape
        x = x.view(-1, h)
        if self.softmax_first:
            weights = torch.softmax(self.gate(x), dim=1, dtype=torch.float)
            weights, chosen = torch.topk(weights, self.k, dim=-1)
            weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        else:
            weights, chosen = torch.topk(self.gate(x), self.k, dim=-1)
            weights = torch.softmax(weights, dim=-1)
        if self.break_at == -1:
            torch._dynamo.graph_break()
        out = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(chosen, num_classes=len(self.experts)).permute(2, 1, 0)
        for e in self.order:
            if e == self.break_at:
                torch._dynamo.graph_break()
            slot, token = torch.where(mask[e])
            y = self.experts[e](x[None, token].reshape(-1, h)) * weights[token, slot, None]
            out.index_add_(0, token, y.to(x.dtype))
        return out.view(b, s, h)


class EinsumMoE(torch.nn.Module):
    """Every expert on every token (einsum), combined by a gate scattered from the top-k:
    zero outside it. `fill` is what the gate holds outside the top-k; `softmax_after` takes the
    softmax over the scattered row instead of over the top-k values."""

    def __init__(self, h: int = 32, i: int = 48, experts: int = 4, k: int = 2,
                 fill: float = 0.0, softmax_after: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.router = torch.nn.Linear(h, experts, bias=False)
        self.w_gate = torch.nn.Parameter(torch.randn(experts, i, h, generator=g) / h**0.5)
        self.w_up = torch.nn.Parameter(torch.randn(experts, i, h, generator=g) / h**0.5)
        self.w_down = torch.nn.Parameter(torch.randn(experts, h, i, generator=g) / i**0.5)
        self.k, self.fill, self.softmax_after = k, fill, softmax_after

    def forward(self, x):
        logits = self.router(x)
        top, ids = logits.topk(self.k, dim=-1)
        if self.softmax_after:
            gates = torch.full_like(logits, float("-inf")).scatter(-1, ids, top).softmax(-1)
        else:
            gates = torch.full_like(logits, self.fill).scatter(-1, ids, top.softmax(-1))
        gate = torch.einsum("bsh,eih->bsei", x, self.w_gate)
        up = torch.einsum("bsh,eih->bsei", x, self.w_up)
        y = torch.einsum("bsei,ehi->bseh", torch.nn.functional.silu(gate) * up, self.w_down)
        return torch.einsum("bseh,bse->bsh", y, gates)
