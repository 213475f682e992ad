"""The ``replica-router`` command line.

Each sub-command lives in its own module exposing ``register(subparsers)``; the
parser it adds sets ``func`` to a callable taking the parsed namespace and
returning the exit code. Bad arguments exit with code 2 and one clear line; so does
a :class:`~replica_router.ConfigurationError` from a command, and any other error
of ours exits 1 with one line.
When the reader of our output goes away (``status --watch --json | head``), we
stop quietly with code 141, as a process killed by SIGPIPE would.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence

from ..errors import ConfigurationError, Error

__all__ = ["main"]

_COMMAND_MODULES = ("sandbox", "demo", "status", "dashboard")
_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE
_REST_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]+\.)?([^`]+)`")  # :class:`~a.b.C` -> C


def description(docstring: str | None) -> str | None:
    """A module docstring's first line as ``--help`` text: plain, without reST markup."""
    if not docstring:
        return None
    line = docstring.strip().splitlines()[0]
    return _REST_ROLE.sub(r"\1", line).replace("``", "")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def seconds_between(low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type``: a number of seconds from ``low`` to ``high``."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low:g} to {high:g} seconds, got {text}")
        return value

    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="replica-router",
        description="Route PostgreSQL reads to replicas and writes to the primary, safely.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(f"replica_router.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        return _fail(args, exc, 2)
    except Error as exc:
        return _fail(args, exc, 1)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Python would report the failed flush of stdout at exit: point it at nothing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return _BROKEN_PIPE


def _fail(args: argparse.Namespace, exc: Error, code: int) -> int:
    """One line on stderr naming the command (``replica-router sandbox up: error: ...``)."""
    words = ["replica-router", args.command, getattr(args, "action", None)]
    sys.stderr.write(f"{' '.join(w for w in words if w)}: error: {exc}\n")
    return code
