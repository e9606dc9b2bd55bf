"""Output folders never overlap inputs, and a run deletes only what a run wrote (issue: the
adversarial pass's "preprocess --overwrite deletes the user's source images")."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from mammo_ray.cli import main
from mammo_ray.data.pipeline import PREPROCESS_OUTPUTS, _written_by_preprocess
from mammo_ray.outputs import (MARKER, OutputLocationError, check_out_location, clear_owned, inside,
                               write_marker)
from tests.conftest import error_text


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) with its content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def manifest_with_split_folders(phantom_dir, tmp_path) -> Path:
    """The adversarial case: a manifest whose images live in ``train/`` and ``val/`` sub-folders
    of the manifest's own folder (the layout many public sets ship in)."""
    root = tmp_path / "dataset"
    lines = ["path,label"]
    for i, src in enumerate(sorted((phantom_dir / "benign").glob("*.png"))[:4] +
                            sorted((phantom_dir / "malignant").glob("*.png"))[:4]):
        split = "train" if i % 2 == 0 else "val"
        dst = root / split / f"img{i}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        lines.append(f"{split}/img{i}.png,{src.parent.name}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_preprocess_overwrite_never_deletes_manifest_sources(manifest_with_split_folders, capsys):
    root = manifest_with_split_folders
    before = _tree_digest(root)
    for extra in ([], ["--overwrite"]):
        code = main(["preprocess", str(root / "labels.csv"), "--out", str(root), "--size", "32", *extra])
        assert code == 2
        err = capsys.readouterr().err
        assert "contains the input" in err and len(err.strip().splitlines()) == 1, err
    assert _tree_digest(root) == before  # every source byte still there


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_every_stage_refuses_out_overlapping_inputs(where, phantom_dir, train_data_dir, trained_checkpoint,
                                                    tmp_path, capsys):
    """A source inside every output location a user could name: each stage refuses before work."""
    raw = tmp_path / "raw"
    shutil.copytree(phantom_dir, raw)
    data = tmp_path / "data"
    shutil.copytree(train_data_dir, data)

    def place(folder: Path) -> str:
        return {"same": str(folder), "inside": str(folder / "benign" / "out"), "around": str(folder.parent)}[where]

    runs = {
        "preprocess": ["preprocess", str(raw), "--out", place(raw), "--overwrite"],
        "explain": ["explain", str(raw), "--checkpoint", str(trained_checkpoint), "--out", place(raw), "--resume"],
        "train": ["train", "--data", str(data), "--out", place(data), "--backbone", "simplecnn"],
        "lr-find": ["lr-find", "--data", str(data), "--out", place(data), "--backbone", "simplecnn"],
        "tune": ["tune", "--data", str(data), "--out", place(data), "--backbones", "simplecnn"],
        "evaluate": ["evaluate", "--checkpoint", str(trained_checkpoint), "--data", str(data), "--out", place(data)],
        "evaluate-external": ["evaluate", "--checkpoint", str(trained_checkpoint), "--data", str(train_data_dir),
                              "--external", str(raw), "--out", place(raw)],
    }
    before = {"raw": _tree_digest(raw), "data": _tree_digest(data)}
    for name, argv in runs.items():
        assert main(argv) == 2, name
        err = error_text(capsys.readouterr().err)  # the error is one line; log records are their own
        # "same": --out is the input run itself, refused by the output rule before the overlap check
        assert len(err.splitlines()) == 1 and ("inside the input" in err or "contains the input" in err
                                               or (where == "same" and "holds a mammo-ray" in err)), (name, err)
    assert {"raw": _tree_digest(raw), "data": _tree_digest(data)} == before


