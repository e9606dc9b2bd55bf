"""mammo-ray command line: one subcommand per stage.

Library errors (``ValueError``) become a one-line ``mammo-ray: error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from mammo_ray import __version__
from mammo_ray.cli.commands import COMMANDS
from mammo_ray.cli.options import check_path_schemes
from mammo_ray.console import LOG_LEVELS, route_native_stderr, setup_logging

__all__ = ["get_args_parser", "main"]

#: the console's level when neither --log-level nor -v/-q is given (the flags' own default is
#: "not given", so a subcommand's flag overrides the top level's only when named)
DEFAULT_LEVEL = "INFO"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump): 'mammo-ray preprocess: error: ...'."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_with_choices(self, message)}\n")


def _with_choices(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's "argument --tta: expected one argument" names the values a bare option lacks."""
    head, _, rest = message.partition(": ")
    action = parser._option_string_actions.get(head.split()[-1].split("/")[0]) if head.startswith("argument ") else None
    if rest.startswith("expected") and action is not None and action.choices:
        return f"{message}: one of {', '.join(map(str, action.choices))}"
    return message


def _console_args(p: argparse.ArgumentParser, default) -> None:
    """The console flags, the same on ``mammo-ray`` and on every subcommand (either place works)."""
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="DEBUG on the console (default: off)")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="warnings and the results only on the console (the log file keeps everything; default: off)")
    p.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, default=default,
                   help=f"console level of mammo-ray's messages (default: {DEFAULT_LEVEL})")
    p.add_argument("--log-dir", default=default, help="folder of the log file (default: $MAMMO_RAY_LOG_DIR, else "
                                                      "~/.local/state/mammo-ray/logs)")
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the traceback of a failure (default: off)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mammo-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _console_args(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    for p in sub.choices.values():  # SUPPRESS: a subcommand's flag overrides the top level's only when given
        _console_args(p, argparse.SUPPRESS)
    return parser


@contextlib.contextmanager
def _held_out(args: argparse.Namespace):
    """Every stage's ``--out``: locked for the run's whole life, then the one output rule
    (refused when it holds a run, unless --overwrite / --resume) before the stage starts."""
    out = getattr(args, "out", None)
    if not out:
        yield
        return
    from mammo_ray.locks import hold_out
    from mammo_ray.outputs import abandon_out, check_out_location, claim_out

    check_out_location(out)  # a file: refused before the lock would need a folder
    with hold_out(out, args.command):
        claim_out(out, args.command, overwrite=bool(getattr(args, "overwrite", False)),
                  resume=bool(getattr(args, "resume", None)))
        try:
            yield
        except BaseException:  # a run refused after its start wrote nothing: --out as it was
            abandon_out(out, args.command)
            raise


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    level = "DEBUG" if args.verbose else (args.log_level or DEFAULT_LEVEL)
    args.log_file = setup_logging(args.command, level=level, quiet=args.quiet, log_dir=args.log_dir or None)
    if argv is None:  # the command line itself: Ray's native stderr lines go to the log file
        route_native_stderr(args.log_file)
    try:
        check_path_schemes(args)  # up front: before the --out lock and before a stage lists anything
        with _held_out(args):
            code = COMMANDS[args.command][1](args)
        if not args.quiet:  # last, so an error stays the only line of a failed run
            print(f"full log: {args.log_file}", file=sys.stderr)
        return code
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
        logging.getLogger("mammo_ray").debug("%s failed", args.command, exc_info=True)  # the traceback: log file only
        what = text if plain else (f"{type(exc).__name__}: {text} (run with --debug for the traceback; "
                                   f"full log: {args.log_file})")
        print(f"mammo-ray {args.command}: error: {what}", file=sys.stderr)
        return 2 if expected else 1
