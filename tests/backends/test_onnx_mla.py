"""MLA in ONNX: attnopt::latent_attention's translation (standard ops) in ONNX Runtime against
`reference.latent_attention` — boolean and additive masks, bottom-right causal, rows that see
no key, fp16, lengths that change at run time — and a DeepSeek-V3 decoding step exported with
its latents as past/present (`export_onnx(..., with_past=True)`), absorbed, verified in ONNX
Runtime against eager on another prompt."""

import math

import pytest
import torch

from attnopt.backends import reference
from tests.backends.test_onnx import TENSOR, Call, export, op_types, run

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
RANK, ROPE, SCALE = 32, 8, 0.3


def operands(b=2, heads=4, lq=3, lk=7, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for shape in (
        (b, heads, lq, RANK), (b, heads, lq, ROPE), (b, 1, lk, RANK), (b, 1, lk, ROPE))]


def mask(kind, b, lq, lk, seed=1):
    keep = torch.rand(b, 1, lq, lk, generator=torch.Generator().manual_seed(seed)) > 0.3
    keep[0, 0, 0] = False  # query 0 of sequence 0 sees no key: 0 in both
    if kind == "bool":
        return keep
    return torch.zeros(b, 1, lq, lk).masked_fill(~keep, -math.inf)


@pytest.mark.parametrize(("kind", "causal", "dtype"), [
    (None, False, torch.float32), (None, True, torch.float32), ("bool", False, torch.float32),
    ("additive", True, torch.float32), ("bool", True, torch.float16)])
def test_latent_attention_is_the_reference(kind, causal, dtype):
    inputs = operands(dtype=dtype)
    args = [TENSOR] * 4 + ([TENSOR] if kind else [None])
    if kind:
        inputs.append(mask(kind, 2, 3, 7))
    module = Call(torch.ops.attnopt.latent_attention, *args, causal, SCALE)
    model, session = export(module, inputs)
    assert "Attention" not in op_types(model) and op_types(model).count("MatMul") == 3
    want = reference.latent_attention(*inputs[:4], inputs[4] if kind else None, causal, SCALE)
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(run(session, inputs), want, rtol=tol, atol=tol)


def test_latent_attention_dynamic_lengths():
    """Exported on 3 queries over 7 keys with batch and lengths dynamic; run on others, one
    query over one key included, keeping the causal diagonal bottom-right."""
    auto = torch.export.Dim.AUTO
    dims = {0: auto, 2: auto}
    module = Call(torch.ops.attnopt.latent_attention, *[TENSOR] * 4, None, True, SCALE)
    _, session = export(module, operands(), dynamic=((dims,) * 4,))
    for b, lq, lk in ((3, 1, 1), (1, 2, 9), (2, 4, 4)):
        inputs = operands(b=b, lq=lq, lk=lk, seed=lk)
        want = reference.latent_attention(*inputs, None, True, SCALE)
        torch.testing.assert_close(run(session, inputs), want, rtol=1e-5, atol=1e-5)


def test_deepseek_decoding_step_with_latent_past_in_onnx_runtime(tmp_path):
    from attnopt import export_onnx
    from attnopt.compiler.past import DecoderWithPast
    from attnopt.compiler.verify import compare
    from tests.test_decode_mla import build, prompts

    model = build("v3")
    path = tmp_path / "decoder.onnx"
    rewritten = export_onnx(model, path, kwargs=prompts(2, 6, pad=2), with_past=True)
    assert rewritten.report.pass_record("mla").rewrites == 2
    past = [n for n in rewritten.input_names if n.startswith("past_key_values")]
    assert past == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    step = DecoderWithPast(model)
    inputs = step.inputs_after((), prompts(3, 9, pad=4))  # another batch and length
    assert [t.shape[-1] for t in inputs["past_key_values"][:2]] == [32, 8]  # latent, rope
    result = compare(path, rewritten.output_names, (), inputs, step, rewritten.module,
                     check_eager=True)
    assert result.ok, result.differences
