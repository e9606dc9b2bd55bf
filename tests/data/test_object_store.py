"""Preprocessing from and to s3:// against a real S3-protocol server (moto) on loopback."""
from __future__ import annotations

import csv
import io

import pytest

from mammo_ray.config import PreprocessConfig
from mammo_ray.data.parquet import read_spec, read_split
from mammo_ray.data.pipeline import run_preprocess

from tests.conftest import S3_BUCKET as BUCKET, s3_keys

pytestmark = pytest.mark.slow


def test_preprocess_s3_in_s3_out(ray_local, s3_server, phantom_dir):
    files = sorted(p for p in phantom_dir.rglob("*") if p.is_file() and p.suffix != ".csv" and not p.name.startswith("."))[:16]
    for p in files:
        s3_server.upload_file(str(p), BUCKET, f"raw/{p.relative_to(phantom_dir).as_posix()}")
    s3_server.put_object(Bucket=BUCKET, Key="raw/benign/broken.png", Body=b"not a png")
    cfg = PreprocessConfig.load(size=32, batch_size=4)
    summary = run_preprocess([f"s3://{BUCKET}/raw"], f"s3://{BUCKET}/out", cfg)
    assert summary["inputs"] == 17 and summary["rows"] == 16 and summary["errors"] == 1
    keys = set(s3_keys(s3_server, "out/"))
    assert {"out/summary.json", "out/errors.csv", "out/preprocess.yaml"} <= keys
    errors = list(csv.DictReader(io.StringIO(
        s3_server.get_object(Bucket=BUCKET, Key="out/errors.csv")["Body"].read().decode())))
    assert [e["path"] for e in errors] == [f"s3://{BUCKET}/raw/benign/broken.png"]
    assert read_spec(f"s3://{BUCKET}/out") == cfg.spec
    rows = sum(len(read_split(f"s3://{BUCKET}/out", s)) for s in ("train", "val", "test")
               if any(k.startswith(f"out/{s}/") for k in keys))
    assert rows == 16


def test_manifest_on_s3_reads_rows_anywhere_on_the_stores(s3_server, tmp_path):
    """A manifest on s3:// names files relative to its folder (as on disk), ``..`` and other
    buckets included: the user wrote it. A row climbing above the store's root is refused in its
    own line, and a local manifest may list s3:// rows. (normpath once folded the scheme, so every
    row of an S3 manifest became "s3://s3:/..."; until issue 27 a row leaving the manifest's folder
    was refused as "escapes the manifest's folder".)"""
    from mammo_ray.data.inputs import discover

    s3_server.create_bucket(Bucket="other-bucket")
    s3_server.put_object(Bucket="other-bucket", Key="films/c.png", Body=b"\x89PNG not decoded here")
    for key in ("m/cc/a.png", "m/b.png", "x.png"):
        s3_server.put_object(Bucket=BUCKET, Key=key, Body=b"\x89PNG not decoded here")
    s3_server.put_object(Bucket=BUCKET, Key="m/labels.csv",
                         Body=b"path,label\ncc/a.png,benign\n./b.png,malignant\n../x.png,normal\n"
                              b"s3://other-bucket/films/c.png,cancer\n../../../up.png,benign\n")
    listing = discover([f"s3://{BUCKET}/m/labels.csv"])
    assert sorted((r["path"], r["label"]) for r in listing.records) == sorted([
        ("s3://other-bucket/films/c.png", 1), (f"s3://{BUCKET}/m/b.png", 1), (f"s3://{BUCKET}/m/cc/a.png", 0),
        (f"s3://{BUCKET}/x.png", 0)])
    assert len(listing.errors) == 1 and "'../../../up.png' climbs above the store's root" in listing.errors[0]["reason"]
    local = tmp_path / "mixed.csv"
    (tmp_path / "here.png").write_bytes(b"\x89PNG not decoded here")
    local.write_text(f"path,label\nhere.png,benign\ns3://{BUCKET}/m/b.png,malignant\ns3://{BUCKET}/m/gone.png,benign\n")
    listing = discover([str(local)])
    assert sorted(r["path"] for r in listing.records) == sorted([str(tmp_path / "here.png"), f"s3://{BUCKET}/m/b.png"])
    assert [(e["path"], e["reason"]) for e in listing.errors] == [(f"s3://{BUCKET}/m/gone.png",
                                                                   "file listed in the manifest not found")]