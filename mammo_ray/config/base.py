"""The configuration layer's common parts: the hard caps, label and split names, validation
helpers, and mapping/YAML loading shared by every stage's dataclass."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar
from collections.abc import Mapping

import yaml

T = TypeVar("T")

#: Hard caps, whatever the memory: no mammography detector exceeds 8192 pixels a side, and
#: a larger value (from a flag, a YAML file or a checkpoint's stored spec) is a typo or hostile.
MAX_SIDE = 8192
MAX_BATCH = 4096


def check_finite(obj: Any) -> None:
    """Refuse NaN and inf in any float field (or tuple of floats) of a config dataclass: a NaN
    compares False with every bound, so range checks alone would let it through."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "float" in str(f.type) and isinstance(value, str):
            # YAML reads `nan` (no dot) as a string: a float field takes numbers only, as numbers
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{f.name}={value!r}: must be a number") from None
            object.__setattr__(obj, f.name, value)
        items = value if isinstance(value, (tuple, list)) else (value,)
        for v in items:
            for x in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(x, float) and not math.isfinite(x):
                    raise ValueError(f"{f.name}={value!r}: must be a finite number")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(allowed)}")


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, **overrides: Any) -> T:
    """Build a config dataclass from a mapping plus overrides (``None`` overrides are ignored).

    Raises:
        ValueError: on a key the dataclass does not have (names the allowed keys).
    """
    data = dict(data or {})
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(data.get(k), Mapping):
            data[k] = {**data[k], **v}  # a flag overrides its own key of a YAML mapping (labels:), not the rest
        elif v is not None:
            data[k] = v
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s) {', '.join(unknown)}: allowed keys are {', '.join(names)}"
        )
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data and isinstance(data[f.name], list):
            data[f.name] = tuple(data[f.name])
    return cls(**data)


def load_yaml(path: str | None) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load`` (an empty file is an empty mapping)."""
    if not path:
        return {}
    from mammo_ray.io import read_bytes

    try:
        data = yaml.safe_load(read_bytes(path).decode("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a plain YAML mapping: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain-python (YAML-safe) dict of a config dataclass; tuples become lists."""
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):  # a nested dataclass (labels:) comes as a dict of tuples
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


#: the two classes, in label order (0, 1)
LABELS = ("benign", "malignant")
#: the folders of a preprocessed set: the training data's three splits, and an external set's
TRAIN, VAL, TEST, EXTERNAL = "train", "val", "test", "external"
SPLITS = (TRAIN, VAL, TEST, EXTERNAL)


# The largest learning rate accepted. An LR range test sweeps up to 1 (lr-find's default end)
# and SGD/AdamW diverge far below 10; a larger bound is a typo (1e300 overflowed in the
# scheduler, after config.yaml was written), so it is refused up front, naming the field.
MAX_LR = 10.0


def _check_lr(name: str, value: float) -> None:
    if not 0 < float(value) <= MAX_LR:
        raise ValueError(f"{name}={value!r}: use a learning rate in (0, {MAX_LR:g}]")
