"""The label vocabulary: which words of a manifest's ``label`` column (and which class folder
names) mean the positive class (1) and which the negative class (0).

Screening archives write labels their own way: ``normal``, ``benign``, ``malignant``, ``cancer
0/1`` or BI-RADS categories. One :class:`LabelMap` says how to read them, for every stage that
reads labels (preprocess, evaluate's raw external sets, score and explain); the CLI's
``--positive`` / ``--negative`` flags and a ``labels:`` mapping in the YAML configs set it, and
the outputs record it (``preprocess.yaml``, ``summary.json``, ``score.yaml``, ``explain.yaml``,
``metrics.json``).

The default reads the words whose meaning is not in doubt: ``benign``, ``normal`` and ``0``
negative, ``malignant``, ``cancer`` and ``1`` positive. BI-RADS numbers are left to the user:
category 1 is a negative screen, so a default could not read ``1`` both ways.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

#: the default vocabulary (class 0, class 1)
DEFAULT_NEGATIVE = ("benign", "normal", "0")
DEFAULT_POSITIVE = ("malignant", "cancer", "1")
BIRADS_HINT = ("BI-RADS categories need your mapping, e.g. --negative 1,2,3 --positive 4,5,6 "
               "(or labels: {negative: [1, 2, 3], positive: [4, 5, 6]} in the YAML)")


def _words(value: Any, name: str) -> tuple[str, ...]:
    """A comma string or a list of words (YAML may give numbers) as lower-case words."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    words = tuple(str(w).strip().lower() for w in items)
    if not words or any(not w for w in words):
        raise ValueError(f"labels {name}={value!r}: give one or more non-empty words, e.g. "
                         f"{','.join(DEFAULT_NEGATIVE if name == 'negative' else DEFAULT_POSITIVE)}")
    return tuple(dict.fromkeys(words))  # order kept, repeats dropped


@dataclass(frozen=True)
class LabelMap:
    """How label words map to classes: ``negative`` words are 0, ``positive`` words are 1
    (compared case-insensitively, spaces trimmed). A word in both lists is refused."""

    positive: tuple[str, ...] = DEFAULT_POSITIVE
    negative: tuple[str, ...] = DEFAULT_NEGATIVE

    def __post_init__(self) -> None:
        pos, neg = _words(self.positive, "positive"), _words(self.negative, "negative")
        both = [w for w in pos if w in neg]
        if both:
            raise ValueError(f"labels: {', '.join(both)} is both positive ({', '.join(pos)}) and negative "
                             f"({', '.join(neg)}): give each word one class")
        object.__setattr__(self, "positive", pos)
        object.__setattr__(self, "negative", neg)

    def label_of(self, value: Any) -> int | None:
        """0, 1, or None for a word outside the vocabulary."""
        word = str(value).strip().lower()
        return 1 if word in self.positive else 0 if word in self.negative else None

    @property
    def class_folders(self) -> tuple[str, ...]:
        """The words that name class folders: the vocabulary less its numbers (a DICOM tree's
        numbered folders are not classes)."""
        return tuple(w for w in (*self.negative, *self.positive) if not w.isdigit())

    def describe(self) -> str:
        """``negative benign, normal, 0; positive malignant, cancer, 1``."""
        return f"negative {', '.join(self.negative)}; positive {', '.join(self.positive)}"

    def unknown(self, value: str) -> str:
        """The reason for a label outside the vocabulary: the allowed words, the flags that map
        more, and for a number the BI-RADS hint."""
        hint = f"; {BIRADS_HINT}" if value.strip().isdigit() else ""
        return (f"label {value!r} is not in the label vocabulary ({self.describe()}): map it with --negative/"
                f"--positive or labels: in the config{hint}")

    def as_dict(self) -> dict[str, list[str]]:
        """The mapping as the outputs record it."""
        return {"negative": list(self.negative), "positive": list(self.positive)}


def as_label_map(value: Any) -> LabelMap:
    """A ``LabelMap`` from itself, a mapping (``{positive: [...], negative: [...]}``, YAML or
    flags; a missing key keeps its default) or None (the default).

    Raises:
        ValueError: another shape, an unknown key, or a word in both classes.
    """
    if value is None:
        return LabelMap()
    if isinstance(value, LabelMap):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"labels={value!r}: use a mapping such as {{negative: [benign, normal], positive: [malignant]}}")
    unknown = sorted(set(value) - {"positive", "negative"})
    if unknown:
        raise ValueError(f"labels: unknown key(s) {', '.join(map(str, unknown))}: allowed keys are positive, negative")
    return LabelMap(**{k: v for k, v in value.items() if v is not None})
