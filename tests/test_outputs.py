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
        assert len(err.splitlines()) == 1 and ("inside the input" in err or "contains the input" in err), (name, err)
    assert {"raw": _tree_digest(raw), "data": _tree_digest(data)} == before


def test_synth_refuses_a_folder_of_other_images(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "benign").mkdir(parents=True)
    (mine / "benign" / "000_000000.png").write_bytes(b"a user's image")
    assert main(["synth", "--out", str(mine), "--n", "4"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (mine / "benign" / "000_000000.png").read_bytes() == b"a user's image"
    # its own folder may be rewritten
    fresh = tmp_path / "fresh"
    assert main(["synth", "--out", str(fresh), "--n", "4", "--height", "128", "--width", "104"]) == 0
    assert main(["synth", "--out", str(fresh), "--n", "4", "--height", "128", "--width", "104"]) == 0


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
