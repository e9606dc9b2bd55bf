"""The evaluation stage end to end: phantoms -> preprocess -> small sweep -> evaluate on test and an
external set with another acquisition look; the report opens in headless Chromium."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from mammo_ray.cli import main
from mammo_ray.config import PreprocessConfig
from mammo_ray.data.parquet import read_split
from mammo_ray.data.pipeline import run_preprocess
from mammo_ray.data.synth import write_phantoms
from mammo_ray.evaluate.run import run_evaluate, sweep_checkpoints
from tests.conftest import REPO, open_in_chromium

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep_dir(phantom_sweep):
    """The session's 4-trial phantom sweep (conftest.phantom_sweep): two groups, freezing 0 and
    0.5, so two best checkpoints to evaluate and compare."""
    out, summary, _ = phantom_sweep
    assert summary["errors"] == 0
    return out


@pytest.fixture(scope="module")
def external_raw(tmp_path_factory) -> Path:
    """Another 'site': other seed, lower contrast, more noise, other formats (raw images)."""
    out = tmp_path_factory.mktemp("external-raw")
    write_phantoms(str(out), 40, seed=77, height=256, width=208, contrast=0.8, noise=1.5,
                   formats=("dcm-rle", "jpg", "dcm-mono1"))
    return out


def test_end_to_end_report(ray_local, sweep_dir, train_data_dir, external_raw, tmp_path):
    out = tmp_path / "eval"
    ckpts = sweep_checkpoints(str(sweep_dir))
    assert len(ckpts) == 2
    report = run_evaluate(ckpts, data=str(train_data_dir), externals=[str(external_raw)], out=str(out), n_boot=200)
    for name in ("metrics.json", "report.md", "report.html"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["checkpoints"]) == 2
    for ck in metrics["checkpoints"]:
        assert set(ck["sets"]) == {"test", f"external-{external_raw.name}"}
        assert ck["threshold"]["chosen_on"] == "val"
        ext = ck["sets"][f"external-{external_raw.name}"]
        assert ext["how"] == "preprocessed here with the checkpoint's spec"
        for res in ck["sets"].values():
            m, ci = res["metrics"], res["ci"]
            assert ci["_resampled"] == "patients"  # phantom DICOMs/manifests carry patient ids
            for key in ("roc_auc", "accuracy"):
                assert ci[key]["low"] <= m[key] + 1e-9 and m[key] - 1e-9 <= ci[key]["high"]
            # the threshold chosen on val is the one applied: recount from the scores file
            with open(out / "scores" / ck["tag"] / f"{'test' if res['split'] == 'test' else 'external-' + external_raw.name}.csv") as f:
                rows = list(csv.DictReader(f))
            t = ck["threshold"]["threshold"]
            tp = sum(1 for r in rows if int(r["label"]) == 1 and float(r["probability"]) >= t)
            assert tp == res["confusion"]["tp"] and len(rows) == res["n"]
        # the external set was preprocessed with the checkpoint's spec
        from mammo_ray.data.parquet import read_spec
        from mammo_ray.config import PreprocessSpec, from_mapping

        assert read_spec(ext["source"]) == from_mapping(PreprocessSpec, ck["spec"])
    # both checkpoints share one spec: the external set was preprocessed once, not once each
    assert len({ck["sets"][f"external-{external_raw.name}"]["source"] for ck in metrics["checkpoints"]}) == 1
    assert [p.name for p in (out / "preprocessed").iterdir()] == [f"external-{external_raw.name}"]
    figures = list((out / "figures").glob("*.png"))
    assert len(figures) == 2 * (3 + 2)  # per checkpoint: ROC, PR, reliability + 2 confusion matrices
    assert report["checkpoints"][0]["sets"]["test"]["metrics"]["roc_auc"] is not None
    # the chosen checkpoint against the other, paired on each set's images, in metrics.json and the report
    from mammo_ray.evaluate.report import chosen_by_val

    chosen = chosen_by_val(metrics)
    pairs = {c["set"]: c for c in metrics["comparisons"]}
    assert set(pairs) == {"test", f"external-{external_raw.name}"}
    for name, c in pairs.items():
        by_tag = {ck["tag"]: ck["sets"][name]["metrics"]["roc_auc"] for ck in metrics["checkpoints"]}
        other = next(t for t in by_tag if t != chosen)
        assert (c["chosen"], c["other"], c["resampled"]) == (chosen, other, "patients")
        assert c["delta"] == pytest.approx(by_tag[chosen] - by_tag[other], abs=1e-9)
        assert c["low"] is not None and c["low"] <= c["high"] and 0 <= c["delong_p"] <= 1 and c["delong_clustered"]
    assert "## Paired comparisons" in (out / "report.md").read_text()
    assert "id='comparisons'" in (out / "report.html").read_text()


def test_report_html_opens_in_headless_chromium(ray_local, sweep_dir, train_data_dir, tmp_path):
    out = tmp_path / "eval"
    run_evaluate(sweep_checkpoints(str(sweep_dir))[:1], data=str(train_data_dir), externals=[], out=str(out), n_boot=50)
    artefacts = REPO / "artifacts"
    artefacts.mkdir(exist_ok=True)
    shot = artefacts / "report.png"
    shot.unlink(missing_ok=True)
    dom = open_in_chromium(out / "report.html", shot, tmp_path / "chrome")
    assert shot.stat().st_size > 20_000
    assert "id=\"paper-table\"" in dom
    assert dom.count("data:image/png;base64,") == 4  # ROC, PR, reliability, 1 confusion: self-contained


def test_unlabeled_external_gets_scores_and_no_metrics(ray_local, sweep_dir, train_data_dir, external_raw, tmp_path):
    ext = tmp_path / "unlabeled"
    run_preprocess([str(external_raw)], str(ext), PreprocessConfig.load(size=96, external=True, unlabeled=True))
    report = run_evaluate(sweep_checkpoints(str(sweep_dir))[:1], data=str(train_data_dir), externals=[str(ext)],
                          out=str(tmp_path / "eval"), n_boot=50)
    res = report["checkpoints"][0]["sets"]["external-unlabeled"]
    assert res["metrics"] is None and "no label" in res["reason"]
    assert (tmp_path / "eval" / "scores").rglob("external-unlabeled.csv")


def test_one_class_set_reports_undefined_auc(ray_local, sweep_dir, train_data_dir, tmp_path):
    one = tmp_path / "benign-only"
    shutil.copytree(train_data_dir, one)
    for f in (one / "test").glob("*.parquet"):
        t = pq.read_table(f)
        pq.write_table(t.filter(pc.equal(t["label"], 0)), f)
    report = run_evaluate(sweep_checkpoints(str(sweep_dir))[:1], data=str(one), externals=[], out=str(tmp_path / "e"),
                          n_boot=50)
    res = report["checkpoints"][0]["sets"]["test"]
    assert res["metrics"]["roc_auc"] is None and "one class" in res["undefined"]["roc_auc"]
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["checkpoints"][0]["sets"]["test"]["metrics"]["roc_auc"] is None


def test_spec_mismatch_is_an_error_unless_allowed(ray_local, sweep_dir, train_data_dir, external_raw, tmp_path, capsys):
    other = tmp_path / "other-spec"
    run_preprocess([str(external_raw)], str(other), PreprocessConfig.load(size=96, external=True, equalize="global"))
    ckpt = sweep_checkpoints(str(sweep_dir))[0]
    code = main(["evaluate", "--checkpoint", ckpt, "--data", str(train_data_dir), "--external", str(other),
                 "--out", str(tmp_path / "e"), "--n-boot", "20"])
    err = capsys.readouterr().err
    assert code == 2 and "equalize 'global' (data) vs 'clahe' (checkpoint)" in err and "--allow-spec-mismatch" in err
    # the refused run had prepared the external set in --out: its rerun there replaces it
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(train_data_dir), "--external", str(other),
                 "--out", str(tmp_path / "e"), "--n-boot", "20", "--allow-spec-mismatch", "--overwrite"]) == 0


def test_bad_checkpoints_and_externals(ray_local, train_data_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    import torch

    torch.save({"state_dict": {}}, foreign)
    assert main(["evaluate", "--checkpoint", str(foreign), "--data", str(train_data_dir), "--out", str(tmp_path / "e")]) == 2
    assert "not a mammo_ray checkpoint" in capsys.readouterr().err
    assert main(["evaluate", "--sweep", str(tmp_path), "--data", str(train_data_dir), "--out", str(tmp_path / "e")]) == 2
    assert "no best/ folder" in capsys.readouterr().err

def test_external_folder_without_parquet_or_images(ray_local, sweep_dir, train_data_dir, tmp_path, capsys):
    empty = tmp_path / "empty-ext"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    ckpt = sweep_checkpoints(str(sweep_dir))[0]
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(train_data_dir), "--external", str(empty),
                 "--out", str(tmp_path / "e"), "--n-boot", "20"]) == 2
    assert "an empty folder, a manifest without rows" in capsys.readouterr().err


def test_distributed_scoring_matches_in_process(ray_local, sweep_dir, train_data_dir):
    import torch

    from mammo_ray.evaluate.inference import score_split
    from mammo_ray.models.checkpoint import load_checkpoint, model_from_checkpoint
    from mammo_ray.models.normalization import checkpoint_normalization
    from mammo_ray.data.arrays import load_split

    ckpt = sweep_checkpoints(str(sweep_dir))[0]
    state = load_checkpoint(ckpt)
    model = model_from_checkpoint(state)
    arrays = load_split(str(train_data_dir), "test")
    kw = dict(norm=checkpoint_normalization(state), device=torch.device("cpu"), checkpoint=ckpt, folder=str(train_data_dir), split="test")
    local = score_split(model, arrays, distributed="never", **kw)
    remote = score_split(model, arrays, distributed="always", **kw)
    assert remote.shape == local.shape == (len(arrays),)
    np.testing.assert_allclose(remote, local, atol=1e-5)
    # test-time augmentation reaches the actors too
    local_tta = score_split(model, arrays, distributed="never", tta="vflip", **kw)
    assert not np.allclose(local_tta, local, atol=1e-4)
    np.testing.assert_allclose(score_split(model, arrays, distributed="always", tta="vflip", **kw), local_tta, atol=1e-5)


def test_tta_from_the_command_line(ray_local, sweep_dir, train_data_dir, tmp_path, capsys):
    """`--tta vflip`: val (the threshold) and test are both scored as the mean over the image and
    its vertical flip, and the report says so."""
    import torch

    from mammo_ray.data.arrays import load_split
    from mammo_ray.metrics import choose_threshold
    from mammo_ray.models.inference import load_for_inference, predict

    ckpt = sweep_checkpoints(str(sweep_dir))[0]
    out = tmp_path / "e"
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(train_data_dir), "--out", str(out), "--n-boot", "20",
                 "--tta", "vflip"]) == 0
    m = load_for_inference(ckpt, device="cpu")
    kw = dict(norm=m.norm, device=torch.device("cpu"), tta="vflip")
    test, val = load_split(str(train_data_dir), "test"), load_split(str(train_data_dir), "val")
    want = dict(zip(test.image_ids, predict(m.model, test, **kw)))
    with open(out / "scores" / Path(ckpt).parent.name / "test.csv") as f:
        got = {r["image_id"]: float(r["probability"]) for r in csv.DictReader(f)}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[i] for i in want], list(want.values()), atol=2e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    thr = choose_threshold(val.labels, predict(m.model, val, **kw), method="youden")["threshold"]
    assert metrics["tta"] == "vflip" and metrics["checkpoints"][0]["threshold"]["threshold"] == pytest.approx(thr, abs=1e-6)
    assert "Test-time augmentation `vflip`" in (out / "report.md").read_text()
    assert "Test-time augmentation vflip" in (out / "report.html").read_text()


def test_external_set_preprocessed_once_per_spec(monkeypatch, tmp_path):
    """Checkpoints sharing a spec reuse one preprocessed copy; another spec gets its own folder."""
    import mammo_ray.evaluate.run as evaluate_run
    from mammo_ray.config import PreprocessSpec
    from mammo_ray.evaluate.run import prepare_external

    calls = []
    monkeypatch.setattr(evaluate_run, "run_preprocess", lambda inputs, dest, cfg, overwrite: calls.append((dest, cfg.spec))
                        or {"rows": 3})
    raw = tmp_path / "films"
    raw.mkdir()
    cache: dict = {}
    a, b = PreprocessSpec(size=64), PreprocessSpec(size=96)
    first = prepare_external(str(raw), a, str(tmp_path / "eval"), "external-films", cache)
    again = prepare_external(str(raw), a, str(tmp_path / "eval"), "external-films", cache)
    other = prepare_external(str(raw), b, str(tmp_path / "eval"), "external-films", cache)
    assert first == again and first[0] != other[0]
    assert [c[1] for c in calls] == [a, b]  # once per spec
    assert first[0].endswith("preprocessed/external-films") and other[0].startswith(first[0] + "-")


def test_breast_and_exam_level_aggregation():
    from mammo_ray.evaluate.run import _set_result

    labels = np.array([0, 0, 1, 1, 0, 0])
    scores = np.array([0.1, 0.3, 0.9, 0.2, 0.4, 0.35])
    groups = ["p1", "p1", "p2", "p2", "p3", "p3"]
    meta = [{"laterality": lat} for lat in ("L", "L", "R", "R", "L", "R")]
    res = _set_result(labels, scores, groups, meta, threshold=0.5, n_boot=0, seed=0)
    exam = res["aggregated"]["exam_max"]
    # exam max: p1 0.3 (benign), p2 0.9 (malignant), p3 0.4 (benign) -> perfectly separated
    assert exam["roc_auc"] == 1.0
    breast = res["aggregated"]["breast_mean"]
    assert breast["roc_auc"] == 1.0  # p2-R mean 0.55 above every benign breast mean


def test_two_sweeps_groups_of_the_same_name_keep_their_own_scores(ray_local, sweep_dir, train_data_dir, tmp_path):
    """Two sweeps (pretrained and random init, as benchmarks/realdata.py runs them) each have
    best/<backbone>-r<ratio>/checkpoint.pt: the second checkpoint's scores and figures must not
    overwrite the first's."""
    src = sweep_checkpoints(str(sweep_dir))[0]
    group = Path(src).parent.name
    ckpts = []
    for sweep in ("sweep-imagenet", "sweep-random"):
        dst = tmp_path / sweep / "best" / group / "checkpoint.pt"
        dst.parent.mkdir(parents=True)
        shutil.copy(src, dst)
        ckpts.append(str(dst))
    out = tmp_path / "eval"
    report = run_evaluate(ckpts, data=str(train_data_dir), externals=[], out=str(out), n_boot=50)
    tags = [ck["tag"] for ck in report["checkpoints"]]
    assert tags == [group, f"sweep-random_{group}"]
    for ck in report["checkpoints"]:
        rows = list(csv.DictReader(open(out / "scores" / ck["tag"] / "test.csv")))
        assert len(rows) == ck["sets"]["test"]["n"]
    assert len(list((out / "figures").glob("*.png"))) == 2 * (3 + 1)
    # the same weights twice: the paired comparison finds no difference at all
    (pair,) = report["comparisons"]
    assert pair["set"] == "test" and pair["n"] == report["checkpoints"][0]["sets"]["test"]["n"]
    assert pair["delta"] == pair["low"] == pair["high"] == 0 and pair["delong_p"] == 1.0


