"""The Ray Data preprocessing job end to end on phantoms, and the bad-input corpus."""
from __future__ import annotations

import csv
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from pydicom.data import get_testdata_file

from mammo_ray.config import PreprocessConfig, to_dict
from mammo_ray.data.arrays import pixels_of
from mammo_ray.data.parquet import SPEC_KEY, read_spec, read_split, split_files
from mammo_ray.data.pipeline import OutputExistsError, run_preprocess


def _errors(out: Path) -> dict[str, str]:
    with open(out / "errors.csv") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


def _all_rows(out: Path, splits=("train", "val", "test")):
    rows = []
    for s in splits:
        if split_files(str(out), s):
            rows += read_split(str(out), s).to_pylist()
    return rows


def test_phantom_folder_end_to_end(ray_local, phantom_dir, tmp_path):
    out = tmp_path / "out"
    cfg = PreprocessConfig.load(size=64, batch_size=8)
    summary = run_preprocess([str(phantom_dir)], str(out), cfg)
    assert summary["inputs"] == 60 and summary["rows"] == 60 and summary["errors"] == 0
    assert summary["balanced"] and json.loads((out / "summary.json").read_text()) == summary
    assert {"png", "dicom"} <= {r["source_format"] for r in _all_rows(out)}

    rows = _all_rows(out)
    assert len(rows) == 60 and len({r["image_id"] for r in rows}) == 60
    for r in rows[:5]:
        px = pixels_of(r)
        assert px.shape == (64, 64) and px.dtype == np.uint8 and px.max() > 0
    labels = {r["source_path"]: r["label"] for r in rows}
    assert all(lab == (1 if "/malignant/" in p else 0) for p, lab in labels.items())
    # DICOM files carry a patient id: grouped through the header probe
    where = defaultdict(set)
    for r in rows:
        if r["patient_key"]:
            where[r["patient_key"]].add(r["split"])
    assert where and all(len(s) == 1 for s in where.values())
    # the spec travels in the Parquet metadata and in preprocess.yaml
    f = split_files(str(out), "train")[0]
    assert SPEC_KEY in pq.read_schema(f).metadata
    assert read_spec(str(out)) == cfg.spec
    written = yaml.safe_load((out / "preprocess.yaml").read_text())
    assert written["spec"] == to_dict(cfg.spec) and "patient_salt" not in written
    assert PreprocessConfig.load(str(out / "preprocess.yaml")).spec == cfg.spec
    # no patient identifier anywhere in the outputs
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"SYN000-P" not in blob


def test_manifest_split_is_grouped_and_deterministic(ray_local, phantom_dir, tmp_path):
    cfg = PreprocessConfig.load(size=32, batch_size=16, ratios=[0.6, 0.2, 0.2])
    a = run_preprocess([str(phantom_dir / "labels.csv")], str(tmp_path / "a"), cfg)
    b = run_preprocess([str(phantom_dir / "labels.csv")], str(tmp_path / "b"), cfg)
    assert a["splits"] == b["splits"] and a["rows"] == 60
    ra = {r["image_id"]: r["split"] for r in _all_rows(tmp_path / "a")}
    rb = {r["image_id"]: r["split"] for r in _all_rows(tmp_path / "b")}
    assert ra == rb and set(ra.values()) == {"train", "val", "test"}
    patients = defaultdict(set)
    with open(phantom_dir / "labels.csv") as f:
        pid = {str(phantom_dir / r["path"]): r["patient_id"] for r in csv.DictReader(f)}
    for r in _all_rows(tmp_path / "a"):
        patients[pid[r["source_path"]]].add(r["split"])
    assert all(len(s) == 1 for s in patients.values())
    assert any(len([1 for p in pid.values() if p == k]) > 1 for k in patients)  # multi-image patients exist