def test_synth_refuses_a_folder_of_other_images(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "benign").mkdir(parents=True)
    (mine / "benign" / "000_000000.png").write_bytes(b"a user's image")
    assert main(["synth", "--out", str(mine), "--n", "4"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (mine / "benign" / "000_000000.png").read_bytes() == b"a user's image"
    # its own folder may be rewritten, with --overwrite (the one output rule)
    fresh = tmp_path / "fresh"
    assert main(["synth", "--out", str(fresh), "--n", "4", "--height", "128", "--width", "104"]) == 0
    assert main(["synth", "--out", str(fresh), "--n", "4", "--height", "128", "--width", "104"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth", "--out", str(fresh), "--n", "2", "--height", "128", "--width", "104", "--overwrite"]) == 0
    assert len(list(fresh.rglob("*.png")) + list(fresh.rglob("*.dcm"))) == 2  # the 4 earlier phantoms replaced


def test_out_that_is_a_file_is_refused_on_every_subcommand(tmp_path, train_data_dir, trained_checkpoint, capsys):
    f = tmp_path / "a-file"
    f.write_text("keep me")
    for argv in (["preprocess", str(train_data_dir), "--out", str(f)],
                 ["train", "--data", str(train_data_dir), "--out", str(f)],
                 ["lr-find", "--data", str(train_data_dir), "--out", str(f)],
                 ["tune", "--data", str(train_data_dir), "--out", str(f)],
                 ["evaluate", "--checkpoint", str(trained_checkpoint), "--data", str(train_data_dir), "--out", str(f)],
                 ["explain", str(train_data_dir), "--checkpoint", str(trained_checkpoint), "--out", str(f)],
                 ["score", str(train_data_dir), "--checkpoint", str(trained_checkpoint), "--out", str(f)],
                 ["synth", "--out", str(f), "--n", "2"],
                 ["demo", "--out", str(f)]):
        assert main(argv) == 2, argv
        err = error_text(capsys.readouterr().err)
        assert len(err.splitlines()) == 1 and "is an existing file" in err, (argv, err)
    assert f.read_text() == "keep me"


def test_overwrite_refuses_a_dataset_laid_out_like_an_output(tmp_path, phantom_dir, capsys):
    """``train/ val/ test/`` without the project's marker are a user's data set, never cleared."""
    raw = tmp_path / "raw"
    shutil.copytree(phantom_dir, raw)
    out = tmp_path / "looks-like-output"
    for split in ("train", "val"):
        (out / split).mkdir(parents=True)
        (out / split / "part-0123456789abcdef0123.parquet").write_bytes(b"not ours")
    before = _tree_digest(out)
    assert main(["preprocess", str(raw), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "not written by mammo-ray preprocess" in err and "nothing is deleted" in err
    assert _tree_digest(out) == before


def test_overwrite_keeps_files_the_user_added_and_deletes_nothing(tmp_path, phantom_dir, ray_local, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(phantom_dir, raw)
    out = tmp_path / "out"
    assert main(["preprocess", str(raw), "--out", str(out), "--size", "32"]) == 0
    capsys.readouterr()
    marker = json.loads((out / MARKER).read_text())
    assert marker["stage"] == "preprocess" and marker["complete"]
    assert any(f.startswith("train/part-") for f in marker["files"]) and "summary.json" in marker["files"]
    (out / "train" / "my-notes.png").write_bytes(b"a file the user put there")
    before = _tree_digest(out)
    assert main(["preprocess", str(raw), "--out", str(out), "--size", "32", "--overwrite"]) == 2
    assert "my-notes.png" in capsys.readouterr().err
    assert _tree_digest(out) == before  # refused before anything was deleted

    (out / "train" / "my-notes.png").unlink()
    assert main(["preprocess", str(raw), "--out", str(out), "--size", "48", "--overwrite"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 60 and summary["balanced"]


def test_overwrite_of_a_run_that_died_removes_only_project_parts(tmp_path, train_data_dir):
    """A killed run never listed its files: its parts are recognised by their Parquet metadata."""
    out = tmp_path / "died"
    shutil.copytree(train_data_dir, out)
    write_marker(str(out), "preprocess")  # started, never finished
    (out / "summary.json").unlink()
    (out / "val" / ".part-0123456789abcdef0123.parquet.tmp-77").write_bytes(b"half a part")
    removed = clear_owned(str(out), "preprocess", PREPROCESS_OUTPUTS, owned=_written_by_preprocess)
    assert removed and not any((out / s).exists() for s in ("train", "val", "test"))
    # a Parquet part of the right name but without the project's metadata is not ours
    (out / "train").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), out / "train" / "part-0123456789abcdef0123.parquet")
    with pytest.raises(OutputLocationError, match="not written by mammo-ray preprocess"):
        clear_owned(str(out), "preprocess", PREPROCESS_OUTPUTS, owned=_written_by_preprocess)
    assert (out / "train" / "part-0123456789abcdef0123.parquet").exists()


def test_explain_out_inside_its_input_refused_so_resume_cannot_reingest(tmp_path, phantom_dir, trained_checkpoint,
                                                                       capsys):
    raw = tmp_path / "raw"
    shutil.copytree(phantom_dir, raw)
    code = main(["explain", str(raw), "--checkpoint", str(trained_checkpoint), "--out", str(raw / "explained")])
    assert code == 2 and "inside the input folder" in capsys.readouterr().err
    assert not (raw / "explained").exists()


@pytest.mark.parametrize("path,root,expected", [
    ("/a/b", "/a", True), ("/a", "/a", True), ("/ab", "/a", False), ("/a/../b", "/a", False),
    ("s3://bkt/x/y", "s3://bkt/x", True), ("s3://bkt/xy", "s3://bkt/x", False), ("s3://bkt/x/", "s3://bkt/x", True),
])
def test_inside(path, root, expected):
    assert inside(path, root) is expected


def test_symlinked_out_into_input_is_refused(tmp_path, phantom_dir):
    raw = tmp_path / "raw"
    shutil.copytree(phantom_dir, raw)
    link = tmp_path / "link-to-raw"
    os.symlink(raw, link)
    with pytest.raises(OutputLocationError, match="input folder"):
        check_out_location(str(link), folders=[str(raw)])


# ----------------------------------------------------------------------------- one output rule (issue 26 serious 1,
# issue 27 defect 4): an --out holding any run is refused unless --overwrite (same stage) or --resume
@pytest.fixture
def run_copy(trained_checkpoint, tmp_path) -> Path:
    """A copy of the trained fixture's folder, as `mammo-ray train` leaves it (best.pt, last.pt, metrics.json...)."""
    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, run)
    return run


def test_evaluate_and_score_refuse_the_training_run_they_read(run_copy, train_data_dir, phantom_dir, tmp_path, capsys):
    """`evaluate --out <its checkpoint's folder>` overwrote the training run's metrics.json."""
    before = _tree_digest(run_copy)
    ckpt = str(run_copy / "best.pt")
    for argv in (["evaluate", "--checkpoint", ckpt, "--data", str(train_data_dir), "--out", str(run_copy)],
                 ["evaluate", "--checkpoint", ckpt, "--data", str(train_data_dir), "--out", str(run_copy), "--overwrite"],
                 ["score", str(phantom_dir), "--checkpoint", ckpt, "--out", str(run_copy)],
                 ["explain", str(phantom_dir), "--checkpoint", ckpt, "--out", str(run_copy), "--resume"]):
        assert main(argv) == 2, argv
        err = error_text(capsys.readouterr().err)
        assert len(err.splitlines()) == 1 and "holds a mammo-ray train run" in err, (argv, err)
    assert _tree_digest(run_copy) == before


def test_train_refuses_an_existing_run_without_resume(run_copy, train_data_dir, capsys):
    """`train --out <existing run>` silently replaced best.pt and last.pt."""
    before = _tree_digest(run_copy)
    argv = ["train", "--data", str(train_data_dir), "--out", str(run_copy), "--backbone", "simplecnn", "--epochs", "1",
            "--max-batches", "1"]
    assert main(argv) == 2
    err = error_text(capsys.readouterr().err)
    assert err == (f"mammo-ray train: error: --out {run_copy} already holds a mammo-ray train run (best.pt, last.pt, "
                   "config.yaml, history.csv): pass --overwrite to replace it or --resume to continue it, or use "
                   "another folder"), err
    assert _tree_digest(run_copy) == before


@pytest.mark.slow
def test_rerun_of_evaluate_is_refused_and_overwrite_replaces_only_its_files(trained_checkpoint, train_data_dir,
                                                                            tmp_path, capsys):
    """Rerunning `evaluate --out eval` silently deleted the earlier results (issue 27, defect 4)."""
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(trained_checkpoint), "--data", str(train_data_dir), "--out", str(out),
            "--n-boot", "20"]
    assert main(argv) == 0
    capsys.readouterr()
    marker = json.loads((out / MARKER).read_text())
    assert marker["stage"] == "evaluate" and marker["complete"] and "metrics.json" in marker["files"]
    (out / "my-notes.txt").write_text("the user's")
    before = _tree_digest(out)
    assert main(argv) == 2
    err = error_text(capsys.readouterr().err)
    assert len(err.splitlines()) == 1 and "already holds a mammo-ray evaluate run" in err and "--overwrite" in err
    assert _tree_digest(out) == before
    # another stage into it: refused whatever the flags
    assert main(["preprocess", str(train_data_dir), "--out", str(out), "--overwrite"]) == 2
    assert "holds a mammo-ray evaluate run" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "my-notes.txt").read_text() == "the user's"  # not the earlier run's: kept
    assert json.loads((out / MARKER).read_text())["complete"]


def test_a_run_folder_without_marker_is_recognised_by_its_files(tmp_path):
    from mammo_ray.outputs import OutputInUseError, claim_out, held_run

    for name, stage in (("preprocess.yaml", "preprocess"), ("score.yaml", "score"), ("sweep.yaml", "tune"),
                        ("last.pt", "train"), ("report.md", "evaluate"), ("summary.json", "unknown")):
        folder = tmp_path / stage
        folder.mkdir()
        (folder / name).write_bytes(b"x")
        assert held_run(str(folder)) == (stage, name)
        with pytest.raises(OutputInUseError, match="holds a mammo-ray"):
            claim_out(str(folder), "explain", overwrite=True)
    assert held_run(str(tmp_path / "nowhere")) is None
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("not a run")
    assert claim_out(str(tmp_path / "user"), "evaluate") is None


# ----------------------------------------------------------------------------- refused runs leave --out as it was
def test_refused_evaluate_leaves_no_out_behind(train_data_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(train_data_dir),
                 "--out", str(out)]) == 2
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(train_data_dir),
                 "--out", str(existing)]) == 2
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]  # no marker, no lock left