def test_checkpoint_tags_stay_distinct(tmp_path, monkeypatch):
    from mammo_ray.evaluate.run import _checkpoint_tag

    monkeypatch.chdir(tmp_path)
    state = {"backbone": "resnet18", "freeze_ratio": 0.5}
    taken: dict[str, str] = {}
    tags = [_checkpoint_tag(state, p, taken) for p in
            ("x/sweep-a/best/g/checkpoint.pt", "x/sweep-b/best/g/checkpoint.pt", "runs/a.pt", "runs/b.pt",
             "x/sweep-a/best/g/checkpoint.pt", "one.pt", "two.pt", "y/sweep-b/best/g/checkpoint.pt")]
    assert tags == ["g", "sweep-b_g", "runs", "runs_b", "g-2", "resnet18-r0.5", "resnet18-r0.5_two", "g-3"]
    assert sorted(taken) == sorted(tags) and taken["runs_b"] == str(tmp_path / "runs" / "b.pt")
    assert _checkpoint_tag(state, "/checkpoint.pt", {}) == "resnet18-r0.5"  # at the root: no folder name


def probs_of(out: Path, tag: str, name: str) -> dict[str, float]:
    with open(out / "scores" / tag / f"{name}.csv") as f:
        return {r["image_id"]: float(r["probability"]) for r in csv.DictReader(f)}


