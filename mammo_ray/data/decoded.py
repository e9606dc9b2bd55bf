"""What every decoder returns or raises: ``Decoded``, ``DecodeError`` and the size bounds
(shared by the raster decoders in ``decode`` and the DICOM decoder in ``dicom``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MG_MODALITY = "MG"


class DecodeError(ValueError):
    """A source that cannot become an image; the message is the ``errors.csv`` reason."""


@dataclass
class Decoded:
    """A decoded source image and what its header said."""

    pixels: np.ndarray
    source_format: str
    #: a DICOM defined term, or None (the header held none: see ``modality_shown``)
    modality: str | None = None
    #: the header's Modality as a reason may name it: the code, "missing" or "not a DICOM
    #: modality code" (``faults.shown_modality``); None for sources without a header
    modality_shown: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    laterality: str | None = None
    view: str | None = None
    photometric: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: significant bits of the source's values before they were stretched to the output dtype
    #: (8, 16, or e.g. 12 for 12-bit detector values stored in a 16-bit PNG/TIFF)
    stored_bits: int | None = None


def check_size(height: int, width: int, *, min_side: int, max_pixels: int) -> None:
    """Raise DecodeError for images too small to be a mammogram or too large to decode safely."""
    if min(height, width) < min_side:
        raise DecodeError(f"image {height}x{width} is smaller than min_side={min_side}")
    if height * width > max_pixels:
        raise DecodeError(
            f"image {height}x{width} has {height * width} pixels, above max_pixels={max_pixels}"
        )


def rescale_uint16(x: np.ndarray) -> np.ndarray:
    """Stretch ``min..max`` of ``x`` onto ``0..65535`` (all zeros for a constant array)."""
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo:
        return np.zeros(x.shape, np.uint16)
    return np.round((x - lo) * (65535.0 / (hi - lo))).astype(np.uint16)
