"""What a decode failure may carry (issue 26, item 6): one line naming the element's keyword
and the kind of fault, never a header value or the file's bytes; no traceback, warning or log
line quoting a value; a codec's own cause kept. The Ray end of it (preprocess, errors.csv,
worker logs) is in test_faults_ray.py."""
from __future__ import annotations

import logging
import string
import warnings
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from mammo_ray.config import PreprocessConfig
from mammo_ray.data.decode import DecodeError, decode_bytes, describe_exception
from mammo_ray.data.faults import describe_fault, named_elements, quiet_decoders, redact, shown_modality
from mammo_ray.data.pipeline import probe_batch, process_record
from mammo_ray.explain.tasks import prepare_batch
from tests.data.broken_dicoms import BROKEN, EXPECTED, base, save

CFG = PreprocessConfig.load(size=32, min_side=8)
#: markers: a fixed prefix no decoder message holds, then letters and digits (the chars an
#: archive's free-text element holds; a value's own length or case must not matter)
markers = st.text(string.ascii_letters + string.digits, min_size=4, max_size=24).map(lambda s: "PIDZQ" + s)


def _record(path: Path) -> dict:
    return {"image_id": path.stem, "path": str(path), "split": "external", "label": 0}


def _assert_absent(marker: str, *texts: str) -> None:
    for text in texts:
        assert marker not in text and marker.lower() not in text.lower(), text


def _run_one(path: Path, cfg: PreprocessConfig = CFG) -> dict:
    """process_record (preprocess's worker body) and prepare_batch (score/explain's) on a file."""
    row, status = process_record(_record(path), cfg)
    frame = prepare_batch(pd.DataFrame([_record(path)]), cfg=cfg, preview_size=0)
    assert row is None and status["status"] == "error" and frame.loc[0, "status"] == "error"
    assert frame.loc[0, "reason"] == status["reason"]
    return status


@pytest.mark.parametrize("fault", sorted(BROKEN))
def test_each_refusal_names_the_element_not_the_value(fault, tmp_path, capfd, caplog):
    """Every way the decoder refuses a DICOM gives one line that names the element (or the
    fault) and holds no header value; nothing is printed, logged or warned that holds one."""
    marker = "PIDSECRET12345"
    path = tmp_path / "x.dcm"
    path.write_bytes(BROKEN[fault](marker))
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = _run_one(path)
    reason = status["reason"]
    assert EXPECTED[fault] in reason and "\n" not in reason and len(reason) < 400
    out, err = capfd.readouterr()
    _assert_absent(marker, reason, out, err, caplog.text, *(str(w.message) for w in caught))
    assert "Traceback" not in caplog.text + err  # a bad file is not a bug


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                    HealthCheck.function_scoped_fixture])
@given(marker=markers, fault=st.sampled_from(sorted(BROKEN)), refuse_other=st.booleans())
def test_no_marker_in_any_reason_log_or_warning(marker, fault, refuse_other, tmp_path_factory, capfd):
    """Property: whatever the marker and the fault, the reason, the console and the log hold
    none of it (other_modality=refuse adds the modality refusal: Modality holds the marker)."""
    path = tmp_path_factory.mktemp("m") / "x.dcm"
    path.write_bytes(BROKEN[fault](marker))
    cfg = PreprocessConfig.load(size=32, min_side=8, other_modality="refuse" if refuse_other else "warn")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status = _run_one(path, cfg)
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    out, err = capfd.readouterr()
    logged = [r.getMessage() + str(r.exc_info or "") for r in records]
    _assert_absent(marker, status["reason"], out, err, *logged, *(str(w.message) for w in caught))


