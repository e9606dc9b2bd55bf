"""The CLI reference (``docs/cli.md``), generated from the argparse parsers as they are.

    python -m mammo_ray.cli.reference > docs/cli.md

Walks :func:`mammo_ray.cli.get_args_parser` and its subcommands: for each, its help line, its
usage and every option with its help, choices and default. Written from the parsers rather than
by hand so it can never drift from ``--help``; ``tests/test_docs.py`` regenerates it and fails
when the committed file differs.
"""
from __future__ import annotations

import argparse
import sys

from mammo_ray.cli import get_args_parser

__all__ = ["render_reference"]

#: a fixed width, so the usage lines do not follow the terminal that generated the file
WIDTH = 100

HEADER = """# CLI reference

Generated from the parsers by `python -m mammo_ray.cli.reference > docs/cli.md`;
`tests/test_docs.py` fails when this file is stale. Every subcommand also accepts the
[console options](#console-options), before or after its name. A default shown as "-" is
not set by the flag: the stage's configuration (the `--config` YAML, else its built-in
default, which the option's help names) applies.
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """Each subcommand's parser and its one-line help, in the order they were added."""
    helps: dict[str, str] = {}
    choices: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:  # argparse keeps its actions private; no public walk exists
        if isinstance(action, argparse._SubParsersAction):
            choices.update(action.choices)
            helps.update({a.dest: a.help or "" for a in action._choices_actions})
    return {name: (sub, helps.get(name, "")) for name, sub in choices.items()}


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = parser.formatter_class(prog=parser.prog, width=WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _expand(text: str, action: argparse.Action, prog: str) -> str:
    """``%(default)s``-style placeholders filled as argparse's own help does."""
    if "%" not in text:
        return text
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return text % params


def _default(action: argparse.Action) -> str:
    value = action.default
    if isinstance(action, argparse._StoreTrueAction) and value in (None, False):
        return "off"  # None: not given, the same as off for a switch
    if value is None or value is False or value is argparse.SUPPRESS or action.required:
        return "-"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "(none)"
    return str(value)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _option_rows(parser: argparse.ArgumentParser, skip: set[str]) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.help is argparse.SUPPRESS or skip & set(action.option_strings):
            continue
        name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.metavar or action.dest}`"
        if action.required or not action.option_strings:
            name += " (required)"
        text = _expand(action.help or "", action, parser.prog)
        if action.choices is not None:
            choices = f"choices: {', '.join(map(str, action.choices))}"
            text = f"{text.rstrip('.')} ({choices})" if text else choices
        rows.append(f"| {name} | {_cell(text)} | {_cell(_default(action))} |")
    return rows


def _section(title: str, parser: argparse.ArgumentParser, help_line: str, skip: set[str]) -> list[str]:
    lines = [f"## {title}", ""]
    if help_line:
        lines += [help_line[0].upper() + help_line[1:] + ".", ""]
    lines += ["```", _usage(parser), "```", ""]
    rows = _option_rows(parser, skip)
    if rows:
        lines += ["| option | help | default |", "|---|---|---|", *rows, ""]
    return lines


def render_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown reference of ``parser`` (default: ``mammo-ray``'s) and its subcommands.

    Args:
        parser: the top-level parser; its subcommands are found through its subparsers action.

    Returns:
        The text of ``docs/cli.md``.
    """
    parser = parser or get_args_parser()
    console = {o for a in parser._actions for o in a.option_strings if not isinstance(a, argparse._HelpAction)}
    lines = [HEADER, "## Console options", "", "```", _usage(parser), "```", ""]
    lines += ["| option | help | default |", "|---|---|---|", *_option_rows(parser, set()), ""]
    subs = _subparsers(parser)
    # a heading's anchor, as Markdown renderers make it: "mammo-ray lr-find" -> "mammo-ray-lr-find"
    lines += ["Subcommands: " + ", ".join(f"[`{n}`](#{sub.prog.lower().replace(' ', '-')})"
                                        for n, (sub, _) in subs.items()) + ".", ""]
    for sub, help_line in subs.values():
        lines += _section(sub.prog, sub, help_line, console)
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render_reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
