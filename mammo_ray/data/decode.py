"""Decode DICOM, PNG (8/16-bit), JPEG, PGM/PNM and TIFF bytes into one grayscale array.

The format is sniffed from the bytes, never trusted from the extension (a text file named
``.png`` is an error, a DICOM without ``.dcm`` is still a DICOM). Image size is read from
the header before any pixels are decoded so a 20000x20000 file is refused cheaply.
Output is a 2-D ``uint8`` (8-bit sources) or ``uint16`` (deeper sources, full depth kept).
"""
from __future__ import annotations

import io
import logging
import struct

import cv2
import numpy as np

from mammo_ray.data.decoded import MG_MODALITY, DecodeError, Decoded, check_size, rescale_uint16
from mammo_ray.data.dicom import decode_dicom, dicom_meta, read_dicom_header
from mammo_ray.data.faults import redact

__all__ = ["FORMATS", "MG_MODALITY", "DecodeError", "Decoded", "check_size", "decode_bytes", "decode_dicom",
           "decode_raster", "describe_exception", "dicom_meta", "png_significant_bits", "read_dicom_header",
           "sniff_format", "window_stored_bits"]

logger = logging.getLogger(__name__)

FORMATS = ("dicom", "png", "jpeg", "pnm", "tiff")


def describe_exception(exc: BaseException, *, limit: int = 160, data: bytes | None = None) -> str:
    """One line about an exception that is safe for ``errors.csv``.

    Messages may quote bytes of the file (a header, a DICOM value such as a patient name) or
    run over many lines; ``errors.csv`` must carry neither, so quoted text is replaced by its
    length, element tags by their keyword (``faults.redact``), words found in ``data`` (the
    file's bytes, when given) are removed and only the first line is kept. DICOM decoding
    builds its reasons with ``faults.describe_fault`` instead.
    """
    first = (str(exc).strip().splitlines() or [""])[0]
    text = redact(first, data)
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sniff_format(data: bytes) -> str:
    """Name the container format from magic bytes.

    Raises:
        DecodeError: empty data or a header that is none of ``FORMATS``.
    """
    if len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:2] in (b"P2", b"P5", b"P3", b"P6") and len(data) > 2 and data[2:3].isspace():
        return "pnm"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    # DICOM written without the 128-byte preamble starts with a group-0008 (or 0002) tag.
    if data[:2] in (b"\x08\x00", b"\x02\x00") and len(data) > 8:
        return "dicom"
    # the bytes themselves are never quoted: an unknown file may be a report holding a name
    kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in data[:64]) else "binary data"
    raise DecodeError(f"unrecognized file header ({len(data)} bytes, starts like {kind}): "
                      "not one of DICOM, PNG, JPEG, PGM/PNM, TIFF")


def decode_bytes(data: bytes, *, min_side: int = 32, max_pixels: int = 100_000_000) -> Decoded:
    """Decode one source file's bytes.

    Args:
        data: the whole file.
        min_side, max_pixels: size bounds, checked from the header before decoding pixels.

    Returns:
        Decoded with a 2-D ``uint8`` or ``uint16`` array.

    Raises:
        DecodeError: with a one-line reason for any unusable source.
    """
    fmt = sniff_format(data)
    if fmt == "dicom":
        dec = decode_dicom(data, min_side=min_side, max_pixels=max_pixels)
    else:
        dec = decode_raster(data, fmt, min_side=min_side, max_pixels=max_pixels)
    lo, hi = int(dec.pixels.min()), int(dec.pixels.max())
    if lo == hi:  # nothing to learn from or explain; equalization would only amplify noise
        raise DecodeError(f"constant image: every pixel is {lo} after decoding")
    return dec


