"""Flag types and helpers shared by the subcommands: finite numbers, LR pairs, a renamed
flag's refusal or deprecation, config overrides taken from the flags named like a dataclass's
fields, and each option's default shown in ``--help`` from those same dataclasses."""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import fields
from typing import Any

from mammo_ray import stores
from mammo_ray.config import LabelMap

logger = logging.getLogger("mammo_ray")


#: flags whose ``name://`` values are not files (a Ray address may be ``ray://host:port``)
_NOT_PATHS = ("address",)


def check_path_schemes(args: argparse.Namespace) -> None:
    """Refuse, before any work, a path or URI flag whose scheme is not supported.

    Raises:
        ValueError: naming the value and the supported schemes.
    """
    for name, value in vars(args).items():
        if name in _NOT_PATHS:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str):
                stores.scheme_of(item)


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or inf (a NaN passes every range check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
    return value


def lr_pair(text: str) -> tuple[float, float]:
    parts = text.split(":")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: use BASE:MAX, e.g. 1e-4:1e-3")
    return finite_float(parts[0]), finite_float(parts[1])


def config_overrides(cls, args, **extra) -> dict:
    """The flags named like ``cls``'s fields (None: not given, so the YAML or the class
    default applies): no hand-kept key lists, and every default lives in the dataclass."""
    over = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    over.update(extra)
    return over


class Renamed(argparse.Action):
    """A flag that was renamed: refused with the new spelling, never silently reinterpreted."""

    def __init__(self, option_strings, dest, hint: str = "", **kw):
        self.hint = hint
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} {values or ''}: {self.hint}".replace("  ", " "))


def add_label_options(p: argparse.ArgumentParser) -> None:
    """``--positive`` / ``--negative``: the label vocabulary (``labels:`` in the YAML), comma lists."""
    d = LabelMap()
    p.add_argument("--positive", metavar="WORDS", help="comma list of the label words (and class folder names) "
                   f"that mean malignant; default: {','.join(d.positive)}")
    p.add_argument("--negative", metavar="WORDS", help="comma list of the label words (and class folder names) "
                   f"that mean not malignant; default: {','.join(d.negative)} (BI-RADS needs your mapping, "
                   "e.g. --negative 1,2,3 --positive 4,5,6)")


def label_overrides(args) -> dict | None:
    """The ``labels`` override the flags give (None: neither given, the YAML or default applies)."""
    over = {k: getattr(args, k, None) for k in ("positive", "negative")}
    over = {k: v for k, v in over.items() if v is not None}
    return over or None


class Deprecated(argparse.Action):
    """An old spelling of a renamed option: still works, with a warning naming the new one."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        logger.warning("%s is deprecated: use %s", option_string, self.new)
        setattr(namespace, self.dest, values)


def format_default(value: Any) -> str:
    """A default as the command line spells it: ``none``, ``on``/``off``, ``1e-04:0.001`` pairs,
    space-separated lists, ``%g`` floats."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        if not value:
            return "none"
        if all(isinstance(v, (tuple, list)) and len(v) == 2 for v in value):  # LR bound pairs
            return " ".join(f"{a:g}:{b:g}" for a, b in value)
        return " ".join(format_default(v) for v in value)
    return str(value)


def option_default(action: argparse.Action, configs: tuple[Any, ...]) -> tuple[bool, Any]:
    """(found, value): the default the code uses for ``action``. A flag's default is None
    ("not given": the YAML, then the dataclass applies), so it is read from the first config
    object with a field of the flag's dest; otherwise argparse's own default."""
    for cfg in configs:
        if action.dest in {f.name for f in fields(cfg)}:
            return True, getattr(cfg, action.dest)
    if action.default not in (None, argparse.SUPPRESS):
        return True, action.default
    return False, None


def flag_state(action: argparse.Action, value: Any) -> Any:
    """A flag that takes no value shows whether its effect is in force by default (on/off):
    ``--no-augment`` (store_false) is off when augmentation is on; ``--no-tta`` (store_const
    ``none``) is on when the default already is ``none``."""
    if isinstance(action, argparse._StoreFalseAction):
        return not value if isinstance(value, bool) else value
    if isinstance(action, argparse._StoreConstAction) and not isinstance(action, argparse._StoreTrueAction):
        return value == action.const
    return value


def shows_default(action: argparse.Action) -> bool:
    """Whether ``--help`` should name this option's default: not help/version, not hidden,
    not a positional or required option."""
    return bool(action.option_strings) and action.help != argparse.SUPPRESS and not action.required and \
        not isinstance(action, (argparse._HelpAction, argparse._VersionAction))


def add_defaults_to_help(parser: argparse.ArgumentParser, *configs: Any) -> None:
    """Append ``(default: X)`` to every option's help, X taken from ``configs`` (the stage's
    dataclass instances; see :func:`option_default`), so the help cannot drift from the code.
    An option whose help already says ``default:`` in words (``$RAY_ADDRESS``...) is left as it is;
    one with no default at all says ``none``."""
    chosen = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in parser._actions:
        if not shows_default(action) or action in chosen or "default:" in (action.help or ""):
            continue
        _, value = option_default(action, configs)
        if action.nargs == 0:
            value = flag_state(action, value)
        text = f"(default: {format_default(value)})".replace("%", "%%")
        action.help = f"{action.help} {text}" if action.help else text
