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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import cv2
import numpy as np

from mammo_ray.data.colour import PALETTE, RGB_LIKE, luma, palette_to_rgb, stored_bits
from mammo_ray.data.faults import describe_fault, quiet_decoders, redact, shown_modality

logger = logging.getLogger(__name__)

FORMATS = ("dicom", "png", "jpeg", "pnm", "tiff")
MG_MODALITY = "MG"


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


class DecodeError(ValueError):
    """A source that cannot become an image; the message is the ``errors.csv`` reason."""


@dataclass
class Decoded:
    """A decoded source image and what its header said."""

    pixels: np.ndarray
    source_format: str
    modality: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    laterality: str | None = None
    view: str | None = None
    photometric: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: significant bits of the source's values before they were stretched to the output dtype
    #: (8, 16, or e.g. 12 for 12-bit detector values stored in a 16-bit PNG/TIFF)
    stored_bits: int | None = None


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


def check_size(height: int, width: int, *, min_side: int, max_pixels: int) -> None:
    """Raise DecodeError for images too small to be a mammogram or too large to decode safely."""
    if min(height, width) < min_side:
        raise DecodeError(f"image {height}x{width} is smaller than min_side={min_side}")
    if height * width > max_pixels:
        raise DecodeError(
            f"image {height}x{width} has {height * width} pixels, above max_pixels={max_pixels}"
        )


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
    return _rescale_uint16(arr.astype(np.float64))


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


# ----------------------------------------------------------------------------- DICOM
#: photometric interpretations a reason or warning may name (the element is free text)
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", PALETTE, *RGB_LIKE)


@contextmanager
def dicom_step(what: str, data: bytes | None = None) -> Iterator[None]:
    """Run pydicom on a file's content: what it raises is a fault of the file, not a bug.

    The block's exceptions become one ``DecodeError`` ``"<what>: <element keyword>: <kind of
    fault>"`` (``faults.describe_fault``), raised ``from None`` so that no traceback or chained
    message carrying a header value travels with it; pydicom's warnings and log lines, which
    quote values, are silenced for the block.

    Args:
        what: the stage, for the reason ("cannot decode DICOM pixel data (RLE Lossless)").
        data: the file's bytes: words of a codec's message found in them are removed.
    """
    try:
        with quiet_decoders():
            yield
    except DecodeError:
        raise
    except Exception as exc:  # any pydicom/codec exception here is about the file's content
        raise DecodeError(f"{what}: {describe_fault(exc, data)}") from None


def _rescale_uint16(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo:
        return np.zeros(x.shape, np.uint16)
    return np.round((x - lo) * (65535.0 / (hi - lo))).astype(np.uint16)


def _apply_luts_uint16(arr: np.ndarray, ds) -> np.ndarray:
    """Modality LUT, then VOI LUT / windowing, then stretch to the full uint16 range.

    Both LUTs are functions of the stored value alone, so for integer pixels they are
    evaluated once per possible stored value (at most 65,536) and applied by indexing:
    about 5x faster than running pydicom's float64 windowing over a 12-Mpixel mammogram,
    and exact. Other dtypes go through pydicom directly.

    Raises:
        DecodeError: a LUT or window the header describes is unusable (named by keyword).
    """
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        lo = int(arr.min())
        index = (arr.astype(np.int32) - lo) if lo != 0 or arr.dtype.kind == "i" else arr
        counts = np.bincount(index.ravel(), minlength=1)
        values = np.arange(lo, lo + counts.size).astype(arr.dtype)
        lut = _checked_luts(values, ds, has_voi)
        present = lut[counts > 0]
        vmin, vmax = float(present.min()), float(present.max())
        if vmax <= vmin:
            return np.zeros(arr.shape, np.uint16)
        lut16 = np.round((np.clip(lut, vmin, vmax) - vmin) * (65535.0 / (vmax - vmin))).astype(np.uint16)
        return lut16[index]
    return _rescale_uint16(_checked_luts(arr, ds, has_voi))


def _checked_luts(values: np.ndarray, ds, has_voi: bool) -> np.ndarray:
    """pydicom's modality then VOI LUT over ``values``, as float64, refused when not finite."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    with dicom_step("modality LUT unusable"):
        x = apply_modality_lut(values, ds)
    if has_voi:
        with dicom_step("VOI LUT/window unusable"):
            x = apply_voi_lut(x, ds, index=0)
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():  # e.g. a NaN RescaleSlope: every pixel would become one value
        raise DecodeError("LUT unusable: RescaleSlope, RescaleIntercept, WindowCenter, WindowWidth or a LUT "
                          "gives non-finite values: invalid value")
    return x


def _header_text(ds, *keywords: str) -> str | None:
    for kw in keywords:
        try:
            value = ds.get(kw)
        except Exception:  # a value pydicom cannot convert: the field is unknown, not the image
            continue
        if value not in (None, ""):
            return str(value).strip() or None
    return None


def _header_int(ds, keyword: str, default: int | None = None) -> int:
    """An integer element, or DecodeError naming its keyword (never its value)."""
    try:
        value = ds.get(keyword)
        if value in (None, "") and default is not None:
            return default
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        missing = "missing" if keyword not in ds else "not an integer"
        raise DecodeError(f"DICOM pixel data with an unusable {keyword}: {missing}") from None


def _syntax_name(uid: str) -> str:
    """A transfer syntax's dictionary name; an unknown UID is never repeated (it is file bytes)."""
    from pydicom.uid import UID_dictionary

    return UID_dictionary[uid][0] if uid in UID_dictionary else "a transfer syntax pydicom does not know"


def read_dicom_header(data: bytes):
    """Parse a DICOM header without pixel data (cheap; used to group by patient before decoding)."""
    import pydicom

    with dicom_step("unreadable DICOM header"):
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)


