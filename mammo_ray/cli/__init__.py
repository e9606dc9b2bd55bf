"""``mammo-ray`` command line: one subcommand per stage.

Library errors (``ValueError``) become a one-line ``mammo-ray: error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from mammo_ray.cli.commands import COMMANDS

__all__ = ["get_args_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump): 'mammo-ray preprocess: error: ...'."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def get_args_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mammo-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"mammo-ray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # The boundary: every failure is one line (a traceback only behind --debug).
        # Bad input (ValueError, a missing file) exits 2; anything else exits 1.
        if args.debug:
            raise
        expected = isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                    PermissionError))
        text = (str(exc).strip().splitlines() or [""])[0]
        plain = expected or getattr(exc, "user_facing", False)
        what = text if plain else f"{type(exc).__name__}: {text} (run with --debug for the traceback)"
        print(f"mammo-ray {args.command}: error: {what}", file=sys.stderr)
        return 2 if expected else 1
