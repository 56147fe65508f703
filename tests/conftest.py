"""Without a GPU, Triton kernels run under the interpreter on CPU tensors: set it before
anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import attnopt

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _fresh_state():
    torch._dynamo.reset()
    attnopt.clear_reports()
    yield


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: each keeps to one thread, or two workers on two
    # cores would each start a thread per core and fight over them.
    torch.set_num_threads(1)
