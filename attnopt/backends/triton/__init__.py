"""Triton kernels, one file per kernel family, each reachable only through its `attnopt::` op."""

from __future__ import annotations

import os

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # triton is a Linux-only dependency
    HAVE_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
