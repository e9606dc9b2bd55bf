"""The pixel contract (``PreprocessSpec``) and the preprocessing stage's configuration."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Mapping

from mammo_ray.config.base import MAX_BATCH, MAX_SIDE, _check_choice, check_finite, from_mapping, load_yaml
from mammo_ray.config.labels import LabelMap, as_label_map

EQUALIZE_MODES = ("clahe", "global", "none")
RESIZE_MODES = ("pad", "stretch")
ORIENTATIONS = ("left", "right", "none")
OUTPUT_DTYPES = ("uint8", "uint16", "float32")
INVERSION_MODES = ("auto", "never")
OTHER_MODALITY = ("warn", "refuse")
#: the bounds of a normalisation of [0, 1] pixels: a mean outside the pixel range, or a std
#: over 1 (which squeezes the range) or under 0.01 (which blows it up 100x), cannot be right
MEAN_RANGE, STD_RANGE = (0.0, 1.0), (0.01, 1.0)


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels are made from a source image. Stored in ``preprocess.yaml``, in the Parquet
    schema metadata and in every checkpoint; later stages read it from there.

    Attributes:
        size: output (height, width) in pixels.
        crop: crop to the breast's bounding box before resizing.
        mask: set every pixel outside the breast (its largest bright component, holes filled)
            to 0 before resizing and equalizing: film labels, orientation letters and markers
            that lie inside the crop box leave the picture.
        orientation: flip so the chest wall is on this side (``left`` | ``right`` | ``none``).
        resize_mode: ``pad`` keeps the aspect ratio and pads; ``stretch`` ignores it.
        equalize: ``clahe`` | ``global`` | ``none``.
        clahe_clip, clahe_grid: CLAHE clip limit and tile grid (OpenCV semantics).
        invert: ``auto`` re-inverts images whose background is bright (exported MONOCHROME1
            or inverted JPEGs); ``never`` leaves them.
        dtype: stored pixel dtype (``uint8`` | ``uint16`` | ``float32`` in [0, 1]).
        mean, std: an explicit override of the normalisation applied to pixels scaled to
            [0, 1]. None (the default): the model's weights decide (ImageNet's for torchvision
            weights, 0.5/0.5 for efficientnet_lite0's; 0.5/0.25 for a random init), see
            :mod:`mammo_ray.models.normalization`. Training records what it applied in the
            checkpoint, which every later stage applies.
    """

    size: tuple[int, int] = (224, 224)
    crop: bool = True
    mask: bool = True
    orientation: str = "left"
    resize_mode: str = "pad"
    equalize: str = "clahe"
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    invert: str = "auto"
    dtype: str = "uint8"
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        check_finite(self)
        size = self.size
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 8 or max(size) > MAX_SIDE:
            raise ValueError(f"size={self.size!r}: use one int or [height, width], each in [8, {MAX_SIDE}]")
        object.__setattr__(self, "size", size)
        _check_choice("orientation", self.orientation, ORIENTATIONS)
        _check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        _check_choice("equalize", self.equalize, EQUALIZE_MODES)
        _check_choice("invert", self.invert, INVERSION_MODES)
        _check_choice("dtype", self.dtype, OUTPUT_DTYPES)
        if not self.clahe_clip > 0:
            raise ValueError(f"clahe_clip={self.clahe_clip!r}: must be > 0")
        if not 1 <= int(self.clahe_grid) <= 64:
            raise ValueError(f"clahe_grid={self.clahe_grid!r}: use an int in [1, 64]")
        for name, (lo, hi) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi):
                raise ValueError(f"{name}={value!r}: must be a finite number in [{lo:g}, {hi:g}] (or unset: the "
                                 "weights' normalisation)")


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing job: the pixel spec plus how inputs are accepted, split and read.

    Attributes:
        min_side, max_pixels: sources outside these bounds are errors, not rows.
        max_file_mb: files larger than this (MB of 2**20 bytes) are errors, never read;
            ``--max-file-mb``.
        other_modality: DICOM whose Modality is not MG: ``warn`` keeps it with a warning
            column, ``refuse`` makes it an error.
        patient_key_file: the secret key file of the patient pseudonyms (``patient_key``, an
            HMAC of the patient id); default ``$MAMMO_RAY_PATIENT_KEY``, else the user's key
            file (see :mod:`mammo_ray.privacy`). The key itself is never written out.
        batch_size: images per Ray task and per Parquet file.
        labels: the label vocabulary (manifest labels and class folder names; see
            :mod:`mammo_ray.config.labels`), recorded in ``preprocess.yaml``.
    """

    spec: PreprocessSpec = field(default_factory=PreprocessSpec)
    # 70:15:15: a 5% test split (the paper's 80:15:5) gave 10 test images out of 200, and ~170 of
    # 3,383 real ones, whose AUC interval (+-0.13) is too wide to rank models; 15% halves it
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    external: bool = False
    unlabeled: bool = False
    batch_size: int = 32
    min_side: int = 32
    max_pixels: int = 100_000_000
    # an input file over this many MB (2**20 bytes) is refused unread. Full-field mammography
    # DICOMs are 10-100 MB and a single frame at max_pixels is 200 MB uncompressed; tomosynthesis
    # stacks (GBs) are multi-frame, which the decoder refuses anyway, so reading them would only
    # take a worker's memory. Raise it with max_pixels for larger single frames.
    max_file_mb: int = 512
    other_modality: str = "warn"
    patient_key_file: str | None = None
    labels: LabelMap = field(default_factory=LabelMap)

    def __post_init__(self) -> None:
        check_finite(self)
        object.__setattr__(self, "labels", as_label_map(self.labels))
        if isinstance(self.spec, Mapping):
            object.__setattr__(self, "spec", from_mapping(PreprocessSpec, self.spec))
        try:
            r = tuple(float(x) for x in self.ratios)
        except (TypeError, ValueError):
            raise ValueError(f"ratios={self.ratios!r}: use three numbers train,val,test") from None
        if len(r) != 3 or not all(math.isfinite(x) for x in r) or min(r) < 0 or abs(sum(r) - 1.0) > 1e-6 or r[0] <= 0:
            raise ValueError(f"ratios={self.ratios!r}: use three non-negative numbers train,val,test summing to 1 with train > 0")
        object.__setattr__(self, "ratios", r)
        _check_choice("other_modality", self.other_modality, OTHER_MODALITY)
        if self.min_side < 1 or self.max_pixels < self.min_side**2:
            raise ValueError(f"min_side={self.min_side}, max_pixels={self.max_pixels}: need 1 <= min_side and min_side**2 <= max_pixels")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size={self.batch_size!r}: use an int in [1, {MAX_BATCH}]")
        if isinstance(self.max_file_mb, bool) or not isinstance(self.max_file_mb, int) or not 1 <= self.max_file_mb <= 65536:
            raise ValueError(f"max_file_mb={self.max_file_mb!r}: use an int in [1, 65536] (MB)")
        if self.max_pixels > 1_000_000_000:
            raise ValueError(f"max_pixels={self.max_pixels!r}: at most 1000000000 (a 1-gigapixel source)")

    @classmethod
    def load(cls, path: str | None = None, **overrides: Any) -> PreprocessConfig:
        """YAML file first (keys of this class, with the pixel spec under ``spec:``), then overrides.

        Spec keys given as overrides (``size=``, ``equalize=``...) go into the spec.
        """
        data = load_yaml(path)
        if "patient_salt" in data:
            raise ValueError("patient_salt: a public salt let anyone recover patient ids by brute force, so patient "
                             "keys are now keyed by a secret: remove patient_salt and set $MAMMO_RAY_PATIENT_KEY or "
                             "patient_key_file")
        spec_names = {f.name for f in dataclasses.fields(PreprocessSpec)}
        spec_over = {k: overrides.pop(k) for k in list(overrides) if k in spec_names}
        spec_data = dict(data.pop("spec", {}) or {})
        spec = from_mapping(PreprocessSpec, spec_data, **spec_over)
        return from_mapping(cls, data, spec=spec, **overrides)
