"""The ``replica-router`` command line.

Each sub-command lives in its own module exposing ``register(subparsers)``; the
parser it adds sets ``func`` to a callable taking the parsed namespace and
returning the exit code. Bad arguments exit with code 2 and one clear line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

_COMMAND_MODULES = ("sandbox", "demo", "status", "dashboard")


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
    except KeyboardInterrupt:
        return 130