# ----------------------------------------------------------------------------- raster
def _raster_size(data: bytes, fmt: str) -> tuple[int, int]:
    if fmt == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise DecodeError("truncated PNG: no IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return int(height), int(width)
    from PIL import Image  # header-only read; pixels are decoded by OpenCV

    Image.MAX_IMAGE_PIXELS = None  # we apply our own max_pixels before decoding
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception as exc:  # PIL raises many types for broken headers
        kind = "truncated" if "runcated" in str(exc) else "unreadable"
        raise DecodeError(f"{kind} {fmt.upper()}: header unreadable ({describe_exception(exc, data=data)})") from None
    return int(height), int(width)


def _check_complete(data: bytes, fmt: str) -> None:
    # OpenCV returns a partly grey image for a truncated JPEG (libjpeg only warns), so
    # completeness is checked on the container itself.
    if fmt == "png" and b"IEND" not in data[-32:]:
        raise DecodeError("truncated PNG: IEND chunk missing")
    if fmt == "jpeg" and b"\xff\xd9" not in data[-16:]:
        raise DecodeError("truncated JPEG: end-of-image marker missing")


def _to_gray(arr: np.ndarray, warnings: list[str]) -> np.ndarray:
    if arr.ndim == 2:
        return arr
    channels = arr.shape[2]
    if channels == 4:
        alpha = arr[..., 3]
        full = np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0
        if alpha.min() < full:
            raise DecodeError("RGBA image with transparency: pixels under transparent areas are undefined")
        warnings.append("opaque alpha channel dropped")
        arr = arr[..., :3]
    if channels == 1:
        return arr[..., 0]
    c0 = arr[..., 0].astype(np.int32)
    spread = max(int(np.abs(c0 - arr[..., 1]).max()), int(np.abs(c0 - arr[..., 2]).max()))
    if spread <= 8:
        # grey stored as RGB (JPEG chroma subsampling leaves off-by-few differences)
        return arr[..., 1].copy()
    warnings.append(f"colour image converted to grayscale (channel spread {spread})")
    return cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_BGR2GRAY)


def _to_depth(arr: np.ndarray, warnings: list[str]) -> np.ndarray:
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype.kind == "f":
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:  # a rescale over NaN/inf would turn the whole image into one constant
            raise DecodeError(f"{bad} non-finite pixel(s) (NaN or inf) in a {arr.dtype} image")
    warnings.append(f"{arr.dtype} pixels rescaled to uint16")
    return rescale_uint16(arr.astype(np.float64))


def decode_raster(data: bytes, fmt: str, *, min_side: int, max_pixels: int) -> Decoded:
    """Decode PNG/JPEG/PNM/TIFF with OpenCV, keeping 16-bit depth."""
    height, width = _raster_size(data, fmt)
    check_size(height, width, min_side=min_side, max_pixels=max_pixels)
    _check_complete(data, fmt)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DecodeError(f"corrupt {fmt.upper()}: OpenCV could not decode the pixel data")
    warnings: list[str] = []
    arr = _to_depth(_to_gray(arr, warnings), warnings)
    bits = 8
    if arr.dtype == np.uint16:
        arr, bits = window_stored_bits(arr, png_significant_bits(data) if fmt == "png" else None)
    return Decoded(pixels=np.ascontiguousarray(arr), source_format=fmt, warnings=warnings, stored_bits=bits)


def png_significant_bits(data: bytes) -> int | None:
    """The PNG ``sBIT`` chunk's significant bits (the largest over the channels), or None.

    OpenCV does not expose ancillary chunks; the chunk list before the first IDAT is a few
    dozen bytes to walk.
    """
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"sBIT" and 1 <= length <= 4:
            return max(data[pos + 8:pos + 8 + length])
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def window_stored_bits(arr: np.ndarray, declared: int | None = None) -> tuple[np.ndarray, int]:
    """Stretch N-bit values stored in a 16-bit container to the full 16-bit range.

    Detectors deliver 10-, 12- or 14-bit values, and many archives store them unscaled in
    16-bit PNG or TIFF (0..4095 for 12 bits). Read as if they filled 0..65535 the breast ends
    up in a few dozen of the 8-bit grey levels CLAHE works on. The window is the declared
    significant bits (PNG ``sBIT``) when given, else the bit length of the largest value (at
    least 8), so every N-bit version of an image maps to the same 16-bit image within rounding.

    Returns:
        The (possibly) stretched array and the bits used (16: left as it was).
    """
    top = int(arr.max())
    bits = declared if declared and 8 <= declared < 16 and top < (1 << declared) else max(8, top.bit_length())
    if bits >= 16:
        return arr, 16
    scale = 65535.0 / ((1 << bits) - 1)
    return np.round(arr.astype(np.float32) * np.float32(scale)).astype(np.uint16), bits
