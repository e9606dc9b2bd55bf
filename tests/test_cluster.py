"""Multi-node behaviour on a real ray.cluster_utils.Cluster (a CPU-less head + two 2-CPU
workers, all on loopback): work spreads over both workers, and a worker node removed mid-job
loses nothing (``inputs == rows + errors``, every input once)."""
from __future__ import annotations

import time

import pandas as pd
import pytest

import mammo_ray  # noqa: F401  (loopback-only environment before ray is imported)
from mammo_ray.config import ExplainConfig, PreprocessConfig
from mammo_ray.data.pipeline import run_preprocess
from mammo_ray.explain.job import run_explain
from mammo_ray.explain.results import SCORES
from tests.conftest import (
    copies_archive,
    listening_beyond_loopback,
    node_of_pid,
    own_processes,
    remove_node_when,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_preprocess_shards_across_both_workers(ray_cluster, phantom_dir, tmp_path):
    _, workers = ray_cluster
    cfg = PreprocessConfig.load(size=48, batch_size=4)
    summary = run_preprocess([str(phantom_dir)], str(tmp_path / "out"), cfg)
    assert summary["balanced"] and summary["rows"] == 60
    assert set(summary["nodes"]) == {w.node_id for w in workers}, summary["nodes"]
    assert all(n >= 4 for n in summary["nodes"].values())  # each node did at least a batch
    assert listening_beyond_loopback() == []


def test_worker_removed_mid_preprocess_loses_nothing(ray_cluster, phantom_dir, tmp_path):
    cluster, workers = ray_cluster
    archive = copies_archive(phantom_dir, tmp_path / "archive", 400)
    (archive / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    removed: list = []
    thread = remove_node_when(cluster, lambda: len(list(out.rglob("part-*.parquet"))) >= 8,
                          lambda: workers[0], removed)
    summary = run_preprocess([str(archive)], str(out), PreprocessConfig.load(size=32, batch_size=4))
    thread.join(timeout=5)
    assert removed, "the job ended before a node could be removed"
    assert summary["balanced"] and (summary["inputs"], summary["rows"], summary["errors"]) == (401, 400, 1)
    ids = pd.concat([pd.read_parquet(p, columns=["image_id"]) for p in out.rglob("part-*.parquet")])["image_id"]
    assert len(ids) == 400 and ids.is_unique  # a re-run task rewrote its own file: no duplicate rows


def test_worker_removed_mid_explain_loses_nothing(ray_cluster, phantom_dir, trained_checkpoint, tmp_path):
    """The node holding the CAM actor goes away: the actor restarts on the other worker, lost
    blocks are recomputed, and every input ends with exactly one row or one error."""
    cluster, workers = ray_cluster
    archive = copies_archive(phantom_dir, tmp_path / "archive", 160)
    out = tmp_path / "out"

    busy_since: list[float] = []

    def actor_node():
        # the actor's process title ends in ".submit" while it works on a batch
        for pid in own_processes("CamActor", "MapWorker", ".submit"):  # this session's Cluster only
            busy_since.append(time.monotonic())
            if time.monotonic() - busy_since[0] > 2.0:  # a few batches in
                return node_of_pid(workers, pid)
        return None

    removed: list = []
    thread = remove_node_when(cluster, lambda: True, actor_node, removed)
    summary = run_explain([str(archive)], str(trained_checkpoint), str(out),
                          ExplainConfig(workers=1, batch_size=8, preview_size=64))
    thread.join(timeout=5)
    assert removed, "the job ended before the actor's node could be removed"
    assert summary["balanced"] and (summary["inputs"], summary["rows"], summary["errors"]) == (160, 160, 0)
    assert summary["duplicate_rows_removed"] == 0  # not a resume: a duplicate row would have failed the job
    scores = pd.read_parquet(out / SCORES)
    assert len(scores) == 160 and scores["image_id"].is_unique
    survivor = ({w.node_id for w in workers} - set(removed)).pop()
    assert survivor in set(scores["node_id"])  # the restarted actor finished the job elsewhere
