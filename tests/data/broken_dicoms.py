"""DICOMs whose every free-text element holds a marker string, broken in each way the decoder
(``mammo_ray/data/decode.py``) refuses a DICOM; used by the what-errors-carry tests.

``BROKEN[name](marker)`` returns the file's bytes; ``EXPECTED[name]`` is a fragment the reason
must hold (the element's keyword or the fault), so each case is known to reach its refusal.
Where the broken element is itself text (PhotometricInterpretation, VOILUTFunction, the
transfer syntax UID, a compressed stream) it holds the marker too.
"""
from __future__ import annotations

import io
from collections.abc import Callable

import cv2
import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from mammo_ray.data.faults import quiet_decoders

#: free-text elements (LO, SH, PN, LT, ST, UT, CS that the decoder shows) set to the marker
TEXT_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "InstitutionName", "ReferringPhysicianName",
                 "StudyDescription", "SeriesDescription", "AccessionNumber", "StudyID", "ImageComments",
                 "Manufacturer", "StationName", "BodyPartExamined", "Modality", "ImageLaterality",
                 "ViewPosition", "PatientComments", "DerivationDescription", "OperatorsName")


def base(marker: str, *, shape: tuple[int, int] = (64, 48), bits: int = 12) -> Dataset:
    """A valid MONOCHROME2 image whose text elements hold ``marker``."""
    with quiet_decoders():
        return _base(marker, shape, bits)


def _base(marker: str, shape: tuple[int, int], bits: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, "1.2.3.4.5"
    for kw in TEXT_KEYWORDS:
        setattr(ds, kw, marker)
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ramp = np.arange(shape[0] * shape[1]).reshape(shape) % (1 << bits)
    ds.PixelData = ramp.astype(np.uint16).tobytes()
    return ds


def save(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with quiet_decoders():  # pydicom warns about the marker in CS elements while writing
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _as_text(keyword: str) -> Callable[[str], bytes]:
    """A numeric element written as LO text holding the marker (an archive's broken header)."""
    def build(marker: str) -> bytes:
        ds = base(marker)
        ds.add_new(tag_for_keyword(keyword), "LO", marker)
        return save(ds)
    return build


def _set(**values) -> Callable[[str], bytes]:
    def build(marker: str) -> bytes:
        ds = base(marker)
        with quiet_decoders():
            for kw, v in values.items():
                setattr(ds, kw, marker if v is MARKER else v)
        return save(ds)
    return build


MARKER = object()  # in _set: "this element holds the marker"


def _no_pixels(marker: str) -> bytes:
    ds = base(marker)
    del ds.PixelData
    return save(ds)


def _no_rows(marker: str) -> bytes:
    ds = base(marker)
    del ds.Rows
    return save(ds)


def _truncated_pixels(marker: str) -> bytes:
    ds = base(marker)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    return save(ds)


def _truncated_header(marker: str) -> bytes:
    data = save(base(marker))
    return data[: data.index(b"\x28\x00\x10\x00") + 5]  # cut inside the Rows element


def _unknown_syntax(marker: str) -> bytes:
    data = save(base(marker))
    uid = b"1.2.840.10008.1.2.1\x00"
    # the file says its pixels use a transfer syntax named by the marker (as bytes: a UID
    # element holding text is what a broken archive writes)
    fake = ("9." + marker).encode()[: len(uid)].ljust(len(uid), b"\x00")
    return data.replace(uid, fake, 1)


def _corrupt_jpeg(marker: str) -> bytes:
    ds = base(marker, bits=8)
    img = (np.arange(64 * 48).reshape(64, 48) % 256).astype(np.uint8)
    jpg = bytearray(cv2.imencode(".jpg", img)[1].tobytes())
    mid = len(jpg) // 2
    jpg[mid:mid + len(marker) + 4] = b"\xff\xda" + marker.encode() + b"\xff\xc4"  # a misplaced scan marker
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([bytes(jpg)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return save(ds)


def _monochrome_with_three_samples(marker: str) -> bytes:
    ds = base(marker)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PixelData = np.zeros((64, 48, 3), np.uint16).tobytes()
    return save(ds)


def _constant(marker: str) -> bytes:
    ds = base(marker)
    ds.PixelData = np.full((64, 48), 7, np.uint16).tobytes()
    return save(ds)


BROKEN: dict[str, Callable[[str], bytes]] = {
    "truncated header": _truncated_header,
    "no pixel data": _no_pixels,
    "Rows missing": _no_rows,
    "Columns not a number": _as_text("Columns"),
    "too small": _set(Rows=4),
    "too large": _set(Rows=60000, Columns=60000),
    "multi-frame": _set(NumberOfFrames=3),
    "NumberOfFrames not a number": _as_text("NumberOfFrames"),
    "unknown transfer syntax": _unknown_syntax,
    "PhotometricInterpretation unknown": _set(PhotometricInterpretation=MARKER),
    "BitsAllocated invalid": _set(BitsAllocated=13),
    "pixel data truncated": _truncated_pixels,
    "corrupt JPEG stream": _corrupt_jpeg,
    "VOILUTFunction unknown": _set(WindowCenter=2000, WindowWidth=1000, VOILUTFunction=MARKER),
    "WindowWidth zero": _set(WindowCenter=2000, WindowWidth=0),
    "RescaleSlope not finite": _set(RescaleSlope="NaN", RescaleIntercept=0),
    "three samples, MONOCHROME2": _monochrome_with_three_samples,
    "PALETTE COLOR without a table": _set(PhotometricInterpretation="PALETTE COLOR"),
    "constant image": _constant,
}

EXPECTED = {
    "truncated header": "no pixel data", "no pixel data": "no pixel data", "Rows missing": "Rows",
    "Columns not a number": "Columns", "too small": "smaller than min_side", "too large": "above max_pixels",
    "multi-frame": "multi-frame", "NumberOfFrames not a number": "NumberOfFrames",
    "unknown transfer syntax": "transfer syntax pydicom does not know",
    "PhotometricInterpretation unknown": "PhotometricInterpretation", "BitsAllocated invalid": "BitsAllocated",
    "pixel data truncated": "PixelData", "corrupt JPEG stream": "codec failed",
    "VOILUTFunction unknown": "VOILUTFunction", "WindowWidth zero": "WindowWidth",
    "RescaleSlope not finite": "RescaleSlope", "three samples, MONOCHROME2": "not a single image",
    "PALETTE COLOR without a table": "RedPaletteColorLookupTableDescriptor: missing", "constant image": "constant image",
}