def dicom_meta(ds) -> dict[str, str | None]:
    """Header fields the pipeline uses (never the label: labels are not guessed from DICOM)."""
    with quiet_decoders():  # converting a value may warn, quoting it
        return {
            "modality": _header_text(ds, "Modality"),
            "patient_id": _header_text(ds, "PatientID"),
            "study_uid": _header_text(ds, "StudyInstanceUID"),
            "laterality": _header_text(ds, "ImageLaterality", "Laterality"),
            "view": _header_text(ds, "ViewPosition"),
        }


def decode_dicom(data: bytes, *, min_side: int, max_pixels: int) -> Decoded:
    """Decode a DICOM image through pydicom.

    Modality LUT (rescale) then VOI LUT or windowing are applied as the header says, the
    result is stretched to the full ``uint16`` range and MONOCHROME1 (white = low
    attenuation) is inverted so that dense tissue is bright in every output. Colour files
    (RGB, YBR, PALETTE COLOR) become grayscale scaled by their stored range (``colour``).
    Compressed transfer syntaxes decode through pydicom's handlers (RLE with numpy alone;
    JPEG and JPEG 2000 through pylibjpeg).

    Raises:
        DecodeError: one line naming the element (keyword) and the kind of fault; never a
            header value or the file's bytes.
    """
    import pydicom

    with dicom_step("unreadable DICOM"):
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DecodeError("DICOM has no pixel data (PixelData element missing)")
    meta = dicom_meta(ds)
    with quiet_decoders():
        rows, cols = _header_int(ds, "Rows"), _header_int(ds, "Columns")
        frames = _header_int(ds, "NumberOfFrames", 1) or 1
    check_size(rows, cols, min_side=min_side, max_pixels=max_pixels)
    if frames > 1:
        raise DecodeError(f"multi-frame DICOM ({frames} frames): tomosynthesis volumes are not supported")
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian if not ds.is_implicit_VR else pydicom.uid.ImplicitVRLittleEndian
    with dicom_step(f"cannot decode DICOM pixel data ({_syntax_name(ds.file_meta.TransferSyntaxUID)})", data):
        arr = ds.pixel_array
    photometric = _header_text(ds, "PhotometricInterpretation") or "MONOCHROME2"
    warnings: list[str] = []
    if arr.ndim == 3 or photometric == PALETTE:
        out, bits = _colour_to_gray(arr, ds, photometric, warnings)
    else:
        out = _apply_luts_uint16(arr, ds)
        if photometric == "MONOCHROME1":
            out = np.subtract(65535, out, dtype=np.uint16)
        with quiet_decoders():
            bits = _header_int(ds, "BitsStored", 0) or _header_int(ds, "BitsAllocated", 16)
    if meta["modality"] != MG_MODALITY:
        warnings.append(f"modality {shown_modality(meta['modality'])} is not MG")
    return Decoded(out, "dicom", photometric=photometric, warnings=warnings, stored_bits=bits, **meta)


def _colour_to_gray(arr: np.ndarray, ds, photometric: str, warnings: list[str]) -> tuple[np.ndarray, int]:
    """RGB/YBR samples (or PALETTE COLOR indices, through the colour table) to grayscale,
    scaled by the stored range. Returns (pixels, stored bits)."""
    if photometric == PALETTE and arr.ndim == 2:
        with dicom_step("PALETTE COLOR table unusable"):
            arr, bits = palette_to_rgb(arr, ds)
        warnings.append("PALETTE COLOR DICOM: colour table applied, then converted to grayscale")
    elif photometric in RGB_LIKE and arr.ndim == 3 and arr.shape[2] in (3, 4):
        bits = stored_bits(ds, arr)
        warnings.append(f"{photometric} DICOM converted to grayscale")
    else:
        shown = photometric if photometric in PHOTOMETRICS else "an unknown PhotometricInterpretation"
        raise DecodeError(f"DICOM pixel array of shape {arr.shape} with {shown}: not a single image")
    return luma(arr, bits), bits
