"""GPU scheduling without a GPU: Ray's logical GPUs (``num_gpus=4`` on a CPU machine) make Ray
assign GPU ids and set CUDA_VISIBLE_DEVICES for each trial and actor exactly as on a GPU node.
What is checked: how many trials or actors a node packs, which ids each one gets, and that a
process given GPUs but no CUDA falls back to the CPU with one warning line."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from mammo_ray.cli import main
from mammo_ray.config import ExplainConfig, SweepConfig
from mammo_ray.explain.job import run_explain
from mammo_ray.train.sweep import run_sweep
from tests.conftest import copies_archive

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture(scope="module")
def ray_gpus():
    """A local Ray on loopback with 4 logical CPUs and 2 logical GPUs (the session's 2-CPU Ray
    is shut down first; the ray_local fixture restarts it when needed)."""
    import ray

    from mammo_ray.ray_utils import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=4, num_gpus=2)
    yield ray
    ray.shutdown()


def _sweep(data: Path, out: Path, ratios: tuple[float, ...], gpus: float) -> list[dict]:
    cfg = SweepConfig(backbones=("simplecnn",), freeze_ratios=ratios, lr_bounds=((1e-3, 1e-2),), epochs=2,
                      batch_size=64, cpus_per_trial=1, gpus_per_trial=gpus, train={"max_batches": 3, "pretrained": "none"})
    summary = run_sweep(str(data), str(out), cfg)
    assert summary["errors"] == 0
    return summary["results"]


def _disjoint_while_overlapping(rows: list[dict]) -> None:
    """Trials that ran at the same time on one node hold disjoint GPU ids."""
    for a in rows:
        for b in rows:
            overlap = float(a["started_at"]) < float(b["finished_at"]) and float(b["started_at"]) < float(a["finished_at"])
            if a is not b and overlap and a["node_id"] == b["node_id"]:
                assert not set(a["gpu_ids"].split(",")) & set(b["gpu_ids"].split(",")), (a, b)


def _most_at_once(rows: list[dict]) -> int:
    """The largest number of trials whose [started, finished] intervals overlap."""
    events = sorted([(float(r["started_at"]), 1) for r in rows] + [(float(r["finished_at"]), -1) for r in rows])
    now = top = 0
    for _, step in events:
        now += step
        top = max(top, now)
    return top


def test_half_a_gpu_per_trial_packs_four_trials_two_per_gpu(ray_gpus, train_data_dir, tmp_path):
    rows = _sweep(train_data_dir, tmp_path / "s", (0.0, 0.25, 0.5, 0.75), 0.5)
    assert len(rows) == 4 and _most_at_once(rows) == 4, [(r["started_at"], r["finished_at"]) for r in rows]
    ids = Counter(r["gpu_ids"] for r in rows)
    # each trial holds one GPU id; every id is shared by exactly one pair of trials
    assert sorted(ids) == ["0", "1"] and set(ids.values()) == {2}, ids
    assert {r["device"] for r in rows} == {"cpu"}  # no CUDA here: the CPU, not a crash


@pytest.mark.parametrize("gpus_per_worker", [1.0, 0.5])
def test_explain_actor_pool_gets_its_own_gpu_ids(ray_gpus, trained_checkpoint, phantom_dir, tmp_path, gpus_per_worker):
    archive = copies_archive(phantom_dir, tmp_path / "archive", 16)
    summary = run_explain([str(archive)], str(trained_checkpoint), str(tmp_path / "x"),
                          ExplainConfig(gpus_per_worker=gpus_per_worker, workers=2, batch_size=4, preview_size=64))
    assert summary["balanced"] and summary["rows"] == 16
    actors = list(summary["cam_workers"])  # "node/pid/gpus=<CUDA_VISIBLE_DEVICES>/device"
    gpus = {a.split("/")[1]: a.split("/")[2].removeprefix("gpus=") for a in actors}
    assert all(g and "," not in g for g in gpus.values()), actors  # one GPU id each, from Ray
    assert all(a.endswith("/cpu") for a in actors)  # the CPU fallback, no CUDA assumed
    per_id = Counter(gpus.values())
    assert max(per_id.values()) <= (1 if gpus_per_worker == 1 else 2), per_id  # 1 or 0.5 of a GPU each


def test_gpus_without_cuda_fall_back_to_cpu_with_one_warning(ray_gpus):
    @ray_gpus.remote(num_gpus=1, num_cpus=0)
    def probe():
        import io
        import os

        from mammo_ray.models import inference

        buf = io.StringIO()
        handler = logging.StreamHandler(buf)
        inference.logger.addHandler(handler)
        devices = [str(inference.resolve_device("auto")) for _ in range(3)]
        inference.logger.removeHandler(handler)
        return os.environ.get("CUDA_VISIBLE_DEVICES"), ray_gpus.get_gpu_ids(), devices, buf.getvalue()

    visible, ids, devices, log = ray_gpus.get(probe.remote())
    assert visible == ",".join(str(i) for i in ids) and len(ids) == 1
    assert devices == ["cpu"] * 3
    assert len(log.strip().splitlines()) == 1 and f"GPU(s) {visible} assigned" in log and "running on CPU" in log


def test_unplaceable_gpu_requests_are_refused_in_one_line_before_any_trial(ray_gpus, train_data_dir, trained_checkpoint,
                                                                          phantom_dir, tmp_path, capsys):
    code = main(["tune", "--data", str(train_data_dir), "--out", str(tmp_path / "w3"), "--backbones", "simplecnn",
                 "--workers", "3", "--gpus-per-worker", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "workers=3 x gpus_per_worker=1 = 3 GPUs, but the cluster has 2; use --workers 2 or fewer" in err, err
    for gpus, needle in (("8", "gpus_per_worker=8: no node has that many GPUs (largest node: 2)"),
                         ("1.5", "gpus_per_trial=1.5: use a fraction of one GPU")):
        out = tmp_path / f"s{gpus}"
        code = main(["tune", "--data", str(train_data_dir), "--out", str(out), "--backbones", "simplecnn",
                     "--gpus-per-trial", gpus])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
        assert not (out / "tune").exists()
    with pytest.raises(ValueError, match="gpus_per_worker=1.5"):
        ExplainConfig(gpus_per_worker=1.5)
    # more GPU actors than the node's GPUs: refused before any work on a local Ray
    with pytest.raises(ValueError, match="needs 5 GPU"):
        run_explain([str(phantom_dir)], str(trained_checkpoint), str(tmp_path / "x"),
                    ExplainConfig(gpus_per_worker=1, workers=5))
    assert not (tmp_path / "x").exists()


def test_multi_node_trials_land_where_the_gpus_are(train_data_dir, tmp_path):
    """A head without resources and two workers with 2 and 4 logical GPUs: 4 trials of 2 GPUs
    for 3 places, so one waits; they use both nodes, never more at once on a node than its GPUs
    hold, each with its own ids. (Whole GPUs on one node are the same bookkeeping: a sweep of
    1-GPU trials on the 2-GPU Ray ran 3 more trials for it.)"""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    small = cluster.add_node(num_cpus=4, num_gpus=2, node_ip_address="127.0.0.1")
    big = cluster.add_node(num_cpus=4, num_gpus=4, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        rows = _sweep(train_data_dir, tmp_path / "s", (0.0, 0.25, 0.5, 0.75), 2)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(rows) == 4 and {r["node_id"] for r in rows} == {small.node_id, big.node_id}, rows
    assert _most_at_once(rows) <= 3  # the fourth trial waited for a place
    for node, gpus in ((small, 2), (big, 4)):
        on_node = [r for r in rows if r["node_id"] == node.node_id]
        assert _most_at_once(on_node) <= gpus // 2
        assert all(len(r["gpu_ids"].split(",")) == 2 and max(map(int, r["gpu_ids"].split(","))) < gpus for r in on_node)
    _disjoint_while_overlapping(rows)
