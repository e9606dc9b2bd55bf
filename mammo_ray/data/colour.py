"""Colour DICOM (RGB, YBR, PALETTE COLOR) to one grayscale channel, scaled by the stored range.

Mammograms are grayscale; a colour file in an archive is a secondary capture (a screenshot, an
annotated export) and is kept with a warning. Its samples fill ``BitsStored`` bits of a 8-, 16-
or 32-bit word, so the luma is scaled from ``0 .. 2**BitsStored - 1`` onto the output's range
(8-bit sources stay ``uint8``, deeper ones become ``uint16``): a plain cast would keep only the
low byte of every 16-bit sample. PALETTE COLOR pixels are indices into the file's colour table,
which is applied (``pydicom.pixels.apply_color_lut``) before the luma is taken.
"""
from __future__ import annotations

import numpy as np

#: photometric interpretations whose decoded array pydicom returns as R, G, B samples (the YBR
#: family is converted to RGB by pydicom or, for YBR_ICT/YBR_RCT, by the JPEG 2000 codec)
RGB_LIKE = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
PALETTE = "PALETTE COLOR"
#: ITU-R BT.601 luma weights, the ones OpenCV's RGB2GRAY uses for the raster formats
LUMA = (0.299, 0.587, 0.114)


def luma(rgb: np.ndarray, bits: int) -> np.ndarray:
    """Grayscale of R, G, B samples holding ``bits`` significant bits.

    Args:
        rgb: ``(H, W, 3)`` (or 4, alpha ignored) unsigned samples.
        bits: the stored range: samples run over ``0 .. 2**bits - 1`` (larger ones are clipped).

    Returns:
        ``uint8`` for ``bits <= 8``, else ``uint16``, scaled so that the stored range's top is
        the output's top.

    Raises:
        ValueError: ``bits`` outside 1..32, or an array that is not 3-channel.
    """
    if not 1 <= bits <= 32:
        raise ValueError(f"bits={bits}: use 1..32")
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"colour array of shape {rgb.shape}: expected (H, W, 3)")
    top = float((1 << bits) - 1)
    # float64: a 32-bit sample does not fit float32's 24-bit mantissa
    y = sum(rgb[..., c].astype(np.float64) * w for c, w in enumerate(LUMA))
    out_top, dtype = (255.0, np.uint8) if bits <= 8 else (65535.0, np.uint16)
    return np.clip(np.round(np.minimum(y, top) * (out_top / top)), 0, out_top).astype(dtype)


def stored_bits(ds, arr: np.ndarray) -> int:
    """``BitsStored`` when it is a usable value for this array, else the array's word size."""
    word = arr.dtype.itemsize * 8
    try:
        bits = int(ds.get("BitsStored") or word)
    except (TypeError, ValueError):
        return word
    return bits if 1 <= bits <= word else word


def palette_to_rgb(arr: np.ndarray, ds) -> tuple[np.ndarray, int]:
    """Apply a PALETTE COLOR file's colour table. Returns (R, G, B samples, their bits): 8 for
    8-bit table entries, 16 for 16-bit ones (the descriptor's third value)."""
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(arr, ds)
    return rgb[..., :3], 8 if rgb.dtype == np.uint8 else 16