def test_modality_refusal_shows_only_a_modality_code(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(save(base("PIDSECRET12345")))  # a good image whose Modality is the marker
    row, status = process_record(_record(path), PreprocessConfig.load(size=32, min_side=8, other_modality="refuse"))
    assert row is None and status["reason"] == "modality not a DICOM modality code is not MG (other_modality=refuse)"
    assert shown_modality("CT") == "CT" and shown_modality(None) == "missing"


def test_accepted_file_warnings_hold_no_header_value(tmp_path):
    dec = decode_bytes(save(base("PIDSECRET12345")), min_side=8)
    assert dec.warnings == ["ImageLaterality: not a DICOM laterality code", "ViewPosition: not a mammography view code",
                            "modality not a DICOM modality code is not MG"]


def test_coded_header_fields_keep_codes_only(tmp_path):
    """Modality, ImageLaterality and ViewPosition reach the rows only as codes from the
    standard's lists: a name written there becomes None (with a warning naming the element),
    a code survives, upper-cased."""
    marker = "PIDSECRET12345"
    path = tmp_path / "x.dcm"
    path.write_bytes(save(base(marker)))
    row, status = process_record(_record(path), CFG)
    assert status["status"] == "ok"
    assert (row["modality"], row["laterality"], row["view"]) == (None, None, None)
    assert (status["laterality"], status["view"]) == (None, None)  # what the exam tables read
    # the status keeps the raw PatientID on purpose: the driver pseudonymises it before writing
    _assert_absent(marker, *(str(v) for k, v in row.items() if k != "pixels"),
                   *(str(v) for k, v in status.items() if k != "patient_id"))
    ds = base(marker)
    with quiet_decoders():  # pydicom warns that lower case is not a valid CS
        ds.Modality, ds.ImageLaterality, ds.ViewPosition = "mg", " l ", "mlo"
    coded = tmp_path / "coded.dcm"
    coded.write_bytes(save(ds))
    row, _ = process_record(_record(coded), CFG)
    assert (row["modality"], row["laterality"], row["view"]) == ("MG", "L", "MLO")
    assert "not a" not in row["warning"] and "not MG" not in row["warning"]


@pytest.mark.parametrize("image_lat,lat,view,expected", [
    ("R", None, "XCCL", ("R", "XCCL", [])),
    ("B", None, "CV", ("B", "CV", [])),
    ("PIDSECRET12345", "L", "SCCID", ("L", "SCCID", ["ImageLaterality: not a DICOM laterality code"])),
    (None, "R", "AP", ("R", None, ["ViewPosition: not a mammography view code"])),  # a chest view, not mammography
    ("", None, None, (None, None, [])),  # absent or empty elements are no fault
])
def test_laterality_and_view_codes(image_lat, lat, view, expected):
    ds = base("x")
    for kw, value in (("ImageLaterality", image_lat), ("Laterality", lat), ("ViewPosition", view)):
        if value is None:
            delattr(ds, kw) if kw in ds else None
        else:
            setattr(ds, kw, value)
    ds.Modality = "MG"
    dec = decode_bytes(save(ds), min_side=8)
    assert (dec.laterality, dec.view, dec.warnings) == expected


def test_probe_reads_codes_for_exam_grouping(tmp_path):
    """The header pass that groups images into exams before splitting sees the same codes."""
    ds = base("PIDSECRET12345")
    ds.ImageLaterality, ds.ViewPosition = "R", "CC"
    (tmp_path / "coded.dcm").write_bytes(save(ds))
    (tmp_path / "marker.dcm").write_bytes(save(base("PIDSECRET12345")))
    probed = probe_batch(pd.DataFrame({"path": [str(tmp_path / "coded.dcm"), str(tmp_path / "marker.dcm")]}))
    assert probed[["laterality", "view"]].values.tolist() == [["R", "CC"], ["", ""]]


@pytest.mark.parametrize("name,cause", [
    ("JPEG-lossy.dcm", "libjpeg error code -1038 returned from Decode(): A misplaced marker segment"),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "Error decoding the J2K data: failed to read the header"),
])
def test_codec_failures_keep_their_cause_on_one_line(name, cause):
    """pydicom's "raised by all available plugins:" list used to be cut at its first line."""
    with pytest.raises(DecodeError) as info:
        decode_bytes(open(get_testdata_file(name), "rb").read(), min_side=8)
    reason = str(info.value)
    assert cause in reason and "\n" not in reason and "codec failed: pylibjpeg:" in reason
    assert " object at 0x" not in reason


def test_unknown_transfer_syntax_uid_is_not_repeated(tmp_path):
    with pytest.raises(DecodeError) as info:
        decode_bytes(BROKEN["unknown transfer syntax"]("7777123456789"), min_side=8)
    assert "7777123456789" not in str(info.value) and "transfer syntax pydicom does not know" in str(info.value)


def test_tags_become_keywords_and_unknown_tags_are_dropped():
    """A tag pydicom's dictionary does not hold may be pixel bytes read as a header."""
    assert named_elements("The (0028,1051) Window Width must be >= 1") == ["WindowWidth"]
    assert named_elements("Unsupported VOI LUT Function value") == ["VOILUTFunction"]
    text = redact("Unknown tag (7fe3,41c2) with value 'ALICE' in b'\\x00\\x01'")
    assert "7fe3" not in text.lower() and "ALICE" not in text and "an unknown element" in text
    assert describe_fault(ValueError("could not convert string to float: 'DOE^JANE'")) == \
        "an element the decoder did not name: invalid value"


def test_words_found_in_the_file_are_removed():
    data = b"\x00" * 10 + b"PATIENTJANEDOE" + b"\x00" * 10
    text = describe_exception(ValueError("bad value PATIENTJANEDOE near Rows"), data=data)
    assert "JANEDOE" not in text and "<from the file>" in text and "Rows" in text