def test_train_with_overflowing_lr_is_refused_naming_the_field(train_data_dir, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", "--data", str(train_data_dir), "--out", str(out), "--backbone", "simplecnn",
                 "--base-lr", "1e300", "--max-lr", "1e301"]) == 2
    err = error_text(capsys.readouterr().err)
    assert err.startswith("mammo-ray train: error: base_lr=1e+300: use a learning rate in (0, 10]"), err
    assert len(err.splitlines()) == 1 and not out.exists()
    assert main(["tune", "--data", str(train_data_dir), "--out", str(out), "--lr-bounds", "1e-4:1e301"]) == 2
    assert "max_lr" in capsys.readouterr().err and not out.exists()


def _disk_full_after(n_bytes: int):
    """An ``open`` whose files take ``n_bytes`` and then fail as a full disk does (ENOSPC)."""
    import builtins
    import errno

    class Full:
        def __init__(self, f):
            self.f, self.left = f, n_bytes

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    return fake_open


def test_a_write_that_fills_the_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    """A disk-full write left a 0-byte `.best.pt.tmp-<pid>` (and `.errors.csv.tmp-<pid>`) behind."""
    import errno

    from mammo_ray import io as mio

    (tmp_path / "best.pt").write_bytes(b"the earlier checkpoint")
    monkeypatch.setattr(mio, "open", _disk_full_after(0), raising=False)
    for name in ("best.pt", "errors.csv"):
        with pytest.raises(OSError) as err:
            mio.write_bytes(str(tmp_path / name), b"new bytes")
        assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    assert (tmp_path / "best.pt").read_bytes() == b"the earlier checkpoint"


