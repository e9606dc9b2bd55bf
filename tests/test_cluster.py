"""Multi-node behaviour on a real ray.cluster_utils.Cluster (head + worker on loopback)."""
from __future__ import annotations

import pytest

import mammo_ray  # noqa: F401  (loopback-only environment before ray is imported)
from mammo_ray.config import PreprocessConfig
from mammo_ray.data.pipeline import run_preprocess
from tests.conftest import listening_beyond_loopback

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_preprocess_shards_across_both_nodes(two_node_cluster, phantom_dir, tmp_path):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    cfg = PreprocessConfig.load(size=48, batch_size=4)
    summary = run_preprocess([str(phantom_dir)], str(tmp_path / "out"), cfg)
    assert summary["balanced"] and summary["rows"] == 60
    assert len(summary["nodes"]) == 2, summary["nodes"]
    assert all(n >= 4 for n in summary["nodes"].values())  # each node did at least a batch
    assert listening_beyond_loopback() == []
