"""An existing Ray head started with `ray start` (loopback): RAY_ADDRESS makes the job use it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, wait_for_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on 127.0.0.1; terminating it stops this head only."""
    import shutil
    import tempfile

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: AF_UNIX paths are <= 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        if not wait_for_port(port, timeout=60, proc=proc):
            pytest.fail(f"ray start failed: {(tmp_path / 'head.log').read_text()[-2000:]}")
        yield address, env
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
    address, env = ray_head
    env = {**env, "RAY_ADDRESS": address}
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "preprocess.py"), str(phantom_dir),
                        "--out", str(tmp_path / "out"), "--size", "32"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"connecting to the Ray cluster at {address}" in r.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["balanced"] and summary["rows"] == 60
    # the work ran on the head's node (not on a Ray of the job's own)
    probe = "import json, ray; ray.init(address='%s'); print(json.dumps([n['NodeID'] for n in ray.nodes()]))" % address
    nodes = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert nodes.returncode == 0, nodes.stderr[-2000:]
    assert set(summary["nodes"]) == set(json.loads(nodes.stdout.strip().splitlines()[-1]))