def _png(path: Path, img: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", img)
    path.write_bytes(buf.tobytes())


@pytest.fixture
def bad_corpus(phantom_dir, tmp_path) -> tuple[Path, dict[str, str]]:
    """A class-folder tree with 8 good phantoms and one of every kind of bad input."""
    root = tmp_path / "corpus"
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True)
        for p in sorted((phantom_dir / cls).iterdir())[:4]:
            shutil.copy(p, root / cls / p.name)
    b = root / "benign"
    good_png = next(p for p in sorted((phantom_dir / "benign").iterdir()) if p.suffix == ".png").read_bytes()
    ok, jpg = cv2.imencode(".jpg", np.full((64, 64), 90, np.uint8))
    expected = {}

    def bad(name, data, reason):
        (b / name).write_bytes(data)
        expected[str(b / name)] = reason

    bad("zero.png", b"", "empty file")
    bad("truncated.png", good_png[: len(good_png) // 2], "truncated PNG")
    bad("truncated.jpg", jpg.tobytes()[:300], "truncated JPEG")
    bad("text.png", b"this is not an image\n", "unrecognized file header")
    bad("rtplan.dcm", Path(get_testdata_file("rtplan.dcm")).read_bytes(), "no pixel data")
    _png(b / "tiny.png", np.zeros((1, 1), np.uint8))
    expected[str(b / "tiny.png")] = "smaller than min_side"
    _png(b / "huge.png", np.zeros((20000, 20000), np.uint8))
    expected[str(b / "huge.png")] = "above max_pixels"
    rgba = np.dstack([np.full((64, 64), 80, np.uint8)] * 3 + [np.full((64, 64), 7, np.uint8)])
    _png(b / "rgba.png", rgba)
    expected[str(b / "rgba.png")] = "RGBA image with transparency"
    os.symlink("/nonexistent/file.png", b / "dangling.png")
    expected[str(b / "dangling.png")] = "unreadable"
    (root / "unsure").mkdir()  # not a word of the label vocabulary (normal/ is: negative)
    shutil.copy(phantom_dir / "benign" / sorted(os.listdir(phantom_dir / "benign"))[0], root / "unsure" / "x.png")
    expected[str(root / "unsure" / "x.png")] = "unknown class folder 'unsure'"
    # kept with a warning column (other_modality=warn), not an error
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "malignant" / "ct.dcm")
    (root / "README.txt").write_text("not an input")
    return root, expected


def test_bad_input_corpus_loses_nothing(ray_local, bad_corpus, tmp_path):
    root, expected = bad_corpus
    out = tmp_path / "out"
    cfg = PreprocessConfig.load(size=32, batch_size=4, min_side=16)
    summary = run_preprocess([str(root)], str(out), cfg)
    errors = _errors(out)
    assert set(errors) == set(expected)
    for path, reason in expected.items():
        assert reason in errors[path], (path, errors[path])
        assert "\n" not in errors[path]
    assert summary["inputs"] == 8 + 1 + len(expected)  # good + CT + bad
    assert summary["rows"] == 9 and summary["errors"] == len(expected) and summary["balanced"]
    assert summary["ignored_non_image_files"] == {".txt": 1}
    ct = [r for r in _all_rows(out) if r["source_path"].endswith("ct.dcm")]
    assert len(ct) == 1 and "not MG" in ct[0]["warning"] and ct[0]["modality"] == "CT"


def test_other_modality_refused_by_option(ray_local, bad_corpus, tmp_path):
    root, expected = bad_corpus
    cfg = PreprocessConfig.load(size=32, min_side=16, other_modality="refuse")
    summary = run_preprocess([str(root)], str(tmp_path / "out"), cfg)
    assert "not MG" in _errors(tmp_path / "out")[str(root / "malignant" / "ct.dcm")]
    assert summary["rows"] == 8 and summary["balanced"]


def test_manifest_bad_rows(ray_local, phantom_dir, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(phantom_dir, root)
    outside = tmp_path / "secret.png"
    outside.write_bytes((root / "labels.csv").read_bytes())
    lines = (root / "labels.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:9]
    rows.append(rows[0].replace(rows[0].split(",")[0], "benign/missing.png", 1))
    rows.append(rows[0].replace(rows[0].split(",")[0], "../secret.png", 1))
    rows.append(rows[1].replace(",malignant,", ",suspicious,").replace(",benign,", ",suspicious,"))
    rows.append(rows[2])  # duplicate
    (root / "manifest.csv").write_text("\n".join([header] + rows) + "\n")
    out = tmp_path / "out"
    summary = run_preprocess([str(root / "manifest.csv")], str(out), PreprocessConfig.load(size=32))
    errors = _errors(out)
    reasons = sorted(errors.values())
    assert any("not found" in r for r in reasons)
    # a path outside the manifest's folder is read (the user wrote it): this one is no image
    assert "unrecognized file header" in errors[str(outside)]
    assert any("label 'suspicious' is not in the label vocabulary" in r for r in reasons)
    assert summary["inputs"] == 12 and summary["errors"] == 4 and summary["rows"] == 8


def test_external_set_and_output_reuse(ray_local, phantom_dir, tmp_path):
    out = tmp_path / "ext"
    cfg = PreprocessConfig.load(size=32, external=True)
    summary = run_preprocess([str(phantom_dir)], str(out), cfg)
    assert set(summary["splits"]) == {"external"}
    assert not (out / "train").exists() and len(read_split(str(out), "external")) == 60
    with pytest.raises(OutputExistsError, match="already holds a mammo-ray preprocess run"):
        run_preprocess([str(phantom_dir)], str(out), cfg)
    again = run_preprocess([str(phantom_dir)], str(out), cfg, overwrite=True)
    assert again["rows"] == 60 and len(read_split(str(out), "external")) == 60


def test_missing_input_is_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        run_preprocess([str(tmp_path / "nope")], str(tmp_path / "out"), PreprocessConfig())
