"""MODEL as the commands take it: a transformers model directory, or `package.module:factory`.

A directory holds config.json and safetensors weights (what `save_pretrained` writes) and is
loaded offline (`local_files_only=True`) in float32, with the class its config names. A
directory that does not give that class every weight, in the shape its config says, is
refused (transformers would fill the gap with random values): a missing or extra tensor, a
tensor of another shape, a truncated safetensors file. Its example inputs come from its
tokenizer when it has one (a fixed batch of two sentences), else random token ids; inputs for
`--verify` are a different batch, of another size and length, so the exported dynamic dims are
exercised too.

A factory is a callable, importable from the current directory or the environment, returning
`(model, example_inputs)` with the inputs a tuple of positional arguments, a dict of keyword
arguments or a single tensor. `--verify` reuses those inputs. A module that fails to import and
a factory that raises are bad input, reported with the error they raised.

AWQ calibrates on text tokenized with the model's tokenizer (`LoadedModel.calibration`) or, when
no text is given, on random token ids (`LoadedModel.random_calibration`).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnopt.commands import UsageError, describe

EXAMPLE_TEXTS = ["attnopt rewrites attention into fused kernels.",
                 "An example input, a little longer than the first one."]
VERIFY_TEXTS = ["A different batch checks the exported model.",
                "It has three sentences.",
                "The longest of them makes the batch longer than the example batch was."]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
# Random-token calibration when no text is given: 8 sequences of 128 tokens are 1024 rows per
# linear input, twice the rows the AWQ search keeps (awq.MAX_ROWS), in a few model calls.
CALIBRATION_BATCHES = 8
CALIBRATION_LENGTH = 128
# Config fields naming special tokens: never drawn as random text (a random [PAD] or [SEP] mid-
# sequence is nothing real text has).
SPECIAL_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id",
                     "sep_token_id", "cls_token_id", "mask_token_id")


@dataclass
class Calibration:
    """AWQ calibration inputs made without calibration text, and what to say about them."""

    inputs: list[Any]  # model inputs, each a dict of keyword arguments or a tuple of positional
    what: str  # "8 random-token batches of 128 tokens"
    better: str  # what would calibrate better: "real text"


@dataclass
class LoadedModel:
    model: nn.Module
    args: tuple  # example inputs: positional ...
    kwargs: dict[str, Any]  # ... and keyword
    verify_args: tuple  # inputs for --verify
    verify_kwargs: dict[str, Any]
    description: str
    directory: Path | None = None  # the model directory, if MODEL is one
    tokenizer: Any = None

    def calibration(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """AWQ calibration inputs: each text tokenized on its own (one sentence per model call,
        at most 512 tokens)."""
        if self.tokenizer is None:
            raise UsageError(
                f"--calib needs a tokenizer to turn text into model inputs, and "
                f"{self.description} has none. Use a model directory with tokenizer files, or "
                "quantize from Python: attnopt.quantize_model(model, method='awq', "
                "calibration=[inputs, ...])")
        return [dict(self.tokenizer(text, return_tensors="pt", truncation=True, max_length=512))
                for text in texts]

    def random_calibration(self, batches: int = CALIBRATION_BATCHES,
                           length: int = CALIBRATION_LENGTH, seed: int = 0) -> Calibration:
        """AWQ calibration inputs when no text is given: random token ids, the same ones for the
        same seed, uniform over the vocabulary less its special tokens.

        A model directory gets `batches` single sequences of `length` tokens (at most its
        max_position_embeddings), one per model call as `calibration` makes them, framed by the
        special tokens its tokenizer puts around a text and with the same inputs beside them.
        A factory whose example inputs are token ids (`input_ids`, or a first positional integer
        tensor, of a model whose config gives vocab_size) gets `batches` random copies of them,
        its other inputs as given. Any other factory's inputs mean nothing attnopt could
        randomise, so its example inputs are the one calibration batch.
        """
        generator = torch.Generator().manual_seed(seed)
        if self.directory is not None:
            return self._random_sequences(batches, length, generator)
        config = getattr(self.model, "config", None)
        vocab = getattr(config, "vocab_size", None)
        ids = self.kwargs.get("input_ids", self.args[0] if self.args else None)
        if not (vocab and isinstance(ids, torch.Tensor)
                and ids.dtype in (torch.int32, torch.int64)):
            return Calibration([self.kwargs or self.args], "the factory's example inputs",
                               "real data")
        special = _special_ids(config, None)
        inputs: list[Any] = []
        for _ in range(batches):
            new = _draw(vocab, special, tuple(ids.shape), generator).to(ids)
            inputs.append({**self.kwargs, "input_ids": new} if "input_ids" in self.kwargs
                          else (new, *self.args[1:]))
        return Calibration(inputs, f"{batches} random-token batches of {_size(ids)} tokens",
                           "real text")

    def _random_sequences(self, batches: int, length: int,
                          generator: torch.Generator) -> Calibration:
        config, tokenizer = self.model.config, self.tokenizer
        # Ids past the tokenizer's vocabulary (embeddings padded to a round size) never occur
        # in text: their rows were never trained.
        sizes = [getattr(config, "vocab_size", None)]
        if tokenizer is not None:
            sizes.append(len(tokenizer))
        vocab = min(n for n in sizes if n)
        length = min(length, getattr(config, "max_position_embeddings", None) or length)
        head, tail = _frame(tokenizer) if tokenizer is not None else ([], [])
        body = _draw(vocab, _special_ids(config, tokenizer),
                     (batches, length - len(head) - len(tail)), generator)
        # The inputs the tokenizer returns beside the ids; without one, those forward takes.
        names = (set(tokenizer.model_input_names) if tokenizer is not None
                 else set(inspect.signature(self.model.forward).parameters))
        inputs: list[Any] = []
        for row in body:
            ids = torch.cat((row.new_tensor(head), row, row.new_tensor(tail)))[None]
            batch = {"input_ids": ids}
            if "attention_mask" in names:
                batch["attention_mask"] = torch.ones_like(ids)
            if "token_type_ids" in names:
                batch["token_type_ids"] = torch.zeros_like(ids)  # one text: one segment
            inputs.append(batch)
        return Calibration(inputs, f"{batches} random-token batches of {length} tokens",
                           "real text")


def calibration_texts(path: Path) -> list[str]:
    """The non-empty lines of the --calib file."""
    if not path.is_file():
        raise UsageError(f"--calib file {path} does not exist (or is not a file): give a text "
                         "file with one calibration text per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--calib file {path} is not UTF-8 text: give a text file with one "
                         "calibration text per line") from None
    texts = [line.strip() for line in text.splitlines() if line.strip()]
    if not texts:
        raise UsageError(f"--calib file {path} has no text: give one calibration sentence or "
                         "paragraph per line (a few dozen is enough)")
    return texts


def load(spec: str) -> LoadedModel:
    path = Path(spec)
    if path.exists():
        return _from_directory(path)
    if FACTORY.match(spec):
        return _from_factory(spec)
    raise UsageError(
        f"MODEL {spec!r} is neither an existing directory nor a factory. Give a transformers "
        "model directory (config.json + safetensors weights, as save_pretrained writes them) "
        "or package.module:function, a callable returning (model, example_inputs)")


def _from_directory(path: Path) -> LoadedModel:
    if not path.is_dir():
        raise UsageError(f"MODEL {path} is a file; give the model's directory (the one holding "
                         "config.json and the safetensors weights)")
    if not (path / "config.json").is_file():
        raise UsageError(f"MODEL directory {path} has no config.json: attnopt reads transformers "
                         "model directories as save_pretrained writes them")
    if not any(path.glob("*.safetensors")):
        raise UsageError(f"MODEL directory {path} has no .safetensors weights (pytorch_model.bin "
                         "is not read: it is a pickle). Re-save the model with "
                         "save_pretrained(directory), which writes safetensors")
    _check_safetensors(path)
    import transformers

    # Weight-loading progress bars and config notices are noise on a command's output.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if is_int4_checkpoint(path):
        model = _int4_model(path)
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            names = getattr(config, "architectures", None) or []
            cls = getattr(transformers, names[0], None) if names else None
            cls = cls or transformers.AutoModel
            # Mismatched shapes are reported by the check below, with the others, not raised.
            model, info = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                              output_loading_info=True,
                                              ignore_mismatched_sizes=True)
        except Exception as e:  # transformers raises many types for a directory it cannot read
            raise UsageError(f"MODEL directory {path} could not be loaded by transformers "
                             f"({describe(e)}). Check that it was written by "
                             "save_pretrained with this transformers version") from None
        _check_weights(path, type(model).__name__, info)
    model.eval()
    tokenizer = _tokenizer(path)
    params = sum(p.numel() for p in model.parameters())
    description = f"{type(model).__name__} from {path} ({params / 1e6:.1f}M parameters)"
    if tokenizer is not None:
        kwargs, verify = (_tokenize(tokenizer, texts) for texts in (EXAMPLE_TEXTS, VERIFY_TEXTS))
    else:
        kwargs, verify = _random_tokens(model, description, 2, 16), _random_tokens(
            model, description, 3, 11, seed=1)
    return LoadedModel(model, (), kwargs, (), verify, description, path, tokenizer)


def is_int4_checkpoint(path: Path) -> bool:
    """An int4 checkpoint `load_quantized(path)` reads: attnopt's own (quantization_config.json
    beside config.json) or another tool's (a quantization_config in config.json)."""
    from attnopt.quantization.checkpoint import CONFIG
    from attnopt.quantization.formats import is_pretrained

    return (path / CONFIG).is_file() or is_pretrained(path)


