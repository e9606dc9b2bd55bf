"""One run per --out (issue 26, serious 2): two runs writing one folder at once both ended
"nothing lost" while the folder mixed their rows. Real processes race for the lock, on local
disk and on the moto S3 server; a stale lock (its holder killed) is taken over with a warning."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mammo_ray.locks import LOCK, OutputLockedError, hold_out, is_stale
from tests.conftest import REPO, S3_BUCKET, error_text, s3_keys

BIN = Path(sys.executable).parent

# holds the lock of argv[1] until a line arrives on stdin
HOLDER = """
import sys
from mammo_ray.locks import hold_out
with hold_out(sys.argv[1], "preprocess"):
    print("held", flush=True)
    sys.stdin.readline()
"""

# waits for the file argv[2], then tries the lock of argv[1]; the winner holds it until argv[2].end exists
RACER = """
import os, sys, time
from mammo_ray.locks import OutputLockedError, hold_out
go = sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.005)
try:
    with hold_out(sys.argv[1], "preprocess"):
        print("got", flush=True)
        while not os.path.exists(go + ".end"):
            time.sleep(0.01)
except OutputLockedError as exc:
    print("refused", exc, flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _start_holder(out: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def _race(out: str, tmp_path: Path) -> list[str]:
    """Two processes released at once onto one --out: their first lines."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, out, str(go)], stdout=subprocess.PIPE, text=True,
                              env=_env()) for _ in range(2)]
    time.sleep(3)  # both imported and polling for the go file (not an assertion: a late one only races less)
    go.write_text("")
    lines = [p.stdout.readline().strip() for p in procs]
    Path(f"{go}.end").write_text("")
    for p in procs:
        assert p.wait(timeout=60) == 0
    return lines


def _second_run_is_refused(out: str, holder: subprocess.Popen, src: Path, capsys_err: str) -> None:
    err = error_text(capsys_err)
    assert len(err.splitlines()) == 1, err
    assert (f"is in use by another mammo-ray preprocess run on host {socket.gethostname()}, pid {holder.pid}, "
            "started 20") in err, err


def test_two_processes_on_one_local_out(tmp_path, phantom_dir):
    out = tmp_path / "out"
    lines = _race(str(out), tmp_path)
    assert sorted(x.split(" ")[0] for x in lines) == ["got", "refused"], lines
    assert not out.exists()  # the winner made the folder for its lock and removed it, empty, on release

    holder = _start_holder(str(out))
    try:
        proc = subprocess.run([str(BIN / "mammo-ray"), "preprocess", str(phantom_dir), "--out", str(out), "-q"],
                              capture_output=True, text=True, env=_env(), timeout=120)
        assert proc.returncode == 2
        _second_run_is_refused(str(out), holder, phantom_dir, proc.stderr)
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # the refused run wrote nothing
    finally:
        holder.communicate("done\n", timeout=30)
    assert not out.exists()  # released (the holder's folder, empty again)


def test_two_processes_on_one_s3_out(s3_server, tmp_path, phantom_dir):
    out = f"s3://{S3_BUCKET}/runs/a"
    lines = _race(out, tmp_path)
    assert sorted(x.split(" ")[0] for x in lines) == ["got", "refused"], lines
    assert s3_keys(s3_server, "runs/") == []  # released

    holder = _start_holder(out)
    try:
        assert s3_keys(s3_server, "runs/") == [f"runs/a/{LOCK}"]
        proc = subprocess.run([str(BIN / "mammo-ray"), "preprocess", str(phantom_dir), "--out", out, "-q"],
                              capture_output=True, text=True, env=_env(), timeout=120)
        assert proc.returncode == 2
        _second_run_is_refused(out, holder, phantom_dir, proc.stderr)
    finally:
        holder.communicate("done\n", timeout=30)
    assert s3_keys(s3_server, "runs/") == []


def test_a_killed_holders_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    out = tmp_path / "out"
    holder = _start_holder(str(out))
    holder.send_signal(signal.SIGKILL)  # a killed run leaves its lock behind
    holder.wait(timeout=30)
    assert json.loads((out / LOCK).read_text())["pid"] == holder.pid
    from mammo_ray.cli import main

    assert main(["synth", "--out", str(out), "--n", "2", "--height", "64", "--width", "64"]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of a preprocess run on host {socket.gethostname()}, pid {holder.pid}" in err, err
    assert not (out / LOCK).exists() and (out / "labels.csv").exists()


def test_a_stale_s3_lock_is_taken_over_and_a_live_one_refused(s3_server, caplog):
    key = f"runs/b/{LOCK}"
    old = {"host": "gone-host", "pid": 1, "stage": "score", "token": "t", "start": "2026-01-01T00:00:00Z",
           "heartbeat": time.time() - 3600}
    s3_server.put_object(Bucket=S3_BUCKET, Key=key, Body=json.dumps(old).encode())
    with caplog.at_level("WARNING", logger="mammo_ray.locks"):
        with hold_out(f"s3://{S3_BUCKET}/runs/b", "score") as record:
            held = json.loads(s3_server.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read())
            assert held["token"] == record["token"] and held["pid"] == os.getpid()
            with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}, started"):  # live: refused
                with hold_out(f"s3://{S3_BUCKET}/runs/b", "score"):
                    pass
    assert "took over the lock of a score run on host gone-host, pid 1" in caplog.text
    assert s3_keys(s3_server, "runs/") == []


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    out = tmp_path / "out"
    with hold_out(str(out), "train", heartbeat_s=0.05) as record:
        first = record["heartbeat"]
        deadline = time.monotonic() + 60
        while json.loads((out / LOCK).read_text())["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads((out / LOCK).read_text())["heartbeat"] > first
    assert not out.exists()


# heartbeats as ages, stamped when the test runs: a time taken at collection is minutes old by the
# time a long suite reaches this test, past the TTL
@pytest.mark.parametrize("holder, age, stale", [
    ({"host": socket.gethostname(), "pid": os.getpid()}, 0, False),
    ({"host": "elsewhere", "pid": 1}, 0, False),
    ({"host": "elsewhere", "pid": 1}, 10_000, True),
    ({"host": socket.gethostname(), "pid": 2 ** 22 + 12345}, 0, True),  # no such pid
    ({}, None, True),
])
def test_is_stale(holder, age, stale):
    if age is not None:
        holder = {**holder, "heartbeat": time.time() - age}
    assert is_stale(holder) is stale


def test_a_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError):
        with hold_out(str(out), "evaluate"):
            raise RuntimeError("the run failed")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_local_lock_is_never_seen_without_its_record(tmp_path):
    """A run that reads the lock between another's create and its write took the empty lock
    for a stale one and took it over: both ran ('got', 'got' in the suite). Created by link,
    the lock appears whole. One thread creates and deletes the lock in a loop while this one
    reads it; the O_EXCL-then-write fallback (file systems without hard links) is the control
    that shows the reads do catch the window."""
    import threading

    from mammo_ray.locks import _LocalLock

    def empty_reads(create) -> int:
        lock, stop = _LocalLock(str(tmp_path)), threading.Event()

        def churn():
            while not stop.is_set():
                create(b'{"pid": 1, "host": "h", "heartbeat": 1}')
                lock.delete()

        thread = threading.Thread(target=churn)
        thread.start()
        reads = empty = 0
        deadline = time.monotonic() + 60
        try:
            while reads < 5000 and thread.is_alive() and time.monotonic() < deadline:
                try:
                    with open(lock.path, "rb") as f:
                        empty += not f.read()
                    reads += 1
                except FileNotFoundError:
                    pass
        finally:
            stop.set()
            thread.join()
        return empty

    lock = _LocalLock(str(tmp_path))
    assert empty_reads(lock.create) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary left behind
    assert empty_reads(lock._create_exclusive) > 0
