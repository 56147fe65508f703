"""A causal LM's decoding step exported with its KV cache: when exporting (and only then) the
kv_cache pass turns each layer's DynamicCache update and attention into
attnopt::attention_with_past, and the ONNX decoder (one Attention per layer, taking the past
K/V and returning the present) computes in ONNX Runtime what transformers computes with a
DynamicCache holding the same past: 1 and 3 new tokens after 5 cached ones, an empty past, a
batch of one, left padding; Llama (GQA 4:2) and Mistral (MQA, a sliding window shorter than
the context)."""

import pytest
import torch

import attnopt
from attnopt.compat import with_cache
from attnopt.compiler.past import DecoderWithPast

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # torch.export and ONNX export: seconds per model

LAYERS, HEAD_DIM, VOCAB = 2, 16, 128
attention_with_past = torch.ops.attnopt.attention_with_past.default


def build(name: str) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=LAYERS, num_attention_heads=4)
    torch.manual_seed(0)
    if name == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, **common)
        return transformers.LlamaForCausalLM(config).eval()
    if name == "gemma2":  # its attention softcap, through ONNX's Attention with the past
        config = transformers.Gemma2Config(num_key_value_heads=2, head_dim=HEAD_DIM,
                                           query_pre_attn_scalar=HEAD_DIM, sliding_window=64,
                                           attn_implementation="eager", **common)
        return transformers.Gemma2ForCausalLM(config).eval()
    config = transformers.MistralConfig(num_key_value_heads=1, sliding_window=4, **common)
    return transformers.MistralForCausalLM(config).eval()


def prompt(batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def step_inputs(model, batch: int, past: int, new: int, seed: int = 0) -> dict:
    """A decoding step with random past K/V (no prefill); the first row left-padded by two
    when the past is long enough."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, past + new, dtype=torch.long)
    if past > 2:
        mask[0, :2] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, past:].contiguous()
    shape = (batch, model.config.num_key_value_heads, past, HEAD_DIM)
    return {"input_ids": torch.randint(0, VOCAB, (batch, new), generator=g),
            "attention_mask": mask, "position_ids": positions,
            "past_key_values": tuple(torch.randn(shape, generator=g) for _ in range(2 * LAYERS))}


def transformers_step(model, inputs: dict) -> list[torch.Tensor]:
    """The logits and the cache's new K/V as transformers computes them, its own DynamicCache
    holding the same past."""
    past = inputs["past_key_values"]
    cache = transformers.DynamicCache(list(zip(past[::2], past[1::2], strict=True)))
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    position_ids=inputs["position_ids"], use_cache=True,
                    **with_cache(model, cache))
    return [out.logits, *(t for layer in cache.layers for t in (layer.keys, layer.values))]


NAMES = [f"{kind}.{i}.{kv}" for kind in ("past_key_values", "present") for i in range(LAYERS)
         for kv in ("key", "value")]
PAST, PRESENT = NAMES[:2 * LAYERS], NAMES[2 * LAYERS:]


# --- the pass -----------------------------------------------------------------------------------


def test_dynamic_cache_becomes_attention_with_past_when_exporting():
    model = build("llama")
    rewritten = attnopt.rewrite_model(model, kwargs=prompt(), with_past=True)
    assert rewritten.report.counts["kv_cache"] == LAYERS
    assert rewritten.input_names == ["input_ids", "attention_mask", "position_ids", *PAST]
    assert rewritten.output_names == ["logits", *PRESENT]
    graph = rewritten.module.graph
    assert len(graph.find_nodes(op="call_function", target=attention_with_past)) == LAYERS
    assert not graph.find_nodes(op="call_function", target=torch.ops.attnopt.attention.default)
    # The past is read by the new op only: no cat([past, new]) is left, the present K/V the
    # graph returns are the op's.
    past = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("past")]
    assert len(past) == 2 * LAYERS
    readers = {user.target for n in past for user in n.users if user.op == "call_function"}
    assert readers == {attention_with_past, torch.ops.aten.sym_size.int}  # its length: the mask
    (output,) = graph.find_nodes(op="output")
    assert all(present.args[0].target is attention_with_past for present in output.args[0][1:])
    # The rewritten graph runs in PyTorch too, on another step.
    inputs = step_inputs(model, batch=3, past=5, new=3)
    with torch.no_grad():
        got = list(rewritten.module(**inputs).values())
    for g, want in zip(got, transformers_step(model, inputs), strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


def test_compiled_step_keeps_the_dynamic_cache_with_its_reason():
    """Only the export path rewrites it: in a compiled graph the cat stays (no faster either
    way), and the report says why."""
    step = DecoderWithPast(build("llama"))
    inputs = step.inputs_after((), prompt())
    with torch.no_grad():
        want = step(**inputs)
        got = torch.compile(step, backend="attnopt", options={"inner": "eager"})(**inputs)
    torch.testing.assert_close(got, want)
    (report,) = attnopt.reports()
    assert report.counts["attention"] == LAYERS and report.counts["kv_cache"] == 0
    rejected = report.pass_record("kv_cache").rejected
    assert len(rejected) == LAYERS and all("DynamicCache" in r for r in rejected)


# --- ONNX ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "mistral", "gemma2"])
def exported(request, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    model = build(request.param)
    path = tmp_path_factory.mktemp(request.param) / "decoder.onnx"
    return model, path, attnopt.export_onnx(model, path, kwargs=prompt(), with_past=True)


def test_one_attention_per_layer_takes_the_past_and_gives_the_present(exported):
    import onnx

    _, path, _ = exported
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids",
                                             *PAST]
    assert [o.name for o in graph.output] == ["logits", *PRESENT]
    attention = [node for node in graph.node if node.op_type == "Attention"]
    assert [list(node.input[4:]) for node in attention] == [
        [f"past_key_values.{i}.key", f"past_key_values.{i}.value"] for i in range(LAYERS)]
    assert [list(node.output[1:3]) for node in attention] == [
        [f"present.{i}.key", f"present.{i}.value"] for i in range(LAYERS)]
    # No Concat of the past left beside them; the mask reads the past's length.
    readers = [node.op_type for node in graph.node if set(node.input) & set(PAST)]
    assert set(readers) == {"Attention", "Shape"} and readers.count("Attention") == LAYERS


@pytest.mark.parametrize(("batch", "past", "new"), [(2, 5, 1), (2, 5, 3), (1, 0, 3), (3, 1, 1)])
def test_decode_step_in_onnx_runtime_matches_transformers(exported, batch, past, new):
    from attnopt.compiler.verify import run_onnx

    model, path, rewritten = exported
    inputs = step_inputs(model, batch, past, new, seed=past + new)
    got, _ = run_onnx(path, (), inputs)
    for name, g, want in zip(rewritten.output_names, got, transformers_step(model, inputs),
                             strict=True):
        torch.testing.assert_close(torch.from_numpy(g), want, rtol=1e-4, atol=1e-4, msg=name)
