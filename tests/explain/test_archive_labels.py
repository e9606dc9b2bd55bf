"""Issue 27 (labels as archives write them) and issue 26 (a resume after an input left) for the
archive jobs and evaluate's external sets: ``normal`` reads as negative, score and explain never
refuse an image for its label, ``--unlabeled`` reads none, the mapping is recorded with the
outputs, and ``--resume`` names the inputs that left and goes on."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mammo_ray.cli import main
from mammo_ray.config import ExplainConfig, ScoreConfig
from mammo_ray.explain.job import run_explain
from mammo_ray.explain.results import SCORES
from mammo_ray.explain.score import run_score


def _archive(phantom_dir: Path, root: Path, n: int, labels: list[str]) -> Path:
    """``n`` phantoms copied to ``root`` with a manifest whose label column reads ``labels``."""
    df = pd.read_csv(phantom_dir / "labels.csv").head(n)
    root.mkdir()
    for p in df["path"]:
        (root / Path(p).parent).mkdir(exist_ok=True)
        shutil.copy(phantom_dir / p, root / p)
    df["label"] = labels
    df[["path", "label", "patient_id", "laterality", "view"]].to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


@pytest.mark.slow
def test_score_reads_normal_as_negative_and_never_refuses_a_label(ray_local, trained_checkpoint, phantom_dir,
                                                                 tmp_path, capsys):
    """As the mini-MIAS manifest: ``normal`` rows are scored with label 0 (on main each was an
    error, "label 'normal'"); a word outside the vocabulary makes its image unlabeled, counted
    in summary.json, never an error; ``--unlabeled`` reads no label."""
    labels = ["normal"] * 4 + ["benign", "malignant", "Malignant", "birads-x"]
    manifest = _archive(phantom_dir, tmp_path / "films", 8, labels)
    out = tmp_path / "scored"
    assert main(["score", str(manifest), "--checkpoint", str(trained_checkpoint), "--out", str(out),
                 "--batch-size", "8"]) == 0
    assert "1 image(s) have a label outside the vocabulary" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (8, 8, 0)
    assert summary["unknown_labels"] == {"birads-x": 1}
    vocabulary = {"negative": ["benign", "normal", "0"], "positive": ["malignant", "cancer", "1"]}
    assert summary["labels"] == vocabulary
    assert yaml.safe_load((out / "score.yaml").read_text())["labels"] == vocabulary
    rows = pd.read_parquet(out / SCORES)
    by_name = dict(zip(rows["source_path"].map(lambda p: Path(p).name), rows["label"]))
    expected = {Path(p).name: {"normal": 0, "benign": 0, "malignant": 1, "birads-x": -1}[lab.lower()]
                for p, lab in zip(pd.read_csv(manifest)["path"], labels)}
    assert by_name == expected
    # a vocabulary of one's own, and --unlabeled
    out2 = tmp_path / "scored-unlabeled"
    assert main(["score", str(manifest), "--checkpoint", str(trained_checkpoint), "--out", str(out2),
                 "--unlabeled"]) == 0
    assert set(pd.read_parquet(out2 / SCORES)["label"]) == {-1}
    assert json.loads((out2 / "summary.json").read_text())["unlabeled"] is True


@pytest.mark.slow
@pytest.mark.parametrize("job", ["score", "explain"])
def test_resume_after_an_input_was_deleted_names_it_and_goes_on(ray_local, trained_checkpoint, phantom_dir,
                                                                tmp_path, job):
    """Issue 26: on main ``explain --resume`` after an input was deleted ended in "nothing-lost
    check failed ... unexpected=1" and rewrote summary.json with balanced: false."""
    root = tmp_path / "archive"
    _archive(phantom_dir, root, 6, ["benign"] * 6)
    (root / "labels.csv").unlink()  # a folder input: the deleted file simply is not listed again
    out = tmp_path / job
    run = (lambda resume: run_score([str(root)], str(trained_checkpoint), str(out), ScoreConfig(batch_size=8),
                                    resume=resume)) if job == "score" else (
        lambda resume: run_explain([str(root)], str(trained_checkpoint), str(out),
                                   ExplainConfig(batch_size=8, preview_size=64), resume=resume))
    first = run(False)
    assert first["rows"] == 6
    gone = sorted(root.rglob("*.png"))[0]
    overlay = None
    if job == "explain":
        row = pd.read_parquet(out / SCORES).set_index("source_path").loc[str(gone)]
        overlay = out / row["overlay_path"]
        assert overlay.exists()
    gone.unlink()
    again = run(True)
    assert again["balanced"] and (again["inputs"], again["rows"], again["errors"]) == (5, 5, 0)
    assert again["left"] == 1 and again["left_paths"] == [str(gone)]
    assert json.loads((out / "summary.json").read_text())["left_paths"] == [str(gone)]
    assert str(gone) not in set(pd.read_parquet(out / SCORES)["source_path"])
    if overlay is not None:
        assert not overlay.exists()


def test_evaluate_reads_an_external_manifest_with_normal_labels(ray_local, trained_checkpoint, train_data_dir,
                                                                phantom_dir, tmp_path):
    """The mini-MIAS case as an external set given raw to evaluate: ``normal`` is negative (on
    main the set's preprocessing refused those rows), and metrics.json records the mapping."""
    from mammo_ray.evaluate.run import run_evaluate

    phantoms = pd.read_csv(phantom_dir / "labels.csv")
    df = pd.concat([phantoms[phantoms["label"] == "benign"].head(7), phantoms[phantoms["label"] == "malignant"].head(5)])
    root = tmp_path / "films"
    root.mkdir()
    for p in df["path"]:
        (root / Path(p).parent).mkdir(exist_ok=True)
        shutil.copy(phantom_dir / p, root / p)
    df["label"] = ["normal"] * 5 + ["benign"] * 2 + ["malignant"] * 5
    df[["path", "label", "patient_id"]].to_csv(root / "labels.csv", index=False)
    out = tmp_path / "eval"
    report = run_evaluate([str(trained_checkpoint)], data=str(train_data_dir), externals=[str(root / "labels.csv")],
                          out=str(out), n_boot=0)
    ext = report["checkpoints"][0]["sets"]["external-films"]
    assert (ext["n"], ext["n_pos"], ext["n_neg"]) == (12, 5, 7), ext
    assert json.loads((out / "metrics.json").read_text())["labels"]["negative"] == ["benign", "normal", "0"]
