"""User-facing errors: one clear line and exit code 2 instead of a traceback."""

import argparse
import sys
from contextlib import contextmanager
from typing import Callable, Iterator


class UserError(Exception):
    """A mistake in the user's input (file, row, flag); the message says what and how to fix it."""


def brief(error: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut to `limit` characters: library errors inside a one-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _usage_error(parser: argparse.ArgumentParser, message: str) -> None:
    """argparse's error() as one line (instead of the usage block and the message)."""
    parser.exit(2, f"error: {message}; see {parser.prog} --help\n")


@contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """While active, every argparse parser reports a bad flag or value as one `error:` line (exit code 2)."""
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _usage_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a command's main(); a user mistake prints one `error: ...` line on stderr and exits 2.

    User mistakes: a UserError, a bad flag or flag value (argparse), and an OSError about a named file
    (an output path inside a file, a directory given as a file, a permission problem). With `--debug`
    on the command line the traceback is kept.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        with one_line_usage_errors():
            main(args)
    except UserError as error:
        if "--debug" in args:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        if "--debug" in args or error.filename is None:
            raise
        print(f"error: {error.filename}: {error.strerror or brief(error)}; check the path "
              "(an existing directory for outputs, a readable file for inputs)", file=sys.stderr)
        raise SystemExit(2) from None
