"""Where the commands print: a rich Console that fits a terminal, and does not wrap when its
output is piped or redirected.

rich lays a non-terminal out at 80 columns, so `attnopt diff ... | less` or `> log.txt` got
tables folded over several lines and layer names split mid-word. Piped, the console is as wide
as the longest line instead (tables at their natural width, one row per line), unless COLUMNS
names a width, which is then kept as rich keeps it.
"""

from __future__ import annotations

import os

from rich.console import Console

# Wide enough that no table or message wraps; rich needs some finite width to lay tables out.
UNWRAPPED = 100_000


def console(*, stderr: bool = False) -> Console:
    """The Console for stdout (or stderr)."""
    plain = Console(stderr=stderr)
    if plain.is_terminal or os.environ.get("COLUMNS"):
        return plain
    return Console(stderr=stderr, width=UNWRAPPED, soft_wrap=True)
