"""Whole-block capture (`compiler/whole_block.py`): attnopt's backend carries Dynamo's
`backend_ctx_ctor`, torch.compile honours it, the settings hold for attnopt-compiled code only,
and the all-experts loops that stand in for transformers' hit-expert loops compute bit for bit
what those loops compute."""

import pytest
import torch

import attnopt
from attnopt.compiler import whole_block
from attnopt.compiler.backend import attnopt_backend


def where_sum(x):
    # torch.where(mask) has a data-dependent size: one graph only with the capture settings.
    return x[torch.where(x > 0)[0]].sum() + 1


def test_torch_compile_enters_the_backend_context():
    assert attnopt_backend.backend_ctx_ctor is whole_block.whole_block_capture
    x = torch.randn(16)
    got = torch.compile(where_sum, backend="attnopt", options={"inner": "eager"})(x)
    torch.testing.assert_close(got, where_sum(x))
    assert len(attnopt.reports()) == 1  # one graph: the where was captured


def test_settings_are_scoped_to_attnopt_compiled_code():
    config = torch._dynamo.config
    before = (config.capture_dynamic_output_shape_ops, config.capture_scalar_outputs)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(where_sum, backend=counting)(torch.randn(16))
    assert len(graphs) > 1  # another backend: the where still breaks the graph
    torch.compile(where_sum, backend="attnopt", options={"inner": "eager"})(torch.randn(16))
    assert (config.capture_dynamic_output_shape_ops, config.capture_scalar_outputs) == before
    with whole_block.whole_block_capture(), whole_block.whole_block_capture():  # nests
        assert config.capture_dynamic_output_shape_ops and config.capture_scalar_outputs
    assert (config.capture_dynamic_output_shape_ops, config.capture_scalar_outputs) == before


def test_only_backends_with_a_context_get_one():
    """The forwarding gives torch.compile's wrappers the inner backend's context and nothing
    to a backend without one (Dynamo's default then applies)."""
    from torch import _TorchCompileWrapper
    from torch._dynamo.repro.after_dynamo import WrapBackendDebug

    plain = WrapBackendDebug(_TorchCompileWrapper(lambda gm, inputs: gm.forward, None, None,
                                                  None), "plain")
    assert getattr(plain, "backend_ctx_ctor", None) is None
    ours = WrapBackendDebug(_TorchCompileWrapper("attnopt", None, None, None), "attnopt")
    assert ours.backend_ctx_ctor is whole_block.whole_block_capture


# --- the all-experts loops are the hit-expert loops, bit for bit ------------------------------

CLASSES = {
    # experts class: its module and the tiny config it is built from
    "MixtralExperts": ("mixtral", "mixtral"),
    "Qwen2MoeExperts": ("qwen2_moe", "qwen2_moe"),
    "OlmoeExperts": ("olmoe", "olmoe"),
    "Qwen3MoeExperts": ("qwen3_moe", "qwen3_moe"),
    "GptOssExperts": ("gpt_oss", "gpt_oss"),
    "DbrxExperts": ("dbrx", "dbrx"),
}


def experts_of(cls_name: str) -> torch.nn.Module:
    import importlib

    from tests.moe_models import config

    module, name = CLASSES[cls_name]
    cfg = config(name)
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"),
                  cls_name)
    return cls(cfg.ffn_config if cls_name == "DbrxExperts" else cfg)


CASES = [(c, torch.float32) for c in CLASSES] + [("GptOssExperts", torch.bfloat16),
                                                  ("DbrxExperts", torch.bfloat16)]


@pytest.mark.parametrize(("cls_name", "dtype"), CASES)
def test_all_experts_loop_equals_the_eager_loop(cls_name, dtype):
    pytest.importorskip("transformers")
    experts = experts_of(cls_name).to(dtype)
    g = torch.Generator().manual_seed(1)
    for p in experts.parameters():
        p.data = torch.randn(p.shape, generator=g).to(dtype) / 8
    t, e = 11, getattr(experts, "num_experts", None)
    k = 2
    x = torch.randn(t, 64, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(t)])  # one unused
    weights = torch.rand(t, k, generator=g).to(dtype)
    cls = type(experts)
    if cls_name == "DbrxExperts":
        own, ours = cls.forward, whole_block.dbrx_all_experts_forward
        x = x[None]
    else:
        assert (cls.__module__, cls_name) in whole_block.ALL_EXPERTS_CLASSES
        own, ours = cls.forward.__wrapped__, whole_block.all_experts_forward
    with torch.no_grad():
        assert torch.equal(ours(experts, x, ids, weights), own(experts, x, ids, weights))


def test_other_experts_classes_keep_their_own_forward(monkeypatch):
    """`eager_experts` reads only the checked classes as the all-experts loop; a class it has not
    checked (here a subclass) runs its own eager forward."""
    pytest.importorskip("transformers")
    experts = experts_of("Qwen3MoeExperts")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    experts.__class__ = type("Unchecked", (type(experts),), {})
    monkeypatch.setattr(whole_block, "all_experts_forward", None)  # would fail if called
    x, ids, w = torch.randn(3, 64), torch.tensor([[0, 1]] * 3), torch.rand(3, 2)
    with torch.no_grad():
        got = whole_block.eager_experts(experts, x, ids, w)
        assert torch.equal(got, type(experts).forward.__wrapped__(experts, x, ids, w))
