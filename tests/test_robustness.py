"""Regressions from the adversarial pass: NaN/inf, non-UTF-8 names, one-line errors, manifests."""
from __future__ import annotations

import csv
import os
from pathlib import Path
import shutil

import cv2
import numpy as np
import pytest
import torch

from mammo_ray.cli import main
from mammo_ray.config import PreprocessConfig, SweepConfig, TrainConfig
from mammo_ray.data.decode import DecodeError, decode_bytes
from mammo_ray.data.inputs import discover
from tests.conftest import error_text


@pytest.mark.parametrize("argv", [
    ["tune", "--data", "D", "--out", "O", "--cpus-per-trial", "nan"],
    ["tune", "--data", "D", "--out", "O", "--gpus-per-trial", "inf"],
    ["tune", "--data", "D", "--out", "O", "--lr-bounds", "nan:1e-3"],
    ["train", "--data", "D", "--out", "O", "--freeze-ratio", "nan"],
    ["train", "--data", "D", "--out", "O", "--base-lr=-inf"],
    ["evaluate", "--checkpoint", "C", "--data", "D", "--out", "O", "--target-sensitivity", "nan"],
    ["explain", "D", "--checkpoint", "C", "--out", "O", "--threshold", "nan"],
    ["preprocess", "D", "--out", "O", "--ratios", "nan", "0.1", "0.1"],
    ["synth", "--out", "O", "--n", "2", "--contrast", "inf"],
])
def test_nan_and_inf_flags_refused_in_one_line(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([{"D": str(tmp_path), "O": str(tmp_path / "o"), "C": str(tmp_path / "c.pt")}.get(a, a) for a in argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "finite" in err, err


@pytest.mark.parametrize("make", [
    lambda: TrainConfig(base_lr=float("nan")),
    lambda: TrainConfig(clr_gamma=float("inf")),
    lambda: SweepConfig(cpus_per_trial=float("nan")),
    lambda: SweepConfig(lr_bounds=((float("nan"), 1e-3),)),
    lambda: PreprocessConfig.load(clahe_clip=float("inf")),
    lambda: PreprocessConfig.load(mean=float("nan")),
])
def test_nan_and_inf_config_values_refused(make):
    with pytest.raises(ValueError, match="must be a finite number"):
        make()


def test_float_tiff_with_nan_and_constant_images_are_errors():
    img = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    img[3, 5] = np.nan
    ok, buf = cv2.imencode(".tiff", img)
    assert ok
    with pytest.raises(DecodeError, match="1 non-finite pixel"):
        decode_bytes(buf.tobytes())
    ok, flat = cv2.imencode(".png", np.full((64, 64), 17, np.uint8))
    with pytest.raises(DecodeError, match="constant image: every pixel is 17"):
        decode_bytes(flat.tobytes())


def test_non_utf8_file_name_is_one_error_line(ray_local, phantom_dir, tmp_path):
    from mammo_ray.data.pipeline import run_preprocess

    raw = tmp_path / "raw"
    shutil.copytree(phantom_dir, raw)
    src = next((raw / "benign").glob("*.png"))
    bad = os.path.join(os.fsencode(raw / "benign"), b"bad_\xff_bytes.png")
    shutil.copy(src, bad)
    summary = run_preprocess([str(raw)], str(tmp_path / "out"), PreprocessConfig.load(size=32))
    assert summary["inputs"] == 61 and summary["rows"] == 60 and summary["errors"] == 1 and summary["balanced"]
    with open(tmp_path / "out" / "errors.csv", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert row["path"].endswith("bad_\\xff_bytes.png") and "not valid UTF-8" in row["reason"]


def test_manifest_header_with_spaces_and_non_utf8_manifest(phantom_dir, tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    src = next((phantom_dir / "benign").glob("*.png"))
    shutil.copy(src, root / "a.png")
    (root / "labels.csv").write_text("path, label\na.png, benign\n")
    listing = discover([str(root / "labels.csv")])
    assert len(listing.records) == 1 and listing.records[0]["label"] == 0 and not listing.errors
    (root / "latin1.csv").write_bytes("path,label\nré.png,benign\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"manifest .*latin1.csv: not UTF-8 text \(byte 12 is 0xe9\)"):
        discover([str(root / "latin1.csv")])


def test_cli_boundary_one_line_and_debug_traceback(tmp_path, train_data_dir, capsys, monkeypatch):
    # a checkpoint whose weights do not fit its backbone
    from mammo_ray.evaluate import run as evaluate_run

    def boom(*a, **k):
        raise RuntimeError("size mismatch for head.weight:\ncopying a param with shape ...")

    monkeypatch.setattr(evaluate_run, "run_evaluate", boom)
    argv = ["evaluate", "--checkpoint", "c.pt", "--data", str(train_data_dir), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mammo-ray evaluate: error: RuntimeError: size mismatch for head.weight: "
                          "(run with --debug for the traceback; full log: ") and "\n" not in err
    log = Path(err.rsplit("full log: ", 1)[1].rstrip(")")).read_text()
    assert "Traceback" in log and "copying a param with shape" in log  # the traceback is kept in the log file
    with pytest.raises(RuntimeError, match="size mismatch"):
        main(["--debug", *argv])


def test_malicious_checkpoint_message_never_suggests_weights_only_false(tmp_path, phantom_dir, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "mammo_ray.checkpoint", "x": Evil()}, evil)
    assert main(["explain", str(phantom_dir), "--checkpoint", str(evil), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "arbitrary code" in err and "posix.system" in err and "weights_only set to False" not in err
    assert not (tmp_path / "pwned").exists()


def test_listing_follows_symlinked_folders_once_and_counts_what_it_skips(phantom_dir, tmp_path, monkeypatch):
    from mammo_ray import io as mio

    raw = tmp_path / "raw"
    shutil.copytree(phantom_dir / "benign", raw / "benign")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(phantom_dir / "malignant", elsewhere)
    os.symlink(elsewhere, raw / "malignant")             # archives assembled from links
    os.symlink(raw, raw / "benign" / "loop")              # a link back up the tree
    shutil.copy(next((raw / "benign").glob("*.png")), raw / "benign" / ".hidden.png")
    (raw / "benign" / ".cache").mkdir()
    (raw / "benign" / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root reads every folder, so the refusal is simulated
    listing = discover([str(raw)])
    n_ben, n_mal = len(list((phantom_dir / "benign").iterdir())), len(list((phantom_dir / "malignant").iterdir()))
    assert len(listing.records) == n_ben + n_mal
    assert sum(r["label"] for r in listing.records) == n_mal
    assert listing.skipped == {"hidden file": 1, "hidden folder": 1,
                               "folder already listed through another path (symlink)": 1}
    (err,) = listing.errors
    assert err["path"].endswith("locked") and err["reason"].startswith("unreadable folder: PermissionError")
    report: dict = {}
    assert len(list(mio.list_files(str(raw), report))) == n_ben + n_mal


def test_sweep_killed_by_the_memory_monitor_ends_in_one_line_naming_resume(ray_local, train_data_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """Tune's controller raising what Ray raises when its memory monitor kills trial workers:
    the driver ends with one line naming the cause and the --resume command."""
    from ray import tune

    def fit(self):
        raise RuntimeError("Caught unexpected exception: 2 worker(s) were killed due to the node running low on "
                           "memory.\n" + "traceback line\n" * 150)

    monkeypatch.setattr(tune.Tuner, "fit", fit)
    out = tmp_path / "sweep"
    code = main(["tune", "--data", str(train_data_dir), "--out", str(out), "--backbones", "simplecnn",
                 "--pretrained", "none", "--freeze-ratios", "0", "--lr-bounds", "1e-4:1e-3", "--epochs", "1"])
    assert code == 1
    err = error_text(capsys.readouterr().err)  # log records before it are their own lines
    assert len(err.splitlines()) == 1, err
    assert "memory monitor killed trial workers" in err and f"--out {out} --resume" in err


def test_a_labels_csv_inside_an_input_folder_is_named_on_the_console(tmp_path, caplog):
    """A folder's labels come from its class folders; a labels.csv beside them is not read, and
    the user is told so (it used to be only a count in summary.json)."""
    from mammo_ray.data.inputs import discover

    (tmp_path / "benign").mkdir()
    (tmp_path / "benign" / "a.png").write_bytes(b"x")
    (tmp_path / "labels.csv").write_text("path,label\nbenign/a.png,malignant\n")
    with caplog.at_level("WARNING"):
        listing = discover([str(tmp_path)])
    assert listing.ignored == {".csv": 1} and [r["label"] for r in listing.records] == [0]
    assert f"{tmp_path / 'labels.csv'} is not read" in caplog.text and "give the CSV itself as the input" in caplog.text
