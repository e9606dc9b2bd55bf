"""Data-parallel runs on a real Ray: ``train --workers 2`` on Ray Train with the streamed
ingest, and a sweep whose trials each run 2 workers, locally and on a 2-node cluster."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mammo_ray.cli import main
from mammo_ray.config import TrainConfig
from mammo_ray.data.arrays import load_split
from mammo_ray.models.checkpoint import load_checkpoint
from mammo_ray.train.launch import run_distributed_train
from mammo_ray.train.sweep import run_sweep
from tests.train.test_sweep import read_results, small_sweep

pytestmark = pytest.mark.slow


def traced(folder: Path, epoch: int) -> list[list[str]]:
    """Each rank's image ids of one epoch, in the order it trained on them."""
    files = sorted(folder.glob(f"epoch{epoch}-rank*.txt"))
    return [f.read_text().split() for f in files]


@pytest.fixture(scope="module")
def tall_data(_ray_session, tmp_path_factory) -> Path:
    """80 phantoms preprocessed to non-square 16-bit rows (80 x 64, uint16), as full-field
    mammograms are stored: what the streamed path must train end to end."""
    from mammo_ray.config import PreprocessConfig
    from mammo_ray.data.pipeline import run_preprocess
    from mammo_ray.data.synth import write_phantoms
    from mammo_ray.ray_utils import init_ray

    init_ray(num_cpus=2)  # as train_data_dir: the session's local Ray, when no test has started it yet
    raw = tmp_path_factory.mktemp("tall-phantoms")
    write_phantoms(str(raw), 80, seed=5, height=200, width=160)
    out = tmp_path_factory.mktemp("tall-data") / "data"
    summary = run_preprocess([str(raw)], str(out), PreprocessConfig.load(size=(80, 64), dtype="uint16",
                                                                         ratios=(0.6, 0.3, 0.1)))
    assert summary["rows"] == 80
    return out


def test_two_streamed_workers_see_every_image_once_and_repeat_exactly(ray_local, tall_data, tmp_path):
    """`--workers 2 --ingest stream` on non-square 16-bit rows: Ray Data shards the split across
    2 gloo ranks. Every training image is trained on once per epoch by one rank; a second run
    with the same seed and worker count reads the same order and ends with the same weights;
    the val AUC the run recorded (each rank scored its shard) equals one process's AUC of the
    saved checkpoint."""
    from mammo_ray.models.checkpoint import model_from_checkpoint
    from mammo_ray.models.normalization import checkpoint_normalization
    from mammo_ray.train.loop import evaluate, make_loss

    train_data_dir = tall_data
    cfg = TrainConfig(backbone="simplecnn", pretrained="none", workers=2, cpus_per_worker=0.5, ingest="stream",
                      epochs=2, batch_size=8, patience=0, shuffle_buffer=16, device="cpu")
    ids = sorted(load_split(str(train_data_dir), "train").image_ids)
    runs = []
    for name in ("a", "b"):
        (tmp_path / f"trace-{name}").mkdir()
        result = run_distributed_train(cfg, str(train_data_dir), str(tmp_path / name), trace_dir=str(tmp_path / f"trace-{name}"))
        assert result["ingest"] == "stream" and len(json.loads(result["placement"])) == 2
        runs.append(result)
    for epoch in (1, 2):
        ranks = traced(tmp_path / "trace-a", epoch)
        assert len(ranks) == 2 and all(ranks)
        assert sorted(i for r in ranks for i in r) == ids, epoch  # once each: none twice, none left out
        assert ranks == traced(tmp_path / "trace-b", epoch)  # the same order, rank by rank
    assert traced(tmp_path / "trace-a", 1) != traced(tmp_path / "trace-a", 2)  # reshuffled each epoch
    assert [h["train_images"] for h in runs[0]["history"]] == [len(ids)] * 2
    a, b = (load_checkpoint(str(tmp_path / n / "last.pt")) for n in ("a", "b"))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    best = load_checkpoint(str(tmp_path / "a" / "best.pt"))
    model = model_from_checkpoint(best)
    assert best["spec"]["size"] == [80, 64] and best["spec"]["dtype"] == "uint16"
    val = load_split(str(train_data_dir), "val")
    single, _ = evaluate(model, val, norm=checkpoint_normalization(best), device=torch.device("cpu"),
                         loss_fn=make_loss(cfg, val, torch.device("cpu")), cfg=cfg)
    assert best["metrics"]["val_auc"] == pytest.approx(single["val_auc"], abs=1e-9)
    for name in ("best.pt", "last.pt", "history.csv", "config.yaml", "metrics.json"):
        assert (tmp_path / "a" / name).exists(), name


