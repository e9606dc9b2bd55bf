"""The input normalisation a model is trained and run with: it belongs to the weights.

Pretrained weights expect their inputs scaled as they were trained (torchvision's
``weights.transforms()``, timm's ``pretrained_cfg``): each backbone declares it
(:attr:`~mammo_ray.models.registry.BackboneSpec.weights_norm`). A random init has no such
expectation, so the data spec's ``mean``/``std`` (or :data:`DEFAULT`) apply. A data spec that
sets ``mean``/``std`` overrides the weights' values, with a warning naming both.

Training records what it applied in the checkpoint (``normalization: {mean, std, source}``);
evaluate, score and explain apply exactly that. A checkpoint written before the field existed
reads as it ran then: the mean/std of its stored spec.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any
from collections.abc import Mapping

from mammo_ray.config import PreprocessSpec, TrainConfig
from mammo_ray.config.data import MEAN_RANGE, STD_RANGE

logger = logging.getLogger(__name__)

#: where an applied normalisation came from: the starting weights, the data spec's explicit
#: mean/std, or the default of a random init whose spec sets none
SOURCES = ("weights", "spec", "default")
#: (mean, std) of a random init when the data spec sets none: the spec's default before
#: normalisation followed the weights, so random-init runs train as they did
DEFAULT = (0.5, 0.25)


@dataclass(frozen=True)
class Normalization:
    """``(x - mean) / std`` on gray pixels in [0, 1], and where the values came from.

    Raises:
        ValueError: a value that is not a finite number in its range, or an unknown source
            (one line naming the field).
    """

    mean: float
    std: float
    source: str = "default"

    def __post_init__(self) -> None:
        for name, (lo, hi) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                raise ValueError(f"{name}={value!r}: must be a finite number in [{lo:g}, {hi:g}]")
            object.__setattr__(self, name, float(value))
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}: use one of {', '.join(SOURCES)}")

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``normalization`` entry (plain types)."""
        return asdict(self)

    def describe(self) -> str:
        return f"mean {self.mean:g}, std {self.std:g} (from the {self.source})"


def weights_normalization(cfg: TrainConfig) -> tuple[float, float] | None:
    """The (mean, std) the starting weights of a training run expect, or None for a random init.

    A ``weights`` file is a state dict of the backbone's 3-channel form, in practice its
    ImageNet weights read from elsewhere (the documented offline route), so it is taken to
    expect what the backbone's ImageNet weights do.
    """
    from mammo_ray.models.registry import get_backbone  # deferred: registry imports torch

    if not cfg.pretrained and not cfg.weights:
        return None
    return get_backbone(cfg.backbone).weights_norm


def resolve_normalization(cfg: TrainConfig, spec: PreprocessSpec) -> Normalization:
    """What a training run applies: the weights' normalisation, unless the data spec sets
    ``mean``/``std`` (each overrides its own value, with a warning naming both when it differs);
    a random init: the spec's values, else :data:`DEFAULT`."""
    norm = _resolve(cfg, spec)
    logger.info("input normalisation: %s", norm.describe())
    return norm


def _resolve(cfg: TrainConfig, spec: PreprocessSpec) -> Normalization:
    expected = weights_normalization(cfg)
    given = (spec.mean, spec.std)
    if expected is None:
        if given == (None, None):
            return Normalization(*DEFAULT, source="default")
        return Normalization(given[0] if given[0] is not None else DEFAULT[0],
                             given[1] if given[1] is not None else DEFAULT[1], source="spec")
    if given == (None, None):
        return Normalization(*expected, source="weights")
    applied = tuple(g if g is not None else e for g, e in zip(given, expected, strict=True))
    if any(abs(a - e) > 1e-6 for a, e in zip(applied, expected, strict=True)):
        what = "ImageNet weights" if cfg.pretrained else f"weights {cfg.weights}"
        logger.warning("the data spec's normalisation (mean %g, std %g) overrides the one the %s of %s expect "
                       "(mean %g, std %g): re-preprocess without --mean/--std to follow the weights",
                       applied[0], applied[1], what, cfg.backbone, expected[0], expected[1])
        return Normalization(*applied, source="spec")
    return Normalization(*expected, source="weights")


def checkpoint_normalization(state: Mapping[str, Any]) -> Normalization:
    """The normalisation a checkpoint was trained with: its ``normalization`` entry, or for a
    checkpoint written before that entry existed, its spec's mean/std (as it ran then).

    Raises:
        ValueError: an entry that is not a mapping of finite, in-range values (the caller adds
            the checkpoint's name).
    """
    entry = state.get("normalization")
    if entry is None:
        spec = state.get("spec") or {}
        mean, std = spec.get("mean"), spec.get("std")
        return Normalization(DEFAULT[0] if mean is None else mean, DEFAULT[1] if std is None else std,
                             source="spec" if (mean, std) != (None, None) else "default")
    if not isinstance(entry, Mapping) or set(entry) - {"mean", "std", "source"} or not {"mean", "std"} <= set(entry):
        raise ValueError(f"normalization={entry!r}: must be a mapping of mean, std and source")
    try:
        return Normalization(entry["mean"], entry["std"], entry.get("source", "weights"))
    except ValueError as err:
        raise ValueError(f"normalization.{err}") from None
