"""Patient pseudonyms keyed by a secret; no file contents quoted in errors."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat

import pyarrow.parquet as pq
import pytest

from mammo_ray.config import PreprocessConfig
from mammo_ray.data.decode import DecodeError, describe_exception, sniff_format
from mammo_ray.privacy import KEY_ENV, KEY_FILE_ENV, PatientSecret, load_patient_secret, patient_key


def _six_digit_manifest(phantom_dir, tmp_path, n=24):
    """A manifest whose patient ids are six-digit numbers: the brute-forced case."""
    rows = ["path,label,patient_id"]
    files = sorted((phantom_dir / "benign").glob("*.png"))[: n // 2] + sorted((phantom_dir / "malignant").glob("*.png"))[: n // 2]
    path = tmp_path / "m" / "labels.csv"
    path.parent.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, path.parent / f"{i}.png")
        rows.append(f"{i}.png,{f.parent.name},{100000 + 7919 * i // 3:06d}")
    path.write_text("\n".join(rows) + "\n")
    return path, {f"{100000 + 7919 * i // 3:06d}" for i in range(len(files))}


def _keys_of(out) -> set[str]:
    keys = set()
    for f in out.rglob("*.parquet"):
        keys |= {k for k in pq.read_table(f, columns=["patient_key"]).column("patient_key").to_pylist() if k}
    return keys


def test_patient_keys_cannot_be_brute_forced_without_the_secret(ray_local, phantom_dir, tmp_path, monkeypatch):
    from mammo_ray.data.pipeline import run_preprocess

    manifest, ids = _six_digit_manifest(phantom_dir, tmp_path)
    key_file = tmp_path / "keys" / "patient.key"
    cfg = PreprocessConfig.load(size=32, patient_key_file=str(key_file))
    out = tmp_path / "out"
    run_preprocess([str(manifest)], str(out), cfg)
    keys = _keys_of(out)
    assert len(keys) == len(ids)
    # the old scheme's brute force (public salt, every six-digit id) recovers nothing ...
    for salt in ("mammo-ray", ""):
        guesses = {hashlib.sha256(f"{salt}\x00{i:06d}".encode()).hexdigest()[:16] for i in range(100000, 1000000)}
        assert not guesses & keys
    # ... while the key holder links every id (HMAC under the secret)
    secret = load_patient_secret(key_file)
    assert {patient_key(i, secret) for i in ids} == keys
    # the key file was created private, outside the outputs, and the key is in no output
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert secret.key not in blob and str(key_file).encode() in (out / "preprocess.yaml").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patient_key_id"] == secret.key_id and secret.key_id.encode() not in secret.key
    # the same key links a later run; another key gives unrelated pseudonyms
    out2 = tmp_path / "out2"
    monkeypatch.setenv(KEY_ENV, "another-secret-of-enough-length")
    run_preprocess([str(manifest)], str(out2), PreprocessConfig.load(size=32))
    assert not _keys_of(out2) & keys


def test_key_sources_and_refusals(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "cfg" / "patient.key"))
    first = load_patient_secret()
    assert first.source == str(tmp_path / "cfg" / "patient.key") and len(first.key) == 64
    assert load_patient_secret().key == first.key  # reused, not regenerated
    assert first.key.decode() not in repr(first)
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(ValueError, match=f"{KEY_ENV} has 5 characters"):
        load_patient_secret()
    monkeypatch.setenv(KEY_ENV, "x" * 32)
    assert load_patient_secret().source == f"${KEY_ENV}"
    monkeypatch.delenv(KEY_ENV)
    out = tmp_path / "outputs"
    with pytest.raises(ValueError, match="inside the output folder"):
        load_patient_secret(out / "k.key", forbidden=(str(out),))
    (tmp_path / "empty.key").write_text("\n")
    with pytest.raises(ValueError, match="holds 0 characters"):
        load_patient_secret(tmp_path / "empty.key")
    (tmp_path / "old.yaml").write_text("patient_salt: hospital\n")
    with pytest.raises(ValueError, match="patient_salt: a public salt"):
        PreprocessConfig.load(str(tmp_path / "old.yaml"))


def test_patient_key_is_hmac_and_none_for_missing():
    s = PatientSecret(b"k" * 32, "test")
    assert patient_key("", s) is None and patient_key(None, s) is None and patient_key("  ", s) is None
    assert patient_key("123456", s) != patient_key("123456", PatientSecret(b"j" * 32, "test"))
    assert len(patient_key("123456", s)) == 16


@pytest.mark.parametrize("payload", [b"ZZSECRET^ALICE,P rest of a report", b"\x00\x01SMITH^JOHN\xff" * 3])
def test_unknown_file_error_quotes_no_bytes(payload):
    with pytest.raises(DecodeError) as info:
        sniff_format(payload)
    msg = str(info.value)
    assert "ALICE" not in msg and "SMITH" not in msg and "ZZSECRET" not in msg
    assert f"{len(payload)} bytes" in msg and len(msg.splitlines()) == 1


def test_describe_exception_redacts_quotes_and_keeps_one_line():
    exc = RuntimeError("Unable to convert 'DOE^JANE' for element\nplugin a: missing\nplugin b: missing")
    text = describe_exception(exc)
    assert "DOE" not in text and "<8 chars>" in text and "\n" not in text and text.startswith("RuntimeError: ")
    assert len(describe_exception(ValueError("x" * 1000))) == 160
