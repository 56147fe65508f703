"""Writing a command's output so that OUT is never half-written.

Everything is written into a temporary directory beside OUT (same filesystem, so the final move
is a rename) and moved into place only when the command succeeded; on failure the temporary
directory is removed and OUT is as it was. An existing OUT is refused unless `force`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attnopt.commands import UsageError


def check_target(out: Path, force: bool, *, what: str) -> None:
    """Refuse before any work is done: an existing OUT without `force`, a missing parent."""
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it, or choose another "
                         f"{what}")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: directory {out.parent} does not exist; create it "
                         "first")


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh temporary directory beside `out`; removed whatever happens. Fill it, then call
    `publish` (inside the block) to move the result into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(source: Path, out: Path) -> None:
    """Move `source` (a staged file or directory) to `out`, replacing what is there."""
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()
    source.rename(out)
