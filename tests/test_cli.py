"""The mammo-ray command line: one-line errors naming allowed values; the console script works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mammo_ray.cli import main
from tests.conftest import REPO

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("argv,needle", [
    (["preprocess", "x", "--out", "y", "--equalize", "hist"], "invalid choice: 'hist' (choose from 'clahe', 'global', 'none')"),
    (["preprocess", "x", "--out", "y", "--resize-mode", "crop"], "(choose from 'pad', 'stretch')"),
    (["preprocess", "x", "--out", "y", "--dtype", "int8"], "(choose from 'uint8', 'uint16', 'float32')"),
    (["preprocess", "x", "--out", "y", "--ratios", "0.5", "0.5", "0.5"], "ratios=(0.5, 0.5, 0.5): use three non-negative numbers"),
    (["preprocess", "/definitely/not/here", "--out", "y"], "input '/definitely/not/here' does not exist"),
    (["synth", "--out", "y", "--n", "3", "--formats", "png8,bmp"], "use a comma list of png8, png16"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_config_file_unknown_key_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("spec:\n  size: 64\n  equalise: clahe\n")
    assert main(["preprocess", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown PreprocessSpec key(s) equalise: allowed keys are size, crop" in err
    assert len(err.splitlines()) == 1


def test_config_file_is_safe_loaded(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    assert main(["preprocess", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "could not determine a constructor" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_synth_then_preprocess_job(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    raw = tmp_path / "raw"
    r = subprocess.run([str(BIN / "mammo-ray"), "synth", "--out", str(raw), "--n", "12", "--height", "200",
                        "--width", "160"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "preprocess.py"), str(raw), "--out", str(tmp_path / "out"),
                        "--size", "48", "--seed", "3"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "inputs=12 rows=12 errors=0" in r.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["balanced"] and summary["rows"] == 12


@pytest.mark.slow
def test_train_job_smoke_test(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--smoke-test", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "best epoch" in r.stdout and (tmp_path / "best.pt").exists() and (tmp_path / "history.csv").exists()


@pytest.mark.slow
def test_demo_runs_end_to_end_and_says_where_outputs_are(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run([str(BIN / "mammo-ray"), "demo", "--out", str(tmp_path / "demo"), "--n", "80", "--epochs", "2"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"outputs in {tmp_path / 'demo'}" in r.stdout
    for name in ("data/summary.json", "external/summary.json", "preview-train.png", "train/best.pt"):
        assert (tmp_path / "demo" / name).exists(), name
