"""Flag types and helpers shared by the subcommands: finite numbers, LR pairs, a renamed
flag's refusal, and config overrides taken from the flags named like a dataclass's fields."""
from __future__ import annotations

import argparse
import math
from dataclasses import fields

from mammo_ray.config import LabelMap

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
