"""Issue 27 "your own archive, first try" and issue 26's empty inputs: manifests as hospital
exports write them (absolute paths, paths outside the manifest's folder), labels as archives
write them (a vocabulary, ``normal`` negative by default), inputs that list nothing and runs that
write nothing end non-zero, and the console names the top reasons of the refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mammo_ray.cli import main
from mammo_ray.config import LabelMap, PreprocessConfig
from mammo_ray.data.accounting import reason_kind, refusal_lines
from mammo_ray.data.inputs import discover
from mammo_ray.data.pipeline import run_preprocess
from mammo_ray.data.synth import write_phantoms
from mammo_ray.outputs import OutputLocationError
from tests.conftest import error_text


def _absolute_manifest(raw: Path, at: Path) -> Path:
    """A hospital-export style manifest: absolute image paths, in a folder of its own."""
    lines = (raw / "labels.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    at.mkdir(parents=True, exist_ok=True)
    manifest = at / "subset.csv"
    manifest.write_text("\n".join([header] + [f"{raw / r.split(',', 1)[0]},{r.split(',', 1)[1]}" for r in rows]) + "\n")
    return manifest


@pytest.mark.slow
def test_absolute_path_manifest_of_200_images_preprocesses_200_rows(ray_local, tmp_path):
    """The issue's first step: 200 images named by absolute paths in a manifest kept elsewhere.
    On main every row was refused ("escapes the manifest's folder") and the run exited 0."""
    raw = tmp_path / "raw"
    write_phantoms(str(raw), 200, seed=3, height=96, width=80, formats=("png8",))
    manifest = _absolute_manifest(raw, tmp_path / "exports")
    assert str(raw) in manifest.read_text().splitlines()[1]
    out = tmp_path / "data"
    assert main(["preprocess", str(manifest), "--out", str(out), "--size", "32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["rows"], summary["errors"]) == (200, 200, 0)


def test_manifest_rows_all_refused_exit_nonzero_with_the_top_reasons(ray_local, tmp_path, capsys):
    """Every row refused: the run fails (it exited 0 on main), and the console shows the top 3
    kinds of reason with their counts, per-file details folded so one cause is one count."""
    (tmp_path / "m").mkdir()
    rows = [f"gone/{i}.png,benign" for i in range(5)] + [f"x{i}.png,unsure" for i in range(3)]
    rows += ["a.png,maybe", "b.png,perhaps"]  # two more label words: still the one kind of reason
    (tmp_path / "m" / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = main(["preprocess", str(tmp_path / "m" / "labels.csv"), "--out", str(out), "--size", "32"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "refused 10 of 10 input(s)" in err
    assert "  5 x file listed in the manifest not found" in err
    # three label words, one kind of reason: one line with their total
    assert "  5 x label '…' is not in the label vocabulary" in err
    assert "mammo-ray preprocess: error: no row written: all 10 input(s) were refused" in err
    assert json.loads((out / "summary.json").read_text())["errors"] == 10  # the accounting is still written


@pytest.mark.parametrize("kind", ["header-only manifest", "blank rows", "empty folder"])
def test_inputs_that_list_nothing_are_refused_before_any_output(tmp_path, capsys, kind):
    """Issue 26: these gave rc 0 and "inputs=0 rows=0" with no warning."""
    if kind == "empty folder":
        given = tmp_path / "empty"
        given.mkdir()
    else:
        given = tmp_path / "m.csv"
        given.write_text("path,label\n" + (",\n , \n,,\n" if kind == "blank rows" else ""))
    out = tmp_path / "out"
    assert main(["preprocess", str(given), "--out", str(out)]) == 2
    err = error_text(capsys.readouterr().err)
    assert err.startswith(f"mammo-ray preprocess: error: no input image in {given}"), err
    assert not out.exists()


def test_a_manifest_row_inside_out_is_refused(tmp_path):
    """Rows may point anywhere now, so --out is checked against each: a row inside --out (by an
    absolute path or by ``..``) would make the run's outputs its inputs."""
    out = tmp_path / "out"
    (out / "benign").mkdir(parents=True)
    (out / "benign" / "a.png").write_bytes(b"x")
    (tmp_path / "m").mkdir()
    for row in (str(out / "benign" / "a.png"), "../out/benign/a.png"):
        (tmp_path / "m" / "labels.csv").write_text(f"path,label\n{row},benign\n")
        with pytest.raises(OutputLocationError, match="contains the input"):
            run_preprocess([str(tmp_path / "m" / "labels.csv")], str(out), PreprocessConfig.load(size=32))


