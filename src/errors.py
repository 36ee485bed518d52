"""User-facing errors: one clear line and exit code 2 instead of a traceback."""

import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (file, row, flag); the message says what and how to fix it."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a command's main(); a UserError prints `error: ...` on stderr and exits 2.

    With `--debug` on the command line the traceback is kept.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        main(args)
    except UserError as error:
        if "--debug" in args:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
