"""What errors may carry, through real Ray preprocess jobs (issue 26): a marker in every text
element of files broken in each way the decoder refuses reaches no output file, errors.csv,
console line or Ray worker log; and pydicom's own test files all go through one job that
balances, with no reason repeating a header value."""
from __future__ import annotations

import csv
import shutil
import string
import warnings
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mammo_ray.config import PreprocessConfig
from mammo_ray.data.colour import PALETTE, RGB_LIKE
from mammo_ray.data.faults import MODALITIES
from mammo_ray.data.pipeline import run_preprocess
from tests.data.broken_dicoms import BROKEN, EXPECTED, base, save

pytestmark = pytest.mark.slow
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _worker_logs_holding(marker: bytes) -> list[str]:
    """This Ray session's log files (worker stdout/stderr, raylet, core workers) holding marker."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    assert any(logs.glob("worker-*.err")), logs  # the workers' stderr is where a traceback went
    return [str(p) for p in logs.rglob("*") if p.is_file() and marker in p.read_bytes()]


@settings(max_examples=2, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(marker=st.text(string.ascii_letters + string.digits, min_size=6, max_size=16).map(lambda s: "PIDZQ" + s))
def test_marker_reaches_no_output_console_or_worker_log(ray_local, tmp_path_factory, capfd, marker):
    root = tmp_path_factory.mktemp("in")
    (root / "benign").mkdir()
    for i, fault in enumerate(sorted(BROKEN)):
        (root / "benign" / f"broken{i:02d}.dcm").write_bytes(BROKEN[fault](marker))
    good = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    cv2.imwrite(str(root / "benign" / "good.png"), good)  # one row, so the Parquet side is written too
    # a good DICOM whose Modality, ImageLaterality and ViewPosition hold the marker: a row, with
    # None there; and one with codes, which survive
    (root / "benign" / "good.dcm").write_bytes(save(base(marker)))
    coded = base(marker)
    coded.Modality, coded.ImageLaterality, coded.ViewPosition = "MG", "R", "XCCL"
    (root / "benign" / "coded.dcm").write_bytes(save(coded))
    out = tmp_path_factory.mktemp("out") / "run"
    summary = run_preprocess([str(root)], str(out), PreprocessConfig.load(size=32, min_side=8, batch_size=4))
    assert summary["balanced"] and summary["rows"] == 3 and summary["errors"] == len(BROKEN)
    rows = [r for part in out.rglob("*.parquet")
            for r in pq.read_table(part, columns=["source_path", "modality", "laterality", "view"]).to_pylist()]
    coded_fields = {Path(r["source_path"]).name: (r["modality"], r["laterality"], r["view"]) for r in rows}
    assert coded_fields["good.dcm"] == (None, None, None) and coded_fields["coded.dcm"] == ("MG", "R", "XCCL")
    with open(out / "errors.csv", newline="") as f:
        reasons = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}
    for i, fault in enumerate(sorted(BROKEN)):  # each case reached its own refusal
        assert EXPECTED[fault] in reasons[f"broken{i:02d}.dcm"], (fault, reasons)
    console = "".join(capfd.readouterr())
    needle = marker.encode()
    in_outputs = [str(p) for p in out.rglob("*") if p.is_file() and needle.lower() in p.read_bytes().lower()]
    assert in_outputs == [] and marker not in console and "Traceback" not in console
    assert _worker_logs_holding(needle) == []


def _header_values(path: Path) -> set[str]:
    """Text values of a file's header (six characters or more) that a reason must not repeat;
    the defined terms a reason may name (modality, photometric) are left out."""
    shown = MODALITIES | {PALETTE, *RGB_LIKE, "MONOCHROME1", "MONOCHROME2"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            values = {str(v) for e in [*ds.file_meta.iterall(), *ds.iterall()] if e.VR in TEXT_VRS
                      for v in (e.value if isinstance(e.value, (list, pydicom.multival.MultiValue)) else [e.value])}
    except Exception:  # not a DICOM (a README, a JSON dump): nothing to compare with
        return set()
    return {v.strip() for v in values if len(v.strip()) >= 6 and v.strip() not in shown}


TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


def test_all_pydicom_test_files_balance_and_reasons_carry_no_value(ray_local, tmp_path, capfd):
    """pydicom's 160-odd test files (every transfer syntax, colour layout, broken header it
    ships): one job, nothing lost, and no reason or warning repeating a header value."""
    root = tmp_path / "in"
    shutil.copytree(TEST_FILES, root)
    files = [p for p in root.rglob("*") if p.is_file()]
    out = tmp_path / "out"
    summary = run_preprocess([str(root)], str(out), PreprocessConfig.load(size=32, min_side=8, batch_size=16))
    assert summary["balanced"] and summary["rows"] > 60 and summary["rows"] + summary["errors"] == summary["inputs"]
    assert summary["inputs"] + sum(summary["ignored_non_image_files"].values()) == len(files)
    with open(out / "errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    warnings_by_path = {}
    for part in out.rglob("*.parquet"):
        table = pq.read_table(part, columns=["source_path", "warning"]).to_pylist()
        warnings_by_path.update({r["source_path"]: r["warning"] for r in table})
    leaks = []
    for path, text in [*((e["path"], e["reason"]) for e in errors), *warnings_by_path.items()]:
        assert "\n" not in text
        leaks += [(Path(path).name, v, text) for v in _header_values(Path(path)) if v in text]
    assert leaks == []
    reasons = " ".join(e["reason"] for e in errors)
    assert "libjpeg error code -1038" in reasons and "failed to read the header" in reasons
    assert "Traceback" not in "".join(capfd.readouterr())
