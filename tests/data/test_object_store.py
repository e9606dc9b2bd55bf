"""Preprocessing from and to s3:// against a real S3-protocol server (moto) on loopback."""
from __future__ import annotations

import csv
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mammo_ray.config import PreprocessConfig
from mammo_ray.data.parquet import read_spec, read_split
from mammo_ray.data.pipeline import run_preprocess

pytestmark = pytest.mark.slow
BUCKET = "mammo-test-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 server on 127.0.0.1, credentials in the usual environment variables."""
    port = _free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_preprocess_s3_in_s3_out(ray_local, s3_server, phantom_dir):
    files = sorted(p for p in phantom_dir.rglob("*") if p.is_file() and p.suffix != ".csv")[:16]
    for p in files:
        s3_server.upload_file(str(p), BUCKET, f"raw/{p.relative_to(phantom_dir).as_posix()}")
    s3_server.put_object(Bucket=BUCKET, Key="raw/benign/broken.png", Body=b"not a png")
    cfg = PreprocessConfig.load(size=32, batch_size=4)
    summary = run_preprocess([f"s3://{BUCKET}/raw"], f"s3://{BUCKET}/out", cfg)
    assert summary["inputs"] == 17 and summary["rows"] == 16 and summary["errors"] == 1
    keys = {o["Key"] for o in s3_server.list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]}
    assert {"out/summary.json", "out/errors.csv", "out/preprocess.yaml"} <= keys
    errors = list(csv.DictReader(io.StringIO(
        s3_server.get_object(Bucket=BUCKET, Key="out/errors.csv")["Body"].read().decode())))
    assert [e["path"] for e in errors] == [f"s3://{BUCKET}/raw/benign/broken.png"]
    assert read_spec(f"s3://{BUCKET}/out") == cfg.spec
    rows = sum(len(read_split(f"s3://{BUCKET}/out", s)) for s in ("train", "val", "test")
               if any(k.startswith(f"out/{s}/") for k in keys))
    assert rows == 16
