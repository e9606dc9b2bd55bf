"""A preprocessed phantom set for training tests (made once per session)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory, _ray_session) -> Path:
    """300 phantoms (256x208, four formats) preprocessed to 96x96 uint8 with CLAHE."""
    import ray

    from mammo_ray.config import PreprocessConfig
    from mammo_ray.data.pipeline import run_preprocess
    from mammo_ray.data.synth import write_phantoms
    from mammo_ray.ray_utils import init_ray

    raw = tmp_path_factory.mktemp("train-phantoms")
    write_phantoms(str(raw), 300, seed=11, height=256, width=208)
    out = tmp_path_factory.mktemp("train-data") / "data"
    if not ray.is_initialized():
        init_ray(num_cpus=2)
    summary = run_preprocess([str(raw)], str(out), PreprocessConfig.load(size=96, ratios=(0.7, 0.2, 0.1)))
    assert summary["rows"] == 300
    return out