def test_label_vocabulary_reads_normal_and_takes_the_users_words(tmp_path):
    """``normal`` is negative by default, in a manifest and as a class folder; --positive /
    --negative replace the words of their class; a word in both classes is refused; BI-RADS
    numbers beside 0/1 are refused with the hint rather than read as cancer 0/1."""
    for cls in ("normal", "malignant", "cancer"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        (tmp_path / "f" / cls / "a.png").write_bytes(b"x")
    listing = discover([str(tmp_path / "f")])
    assert sorted((Path(r["path"]).parent.name, r["label"]) for r in listing.records) == [
        ("cancer", 1), ("malignant", 1), ("normal", 0)] and not listing.errors
    (tmp_path / "m.csv").write_text("path,label\nf/normal/a.png,Normal\nf/cancer/a.png,4\nf/malignant/a.png,5\n")
    assert "label '4' is not in the label vocabulary" in discover([str(tmp_path / "m.csv")]).errors[0]["reason"]
    birads = LabelMap(negative=("1", "2", "3", "normal"), positive=("4", "5"))
    assert sorted(r["label"] for r in discover([str(tmp_path / "m.csv")], labels=birads).records) == [0, 1, 1]
    with pytest.raises(ValueError, match="1 is both positive"):
        LabelMap(negative="1,2", positive="1")
    (tmp_path / "b.csv").write_text("path,label\nf/normal/a.png,1\nf/cancer/a.png,4\n")
    with pytest.raises(ValueError, match="label values 4 beside 1 look like BI-RADS"):
        discover([str(tmp_path / "b.csv")])
    # score and explain never refuse a label: unknown words are unlabeled, counted by word
    listing = discover([str(tmp_path / "m.csv")], labels_optional=True)
    assert sorted(r["label"] for r in listing.records) == [-1, -1, 0] and listing.unknown_labels == {"4": 1, "5": 1}


def test_labels_in_yaml_and_flags_merge_and_are_recorded(tmp_path):
    """A ``labels:`` map in the YAML, a flag overriding one class of it, and the mapping as
    preprocess.yaml records it."""
    (tmp_path / "p.yaml").write_text("labels:\n  negative: [benign, normal, '0']\n  positive: [malignant, '1', 'yes']\n")
    cfg = PreprocessConfig.load(str(tmp_path / "p.yaml"), labels={"negative": "no,benign"})
    assert cfg.labels == LabelMap(negative=("no", "benign"), positive=("malignant", "1", "yes"))
    from mammo_ray.config import to_dict
    import yaml

    assert yaml.safe_load(yaml.safe_dump(to_dict(cfg)))["labels"] == {"negative": ["no", "benign"],
                                                                      "positive": ["malignant", "1", "yes"]}
    with pytest.raises(ValueError, match="unknown key"):
        PreprocessConfig.load(None, labels={"positives": ["x"]})


def test_reason_kinds_fold_per_file_details():
    assert reason_kind("manifest path '/a/1.jpg' not found") == reason_kind("manifest path '/b/2.jpg' not found")
    assert reason_kind("image 20x30 is smaller than min_side 32") == "image NxN is smaller than min_side N"
    lines = refusal_lines(["a 1", "a 2", "b", "c", "d", "d"], 9, where="out/errors.csv")
    assert lines == ["refused 6 of 9 input(s) (each with its reason in out/errors.csv):", "  2 x a N", "  2 x d",
                     "  1 x b", "  1 more, for 1 other reason(s)"]
    assert refusal_lines([], 3, where="x") == []


@pytest.mark.skipif(not Path("/work/shared/data/mini-mias-part1/labels.csv").exists(), reason="real set absent")
def test_mini_mias_labels_read_normal_as_negative():
    """The real film set's manifest: 103 normal, 33 benign, 24 malignant, none refused."""
    listing = discover(["/work/shared/data/mini-mias-part1/labels.csv"])
    labels = [r["label"] for r in listing.records]
    assert not listing.errors and (labels.count(0), labels.count(1)) == (136, 24)
