"""Writing a command's output so that OUT is never half-written.

Everything is written into a temporary directory beside OUT (same filesystem, so the final move
is a rename) and moved into place only when the command succeeded; on failure, and on SIGINT or
SIGTERM (`compiler/cli.py` turns both into exceptions), the temporary directory is removed and
OUT is as it was. The steps that must not be cut in half — creating and removing the temporary
directory, the renames — run with those signals held back until they are done. An existing OUT
is refused unless `force`, and OUT's directory is checked to be writable before any work.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from attnopt.commands import UsageError

INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def check_target(out: Path, force: bool, *, what: str,
                 kind: Literal["file", "directory"] = "file") -> None:
    """Refuse before any work is done: an existing OUT without `force`, an existing OUT of the
    other kind (a directory where a file is written, or the reverse: --force replaces like with
    like), a parent that is missing, not a directory or not writable."""
    if out.is_dir() != (kind == "directory") and out.exists():
        other = "directory" if out.is_dir() else "file"
        raise UsageError(f"{out} is a {other}, and {what} names the {kind} to write; choose "
                         f"another {what}")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it, or choose another "
                         f"{what}")
    parent = out.parent
    if not parent.exists():
        raise UsageError(f"cannot write {out}: directory {parent} does not exist; create it "
                         "first")
    if not parent.is_dir():
        raise UsageError(f"cannot write {out}: {parent} is a file, not a directory; choose "
                         f"another {what}")
    try:  # os.access says yes to root whatever the filesystem thinks: try it
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=parent))
    except OSError as e:
        raise UsageError(f"cannot write {out}: directory {parent} is not writable "
                         f"({e.strerror}); choose another {what} or change the directory's "
                         "permissions") from None


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (then they are delivered)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh temporary directory beside `out`; removed whatever happens. Fill it, then call
    `publish` (inside the block) to move the result into place."""
    tmp = None
    try:
        with signals_held():  # a signal then lands after `tmp` is set: `finally` removes it
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial",
                                        dir=out.parent))
        yield tmp
    finally:
        if tmp is not None:
            with signals_held():
                shutil.rmtree(tmp, ignore_errors=True)


def publish(source: Path, out: Path) -> None:
    """Move `source` (a staged file or directory) to `out`. What `out` held is first moved
    beside `source`, where the staging directory's removal deletes it, and moved back if the
    rename fails: `out` is the old or the new, never neither."""
    replaced = source.with_name(source.name + ".replaced")
    with signals_held():
        if out.exists() or out.is_symlink():
            out.rename(replaced)
        try:
            source.rename(out)
        except OSError:
            if replaced.exists() or replaced.is_symlink():
                replaced.rename(out)
            raise
