"""Colour DICOM to grayscale (issue 26, pydicom's own test files): every layout pydicom decodes
is scaled by its stored range, PALETTE COLOR goes through its colour table, and colour files get
the "modality is not MG" warning too."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, convert_color_space
from pydicom.uid import ExplicitVRLittleEndian

from mammo_ray.data.decode import decode_bytes

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _reference_gray(rgb: np.ndarray, bits: int) -> np.ndarray:
    """BT.601 luma as a fraction of the stored range (written independently of colour.luma)."""
    x = rgb[..., :3].astype(np.float64) / ((1 << bits) - 1)
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def _as_fraction(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64) / np.iinfo(pixels.dtype).max


def _scene(h: int, w: int, top: int, *, step: int = 1) -> np.ndarray:
    """R, G, B ramps in different directions, quantised to multiples of ``step``."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx / (w - 1), yy / (h - 1), (xx + yy) / (h + w - 2)], axis=-1) * top
    return (np.round(rgb / step) * step).clip(0, top)


def _colour_dicom(rgb: np.ndarray, *, bits: int, planar: int = 0, photometric: str = "RGB",
                  modality: str = "OT") -> bytes:
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = ds.file_meta.MediaStorageSOPClassUID, "1.2.3.4", modality
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, planar
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    arr = rgb.astype(dtype)
    ds.PixelData = (np.moveaxis(arr, -1, 0) if planar else arr).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("bits,planar", [(8, 0), (8, 1), (16, 0), (16, 1), (32, 0), (32, 1)])
def test_rgb_is_scaled_by_the_stored_range(bits, planar):
    rgb = _scene(60, 80, (1 << bits) - 1)
    dec = decode_bytes(_colour_dicom(rgb, bits=bits, planar=planar), min_side=8)
    assert dec.pixels.dtype == (np.uint8 if bits == 8 else np.uint16) and dec.stored_bits == bits
    tol = 1.0 / 255 if bits == 8 else 2.0 / 65535
    assert np.abs(_as_fraction(dec.pixels) - _reference_gray(rgb, bits)).max() <= tol
    assert any("RGB DICOM converted to grayscale" in w for w in dec.warnings)
    assert any("modality OT is not MG" in w for w in dec.warnings)  # colour files skipped it


def test_16_bit_rgb_of_the_issue_keeps_its_image():
    """0..51000 once became a row correlating 0.69 with the right grayscale (the cast kept the
    low byte); multiples of 256 were refused as a constant image."""
    ramp = _scene(64, 64, 51000)
    dec = decode_bytes(_colour_dicom(ramp, bits=16), min_side=8)
    assert np.corrcoef(dec.pixels.ravel(), _reference_gray(ramp, 16).ravel())[0, 1] > 0.9999
    steps = _scene(64, 64, 65280, step=256)
    dec = decode_bytes(_colour_dicom(steps, bits=16), min_side=8)
    assert np.abs(_as_fraction(dec.pixels) - _reference_gray(steps, 16)).max() <= 2.0 / 65535


def test_bits_stored_below_the_word_is_the_range():
    """12-bit samples in 16-bit words: 4095 is white, not 1/16 of it."""
    rgb = _scene(48, 48, 4095)
    data = _colour_dicom(rgb, bits=16)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.BitsStored, ds.HighBit = 12, 11
    buf = io.BytesIO()
    ds.save_as(buf)
    dec = decode_bytes(buf.getvalue(), min_side=8)
    assert dec.stored_bits == 12 and int(dec.pixels.max()) > 65000
    assert np.abs(_as_fraction(dec.pixels) - _reference_gray(rgb, 12)).max() <= 2.0 / 65535


@pytest.mark.parametrize("planar", [0, 1])
def test_ybr_full_built_with_pydicom(planar):
    rgb = _scene(40, 40, 255).astype(np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    dec = decode_bytes(_colour_dicom(ybr, bits=8, planar=planar, photometric="YBR_FULL"), min_side=8)
    # YBR_FULL <-> RGB rounds each way: a grey level or two
    assert np.abs(_as_fraction(dec.pixels) - _reference_gray(rgb, 8)).max() <= 3.0 / 255
    assert any("YBR_FULL DICOM converted to grayscale" in w for w in dec.warnings)


def _colour_files() -> list[Path]:
    out = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if photometric and not photometric.startswith("MONOCHROME") and int(ds.get("NumberOfFrames", 1) or 1) == 1 \
                and min(int(ds.Rows), int(ds.Columns)) >= 8:
            out.append(path)
    return out


@pytest.mark.parametrize("path", _colour_files(), ids=lambda p: p.name)
def test_pydicom_colour_files(path):
    """Every single-frame colour file pydicom ships (RGB 8/16/32-bit, YBR_FULL, YBR_FULL_422,
    YBR_RCT, PALETTE COLOR; native, RLE, JPEG, JPEG-LS, JPEG 2000) against pydicom's own RGB."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 8 if arr.dtype == np.uint8 else 16
    else:
        bits = int(ds.BitsStored)
    dec = decode_bytes(path.read_bytes(), min_side=8)
    ref = _reference_gray(arr, bits)
    assert np.abs(_as_fraction(dec.pixels) - ref).max() <= 2.0 / 255
    assert any("converted to grayscale" in w for w in dec.warnings)
    assert any("is not MG" in w for w in dec.warnings)
    assert len(dec.warnings) == 2


def test_palette_colour_applies_the_table():
    """The raw palette indices are not the image: the colour table maps them to colours."""
    path = get_testdata_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    dec = decode_bytes(open(path, "rb").read(), min_side=8)
    assert dec.warnings[0] == "PALETTE COLOR DICOM: colour table applied, then converted to grayscale"
    indices = ds.pixel_array.astype(np.float64)
    # the table is not a grey ramp, so the indices alone are a different picture
    assert np.abs(_as_fraction(dec.pixels) - indices / 255).mean() > 0.05