def holds_int4(model: nn.Module) -> bool:
    """Whether `model` has int4 layers already (a checkpoint's): eager PyTorch then runs the
    int4 kernels too, so --verify checks against attnopt's graph on reference kernels only."""
    from attnopt.quantization import Int4Linear

    return any(isinstance(m, Int4Linear) for m in model.modules())


def _int4_model(path: Path) -> nn.Module:
    """The int4 checkpoint's model, float parts in float32 as every MODEL directory's."""
    from attnopt.quantization import load_quantized

    try:
        return load_quantized(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"MODEL directory {path} is an int4 checkpoint attnopt cannot read: "
                         f"{e}") from None


def _check_safetensors(path: Path) -> None:
    """Every .safetensors file must be whole: its header read, and the file as long as the
    header says (a file cut short by an interrupted copy or download is not)."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as e:  # SafetensorError, or an OSError for a directory or no access
            raise UsageError(f"MODEL directory {path}: {file.name} is not a readable safetensors "
                             f"file ({describe(e)}); it may be truncated by an interrupted copy "
                             "or download: copy it again") from None


def _check_weights(path: Path, cls: str, info: dict[str, Any]) -> None:
    """Refuse a checkpoint that does not give the class built from config.json each of its
    weights exactly: transformers would give the missing ones random values, drop the extra
    ones and re-initialise those of another shape, and attnopt would quantize the result."""
    missing, extra = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    mismatched = sorted(info["mismatched_keys"])
    if not (missing or extra or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"no tensor for {_few(missing)}")
    if mismatched:
        shapes = [f"{name} is {list(saved)} in the file and {list(wanted)} for the config"
                  for name, saved, wanted in mismatched]
        problems.append(_few(shapes))
    if extra:
        problems.append(f"tensors {cls} has no place for: {_few(extra)}")
    raise UsageError(f"MODEL directory {path}: the weights do not fit the {cls} config.json "
                     f"describes ({'; '.join(problems)}); transformers would load it anyway, "
                     "with random values where the weights do not fit. Give the weights and the "
                     "config.json that save_pretrained wrote together")


def _few(items: list[str], shown: int = 3) -> str:
    """The first `shown` items, and how many more."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _tokenizer(path: Path) -> Any:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
        raise UsageError(f"MODEL directory {path} has tokenizer files that transformers could "
                         f"not load ({describe(e)}). Remove them to use "
                         "random token ids, or fix them") from None
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; batches need one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"  # no query row is masked everywhere
    return tokenizer