def test_ensemble_of_two_sweeps_from_the_command_line(ray_local, sweep_dir, train_data_dir, external_raw, tmp_path,
                                                      capsys):
    """`--sweep A B --ensemble`: both sweeps' groups, plus the mean of their probabilities
    evaluated as one model (its own val threshold and val AUC, scores, figures, comparisons)."""
    other = tmp_path / "sweep-b"
    shutil.copytree(sweep_dir, other)
    out = tmp_path / "eval"
    assert main(["evaluate", "--sweep", str(sweep_dir), str(other), "--data", str(train_data_dir), "--external",
                 str(external_raw), "--out", str(out), "--ensemble", "--n-boot", "50"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    cks = {ck["tag"]: ck for ck in metrics["checkpoints"]}
    assert len(cks) == 5 and cks["ensemble"]["members"] == [t for t in cks if t != "ensemble"]
    ens = cks["ensemble"]
    assert ens["freeze_ratio"] is None and ens["threshold"]["chosen_on"] == "val"
    assert 0 <= ens["train_metrics"]["val_auc"] <= 1
    for name in ("test", f"external-{external_raw.name}"):
        def probs(tag, name=name):
            with open(out / "scores" / tag / f"{name}.csv") as f:
                return {r["image_id"]: float(r["probability"]) for r in csv.DictReader(f)}

        members = [probs(t) for t in ens["members"]]
        mean = probs("ensemble")
        assert set(mean) == set(members[0]) and len(mean) == ens["sets"][name]["n"]
        for iid, p in mean.items():
            assert p == pytest.approx(sum(m[iid] for m in members) / len(members), abs=2e-6)
    assert len(metrics["comparisons"]) == 4 * 2  # the chosen one against the 4 others, on 2 sets
    # breast and exam results for the ensemble too, from the mean probabilities
    agg = ens["sets"]["test"]["aggregated"]
    assert set(agg) == set(cks[ens["members"][0]]["sets"]["test"]["aggregated"]) == {
        "breast_max", "breast_mean", "exam_max", "exam_mean"}
    rows = read_split(str(train_data_dir), "test", columns=["image_id", "patient_key", "label"]).to_pandas()
    rows["p"] = rows["image_id"].map(probs_of(out, "ensemble", "test"))
    exams = rows.dropna(subset=["patient_key"]).groupby("patient_key").agg(label=("label", "max"), p=("p", "max"))
    assert agg["exam_max"]["roc_auc"] == pytest.approx(roc_auc_score(exams["label"], exams["p"]), abs=1e-3)
    report = (out / "report.md").read_text()
    assert "| ensemble |" in report and "mixed" in report  # the members have ratios 0 and 0.5
    printed = capsys.readouterr().out
    # the console's short summary: a line per checkpoint and set, the paired differences; the table stays in the report
    assert "ensemble (val AUC" in printed and " minus " in printed and "report.md" in printed
    assert "| ensemble |" not in printed and "sens@90%spec" not in printed and "## " not in printed


def test_ensemble_needs_two_checkpoints_of_the_same_images(ray_local, sweep_dir, train_data_dir, tmp_path):
    ck = sweep_checkpoints(str(sweep_dir))[0]
    with pytest.raises(ValueError, match="--ensemble needs 2 or more checkpoints; got 1"):
        run_evaluate([ck], data=str(train_data_dir), externals=[], out=str(tmp_path / "e"), n_boot=0, ensemble=True)
    from mammo_ray.evaluate.compare import mean_scores

    a = (["x", "y"], np.array([0, 1]), np.array([0.2, 0.8]), [None, None])
    b = (["y", "z"], np.array([1, 0]), np.array([0.6, 0.1]), [None, None])
    with pytest.raises(ValueError, match="member 2 scored other images of test than member 1"):
        mean_scores([a, b], "test")
    ids, labels, mean, _ = mean_scores([a, (["y", "x"], np.array([1, 0]), np.array([0.6, 0.4]), [None, None])], "test")
    assert ids == ["x", "y"] and mean.tolist() == pytest.approx([0.3, 0.7])