@pytest.mark.parametrize("argv,needle", [
    (["--workers", "0"], "workers=0: use a whole number of data-parallel workers in [1, 4096]"),
    (["--workers", "-2"], "workers=-2: use a whole number"),
    (["--accumulate", "0"], "accumulate=0: use a whole number of micro-batches per optimizer step"),
    (["--workers", "2", "--gpus-per-worker", "1"], "gpus_per_worker=1: no node has that many GPUs (largest node: 0)"),
    (["--workers", "2", "--ingest", "stream"], "needs 2 CPUs plus 1 for Ray Data's reads, but the cluster has 2"),
    (["--ingest", "stream", "--imbalance", "balanced_sampler"], "imbalance='balanced_sampler' with ingest='stream'"),
])
def test_bad_scale_flags_are_one_line_before_any_worker(argv, needle, ray_local, train_data_dir, tmp_path, capsys):
    code = main(["train", "--data", str(train_data_dir), "--out", str(tmp_path / "out"), "--backbone", "simplecnn",
                 "--pretrained", "none", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "ray_train").exists()


@pytest.mark.parametrize("train,val,workers,needle", [
    (3, 10, 2, "workers=2: the train split has 3 images, fewer than 2 per worker; use --workers 1 or fewer"),
    (40, 3, 4, "workers=4: the val split has 3 images, which leaves a worker with no validation rows; use --workers 3"),
])
def test_a_worker_count_the_split_cannot_feed_is_refused(train, val, workers, needle):
    from mammo_ray.train.ingest import SplitTotals
    from mammo_ray.train.launch import check_totals

    totals = {"train": SplitTotals(train, (train - 1, 1)), "val": SplitTotals(val, (val - 1, 1))}
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        check_totals("data", totals, workers)


def test_ingest_memory_refuses_a_split_that_cannot_fit(ray_local, train_data_dir, tmp_path, monkeypatch, capsys):
    """The in-memory ingest computes the split's need from the Parquet footers and refuses it
    up front, naming the need; auto streams the same split instead."""
    from mammo_ray import resources
    from mammo_ray.train.ingest import choose_ingest, read_totals

    monkeypatch.setattr(resources, "available_memory", lambda: 2_000_000)  # a 2 MB machine
    code = main(["train", "--data", str(train_data_dir), "--out", str(tmp_path / "out"), "--backbone", "simplecnn",
                 "--pretrained", "none", "--workers", "2", "--cpus-per-worker", "0.5", "--ingest", "memory"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--ingest memory" in err and "needs about" in err and "--ingest stream" in err, err
    spec, totals = read_totals(str(train_data_dir))
    assert choose_ingest(TrainConfig(backbone="simplecnn", pretrained="none"), str(train_data_dir), spec, totals) == "stream"


def _two_worker_sweep(data_dir: Path, out: Path, cpus_per_worker: float) -> list[dict]:
    summary = run_sweep(str(data_dir), str(out), small_sweep(workers=2, cpus_per_worker=cpus_per_worker, epochs=2,
                                                             lr_bounds=((1e-4, 1e-3),)))
    rows = read_results(out)
    assert summary["errors"] == 0 and len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    for r in rows:
        assert r["workers"] == "2" and r["epochs_run"] == "2"
        assert len(json.loads(r["placement"])) == 2  # where each of the trial's 2 workers ran
    return rows


def test_sweep_of_two_trials_of_two_workers(ray_local, train_data_dir, tmp_path):
    _two_worker_sweep(train_data_dir, tmp_path / "sweep", 0.5)


@pytest.mark.cluster
def test_sweep_of_two_worker_trials_on_a_two_node_cluster(ray_cluster, train_data_dir, tmp_path):
    """Each trial's two workers take a whole 2-CPU node (Ray Train's placement group), so the
    two trials run side by side on both nodes: the sweep spreads over the cluster, and
    results.csv records each trial's node (its rank 0's) and every worker's."""
    _, workers = ray_cluster
    rows = _two_worker_sweep(train_data_dir, tmp_path / "sweep", 1.0)
    assert {r["node_id"] for r in rows} == {w.node_id for w in workers}
    nodes = {n for r in rows for n, _ in json.loads(r["placement"])}
    assert nodes == {w.node_id[:12] for w in workers}
    for r in rows:  # a trial's workers share its node: one placement group, packed
        assert len({n for n, _ in json.loads(r["placement"])}) == 1
