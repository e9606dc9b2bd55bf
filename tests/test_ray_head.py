"""An existing Ray head started with `ray start` (loopback): RAY_ADDRESS makes the job use it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_ports, wait_for_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 with its dashboard (the job server of `ray job
    submit`) on 127.0.0.1 too, shared by this module's tests; terminating it stops this head
    only. Yields (GCS address, dashboard URL, environment)."""
    import shutil
    import tempfile

    port, dashboard, agent, metrics, runtime_env = free_ports(5)  # distinct: two equal ports failed `ray start`
    tmp_path = tmp_path_factory.mktemp("ray-head")
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: AF_UNIX paths are <= 107 bytes
    # auth off on this loopback-only head (and for the CLI talking to it); the job's `python`
    # is the one on the head's PATH: the venv's, so the job has the project's dependencies
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             # own agent ports: the defaults (52365...) belong to the test
                             # session's local Ray, and a job needs this head's agent
                             f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
                             f"--runtime-env-agent-port={runtime_env}",
                             "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        if not wait_for_port(port, timeout=60, proc=proc):
            pytest.fail(f"ray start failed: {(tmp_path / 'head.log').read_text()[-2000:]}")
        if not wait_for_port(dashboard, timeout=60, proc=proc):
            pytest.fail(f"the dashboard did not start: {(tmp_path / 'head.log').read_text()[-2000:]}")
        yield address, f"http://127.0.0.1:{dashboard}", env
    finally:
        # the head's gcs/raylet/workers share the process group started for it: stop all
        # of them (and nothing else: no `ray stop`, which would hit every Ray on the machine)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_runs_on_the_cluster_named_by_ray_address(ray_head, phantom_dir, tmp_path):
    address, _, env = ray_head
    env = {**env, "RAY_ADDRESS": address}
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "preprocess.py"), str(phantom_dir),
                        "--out", str(tmp_path / "out"), "--size", "32"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"connecting to the Ray cluster at {address}" in r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["balanced"] and summary["rows"] == 60
    # the work ran on the head's node (not on a Ray of the job's own)
    probe = "import json, ray; ray.init(address='%s'); print(json.dumps([n['NodeID'] for n in ray.nodes()]))".replace("%s", address)
    nodes = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert nodes.returncode == 0, nodes.stderr[-2000:]
    assert set(summary["nodes"]) == set(json.loads(nodes.stdout.strip().splitlines()[-1]))


def _submit(dashboard: str, env: dict, job_id: str, entrypoint: list[str]) -> str:
    """`ray job submit --working-dir .` (blocking: it streams the job's logs); returns them."""
    import time

    deadline = time.monotonic() + 90
    while True:
        r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", job_id,
                            "--working-dir", ".", "--", *entrypoint],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        # the head's job agent comes up a few seconds after its dashboard port opens
        if "No available agent to submit job" not in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", dashboard, job_id],
                            capture_output=True, text=True, env=env, timeout=120)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, (status.stdout + status.stderr)[-2000:]
    return r.stdout + r.stderr


def test_ray_job_submit_preprocess_and_explain(ray_head, phantom_dir, trained_checkpoint, tmp_path):
    """The stage scripts as submitted jobs: the repo uploaded as the working dir, run by the
    head's job server, outputs checked; nothing listens beyond loopback meanwhile."""
    from tests.conftest import listening_beyond_loopback

    _, dashboard, env = ray_head
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    logs = _submit(dashboard, env, "mammo-preprocess", ["python", "jobs/preprocess.py", str(phantom_dir),
                                                        "--out", str(tmp_path / "data"), "--size", "64"])
    assert "inputs=60 rows=60 errors=0" in logs
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["balanced"] and summary["rows"] == 60

    logs = _submit(dashboard, env, "mammo-explain", ["python", "jobs/explain.py", str(phantom_dir),
                                                     "--checkpoint", str(trained_checkpoint),
                                                     "--out", str(tmp_path / "explain"), "--preview-size", "64"])
    assert "inputs=60 rows=60 errors=0" in logs
    summary = json.loads((tmp_path / "explain" / "summary.json").read_text())
    assert summary["balanced"] and summary["rows"] == 60
    assert len(list((tmp_path / "explain" / "overlays").rglob("*.png"))) == 60
    assert listening_beyond_loopback() == []


def test_credentials_already_in_a_jobs_runtime_env_are_not_forwarded_twice(monkeypatch):
    from mammo_ray.ray_utils import credential_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert {"AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL"} <= set(credential_env())
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"AWS_ACCESS_KEY_ID": "a"}}}))
    forwarded = credential_env()
    assert "AWS_ACCESS_KEY_ID" not in forwarded and forwarded["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