def _tokenize(tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def _random_tokens(model: nn.Module, description: str, batch: int, length: int,
                   seed: int = 0) -> dict[str, Any]:
    """Token ids of the vocabulary's size and a mask with the last row right-padded."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    accepted = inspect.signature(model.forward).parameters
    if not vocab or "input_ids" not in accepted:
        raise UsageError(
            f"{description} has no tokenizer and does not take input_ids, so attnopt cannot "
            "make example inputs for it. Use package.module:function returning (model, "
            "example_inputs) instead")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    inputs: dict[str, Any] = {"input_ids": ids}
    if "attention_mask" in accepted:
        mask = torch.ones_like(ids)
        mask[-1, length * 2 // 3:] = 0
        inputs["attention_mask"] = mask
    return inputs


def _special_ids(config: Any, tokenizer: Any) -> set[int]:
    """The special token ids the tokenizer and the config name (an id, a list of ids or None)."""
    special = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    for name in SPECIAL_TOKEN_IDS:
        value = getattr(config, name, None)
        special.update(v for v in (value if isinstance(value, list | tuple) else [value])
                       if isinstance(v, int))
    return special


def _draw(vocab: int, special: set[int], shape: tuple[int, ...],
          generator: torch.Generator) -> torch.Tensor:
    """Token ids uniform over range(vocab) less `special`."""
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[[i for i in special if 0 <= i < vocab]] = False
    pool = allowed.nonzero().squeeze(1)
    return pool[torch.randint(len(pool), shape, generator=generator)]


def _frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after every text ([CLS] … [SEP],
    <s> …): real text calibrates with them, and a decoder's first token is where its largest
    activations are. Those of the empty text, a leading BOS or CLS before, the rest after."""
    ids = list(tokenizer("")["input_ids"])
    lead = 1 if ids and ids[0] in (tokenizer.bos_token_id, tokenizer.cls_token_id) else 0
    return ids[:lead], ids[lead:]


def _size(ids: torch.Tensor) -> str:
    """A batch of token ids as the command says it: "16" for one sequence, "2x16" for two."""
    dims = list(ids.shape)
    return "x".join(map(str, dims[1:] if len(dims) > 1 and dims[0] == 1 else dims))


def _from_factory(spec: str) -> LoadedModel:
    module_name, _, attribute = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # as `python -m` does: modules in the current directory
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"MODEL {spec}: module {module_name!r} cannot be imported ({e}). It "
                         "must be importable from the current directory or the environment"
                         ) from None
    except Exception as e:  # the module's own code failed: a SyntaxError, a NameError, ...
        raise UsageError(f"MODEL {spec}: importing module {module_name!r} failed "
                         f"({_where(e)}); fix the module") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"MODEL {spec}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"MODEL {spec}: {attribute} is a {type(target).__name__}, not a "
                         "callable returning (model, example_inputs)")
    try:
        made = target()
    except Exception as e:
        raise UsageError(f"MODEL {spec}: the factory raised {_where(e)}; fix it so that it "
                         "returns (model, example_inputs)") from None
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module)):
        raise UsageError(f"MODEL {spec}: the factory returned {_kind(made)}; it must return "
                         "a pair (model, example_inputs), model an nn.Module")
    model, inputs = made
    if isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, tuple | list):
        args, kwargs = tuple(inputs), {}
    elif isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    else:
        raise UsageError(f"MODEL {spec}: the example inputs are a {type(inputs).__name__}; give "
                         "a tuple of positional arguments, a dict of keyword arguments or a "
                         "tensor")
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    description = f"{type(model).__name__} from {spec} ({params / 1e6:.1f}M parameters)"
    return LoadedModel(model, args, kwargs, args, kwargs, description)


def _where(error: BaseException) -> str:
    """`Type: message` (`describe`) and the file and line that raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.filename:
        return f"{describe(error)} at {error.filename}:{error.lineno}"
    return describe(error) + (f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else "")


def _kind(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a value of type {type(value).__name__}"

