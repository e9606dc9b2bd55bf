"""Object stores that never answer, and schemes that are not supported.

The silent store is a socket server on 127.0.0.1 that accepts every connection and never
sends a byte: S3 reaches it through ``AWS_ENDPOINT_URL``, GCS through ``STORAGE_EMULATOR_HOST``
(an emulator endpoint, anonymous, as Google's clients read it). Each command runs in a child
process with a short configured timeout; the outer subprocess timeout is a generous bound
that keeps a regression from hanging CI, not a timed assertion.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mammo_ray import io as mio
from mammo_ray import stores
from mammo_ray.cli import main
from mammo_ray.ray_utils import credential_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def silent_store():
    """``http://127.0.0.1:PORT`` of a server that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:  # closed at teardown
                return
            held.append(conn)  # kept open, never read nor answered

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}", held
    stop.set()
    srv.close()
    for conn in held:
        conn.close()


def _run_cli(argv: list[str], env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "STORAGE_EMULATOR", "CLOUD_STORAGE", "MAMMO_RAY_REMOTE", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(REPO), MAMMO_RAY_LOG_DIR=str(tmp_path / "logs"), MAMMO_RAY_REMOTE_TIMEOUT="1",
               MAMMO_RAY_REMOTE_ATTEMPTS="1", **env_extra)
    # 180 s: a generous bound only (the command ends in about the configured 1-2 s plus start-up);
    # without the fix s3 retried for 99 s and gs for 15 minutes
    return subprocess.run([sys.executable, "-m", "mammo_ray.cli", *argv], capture_output=True, text=True,
                          timeout=180, env=env, cwd=tmp_path)


@pytest.mark.parametrize("command,uri", [
    ("preprocess", "s3://bucket/images"),
    ("preprocess", "gs://bucket/images"),
    ("score", "s3://bucket/best.pt"),
    ("score", "gs://bucket/best.pt"),
])
def test_a_store_that_never_answers_ends_in_one_line(command, uri, silent_store, tmp_path):
    endpoint, held = silent_store
    env = ({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_DEFAULT_REGION": "us-east-1"} if uri.startswith("s3") else {"STORAGE_EMULATOR_HOST": endpoint})
    if command == "preprocess":
        argv = ["preprocess", uri, "--out", str(tmp_path / "out")]
    else:  # score reads its checkpoint first: here it lies on the silent store, as the archive does
        (tmp_path / "archive").mkdir()
        argv = ["score", str(tmp_path / "archive"), "--checkpoint", uri, "--out", str(tmp_path / "out")]
    proc = _run_cli(argv, env, tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert err[0].startswith(f"mammo-ray {command}: error: {uri}: no answer from the store within "), err[0]
    assert "MAMMO_RAY_REMOTE_TIMEOUT" in err[0]
    assert held, "the command never reached the silent store"


@pytest.mark.parametrize("bad", ["ftp://host/images", "hdfs://namenode/images", "http://host/images.csv",
                                 "S3://bucket/images"])
@pytest.mark.parametrize("where", ["input", "out"])
def test_an_unsupported_scheme_is_refused_up_front(bad, where, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    argv = (["preprocess", bad, "--out", str(tmp_path / "out")] if where == "input"
            else ["preprocess", str(tmp_path / "in"), "--out", bad])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    scheme = bad.split("://")[0]
    assert err == (f"mammo-ray preprocess: error: {bad}: scheme {scheme!r} is not supported: use a local path or "
                   "s3://, gs://, gcs://, file://"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no local "ftp:" folder, no --out


@pytest.mark.parametrize("name,value", [("MAMMO_RAY_REMOTE_TIMEOUT", "soon"), ("MAMMO_RAY_REMOTE_TIMEOUT", "0"),
                                        ("MAMMO_RAY_REMOTE_TIMEOUT", "nan"), ("MAMMO_RAY_REMOTE_ATTEMPTS", "0"),
                                        ("MAMMO_RAY_REMOTE_ATTEMPTS", "2.5")])
def test_remote_settings_refuse_bad_values_naming_the_variable(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        mio.resolve("s3://bucket/x")


def test_store_settings_reach_the_workers_and_key_the_cache(monkeypatch):
    monkeypatch.setenv("MAMMO_RAY_REMOTE_TIMEOUT", "7")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    env = credential_env()
    assert env["MAMMO_RAY_REMOTE_TIMEOUT"] == "7" and env["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:1"
    assert stores.settings() == (7.0, 3)
    before = mio._env_key()
    monkeypatch.setenv("MAMMO_RAY_REMOTE_TIMEOUT", "8")
    assert mio._env_key() != before  # a filesystem built with other timeouts is not reused
