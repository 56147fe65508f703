"""The `attnopt` subcommands that work offline on a model: quantize, export, diff.

Each module holds one command's `run(args) -> exit status`; `compiler/cli.py` parses the
arguments. The CLI prints a `UsageError` (bad input) and exits with status 2, a
`CommandError` (the input was fine but a step failed) with status 1.
"""


class UsageError(Exception):
    """Bad input to a command. The message names the problem and the fix, in one paragraph."""


class CommandError(Exception):
    """A step of a command failed on valid input; the message says which and what to try."""


def describe(error: BaseException) -> str:
    """`Type: first line` of the innermost cause: exporters wrap the error that says what went
    wrong in several layers of their own."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
