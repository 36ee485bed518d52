"""User-facing errors: one clear line and exit code 2 instead of a traceback."""

import argparse
import difflib
import os
import signal
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


def unknown_flags(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """The flags in `args` that `parser` does not know (`--flag=value` counts as --flag), in order."""
    known = parser._option_string_actions  # argparse's own table of option strings
    unknown = []
    for arg in args:
        if arg == "--":
            break
        flag = arg.split("=", 1)[0]
        if len(flag) < 2 or flag[0] not in parser.prefix_chars or flag in known:
            continue
        if parser._negative_number_matcher.match(arg) and not parser._has_negative_number_optionals:
            continue  # a negative number is a value
        if parser.allow_abbrev and flag.startswith("--") and any(option.startswith(flag) for option in known):
            continue
        unknown.append(flag)
    return unknown


def unknown_flags_message(parser: argparse.ArgumentParser, flags: list[str]) -> str:
    """`unrecognized argument --aproach (did you mean --approach?)`, for each flag that has a close match."""
    options = [option for option in parser._option_string_actions if option.startswith("--")]
    named = []
    for flag in flags:
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
        named.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    return f"unrecognized argument{'s' if len(flags) > 1 else ''} {', '.join(named)}"


def _usage_error(parser: argparse.ArgumentParser, message: str) -> None:
    """argparse's error() as one line (instead of the usage block and the message). An unknown flag is named
    first, with the closest known flag: it is often why a required flag seems missing (`--aproach`)."""
    flags = unknown_flags(parser, getattr(parser, "_cli_args", []))
    if flags:
        message = unknown_flags_message(parser, flags)
    parser.exit(2, f"error: {message}; see {parser.prog} --help\n")


@contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """While active, every argparse parser reports a bad flag or value as one `error:` line (exit code 2)."""
    original_error, original_parse = argparse.ArgumentParser.error, argparse.ArgumentParser.parse_known_args

    def parse_known_args(parser, args=None, namespace=None):
        parser._cli_args = list(sys.argv[1:] if args is None else args)  # for _usage_error
        return original_parse(parser, args, namespace)

    argparse.ArgumentParser.error = _usage_error
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original_error
        argparse.ArgumentParser.parse_known_args = original_parse


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a command's main(); a user mistake prints one `error: ...` line on stderr and exits 2.

    User mistakes: a UserError, a bad flag or flag value (argparse), and an OSError about a named file
    (an output path inside a file, a directory given as a file, a permission problem). With `--debug`
    on the command line the traceback is kept. When the reader of stdout goes away (`| head`), the command
    ends quietly with the exit status of a process killed by SIGPIPE (141), as other command-line tools do.
    """
    args = sys.argv[1:] if argv is None else argv
    try:
        with one_line_usage_errors():
            main(args)
    except BrokenPipeError:
        # stdout now points at nothing: the interpreter's final flush must not fail (and print) again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(128 + signal.SIGPIPE) from None
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