def test_overwrite_counts_temp_files_of_an_interrupted_write_as_ours(tmp_path):
    from mammo_ray.outputs import finish_out, start_out

    out = tmp_path / "o"
    start_out(str(out), "lr-find")
    (out / "lr_find.json").write_text("{}")
    finish_out(str(out), "lr-find")
    (out / ".lr_find.png.tmp-4242").write_bytes(b"")  # a killed run's half write
    (out / "notes.txt").write_text("the user's")
    start_out(str(out), "lr-find", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "notes.txt"]


def test_disk_full_in_preprocess_workers_is_one_error_per_image(tmp_path, phantom_dir):
    """Parts that cannot be written become errors.csv lines with the cause, not worker tracebacks."""
    import pandas as pd

    from mammo_ray.config import PreprocessConfig
    from mammo_ray.data import pipeline

    records = pipeline.discover([str(phantom_dir)]).records[:3]
    for r in records:
        r.update(split="train", patient_id="p", exam_id="", laterality="", view="")
    import builtins
    original = builtins.open
    try:
        pipeline.mio.open = _disk_full_after(0)  # the task runs here (process_batch is a plain function)
        frame = pipeline.process_batch(pd.DataFrame(records), cfg=PreprocessConfig.load(size=32), out=str(tmp_path))
    finally:
        del pipeline.mio.open
    assert builtins.open is original
    assert (frame["status"] == "error").all()
    assert set(frame["reason"]) == {"writing train/ failed: No space left on device"}
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
