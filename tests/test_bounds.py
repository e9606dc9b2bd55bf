"""Sizes, batches and counts are bounded: by hard caps, by the memory there is (refused before
any work with the computed need), and a task that keeps dying ends as errors.csv lines."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time

import psutil
import pytest
import torch

from mammo_ray.cli import main
from mammo_ray.config import MAX_SIDE, PreprocessConfig, PreprocessSpec, TrainConfig
from mammo_ray.resources import MemoryBoundError, TASK_RETRIES, check_fits, preprocess_task_bytes
from tests.conftest import error_text


@pytest.mark.parametrize("argv,needle", [
    (["preprocess", "IN", "--out", "OUT", "--size", "100000"], f"each in [8, {MAX_SIDE}]"),
    (["preprocess", "IN", "--out", "OUT", "--batch-size", "100000000"], "batch_size=100000000"),
    (["train", "--data", "IN", "--out", "OUT", "--batch-size", "1000000"], "batch_size=1000000"),
    (["tune", "--data", "IN", "--out", "OUT", "--num-samples", "10000000"], "num_samples=10000000"),
    (["explain", "IN", "--checkpoint", "CK", "--out", "OUT", "--preview-size", "100000"], "preview_size=100000"),
    (["synth", "--out", "OUT", "--n", "2", "--height", "100000"], "--height 100000"),
])
def test_oversized_flags_refused_before_any_work(argv, needle, phantom_dir, tmp_path, trained_checkpoint, capsys):
    argv = [{"IN": str(phantom_dir), "OUT": str(tmp_path / "out"), "CK": str(trained_checkpoint)}.get(a, a)
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def _hostile_checkpoint(trained_checkpoint, tmp_path, size):
    state = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    state["spec"] = {**state["spec"], "size": [size, size]}
    path = tmp_path / "hostile.pt"
    torch.save(state, path)
    return path


def test_hostile_checkpoint_spec_refused_by_explain_and_evaluate(trained_checkpoint, train_data_dir, phantom_dir,
                                                                 tmp_path, capsys):
    ck = _hostile_checkpoint(trained_checkpoint, tmp_path, 100000)
    for argv in (["explain", str(phantom_dir), "--checkpoint", str(ck), "--out", str(tmp_path / "e")],
                 ["evaluate", "--checkpoint", str(ck), "--data", str(train_data_dir), "--external", str(phantom_dir),
                  "--out", str(tmp_path / "v")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "size=" in err and str(MAX_SIDE) in err, err


def test_memory_need_refused_with_the_computed_figure(ray_local, phantom_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["preprocess", str(phantom_dir), "--out", str(out), "--size", "32"]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()
    # within every hard cap, but a task would hold 4096 float32 images of 8192x8192; --overwrite
    # must not remove the previous run before that refusal
    argv = ["preprocess", str(phantom_dir), "--out", str(out), "--size", "8192", "--dtype", "float32",
            "--batch-size", "4096", "--overwrite"]
    assert main(argv) == 2
    # the error is one line (a warning logged before it, e.g. an ignored labels.csv, is its own line)
    err = error_text(capsys.readouterr().err)
    need = preprocess_task_bytes(size=(8192, 8192), dtype="float32", batch_size=4096, max_pixels=100_000_000)
    assert len(err.splitlines()) == 1 and "needs about" in err and f"{need / 2**40:.1f} TB" in err, err
    assert "lower --batch-size" in err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_training_split_larger_than_memory_refused(train_data_dir, tmp_path, monkeypatch, capsys):
    import mammo_ray.resources as res

    monkeypatch.setattr(res, "available_memory", lambda: 1_000_000)  # a 1 MB machine
    # --ingest memory is refused with the need (auto would stream it: tests/train/test_distributed.py)
    assert main(["train", "--data", str(train_data_dir), "--out", str(tmp_path / "m"), "--backbone", "simplecnn",
                 "--pretrained", "none", "--ingest", "memory"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs about" in err and "976.6 KB is available" in err, err
    assert not (tmp_path / "m").exists()


def test_check_fits_and_spec_caps():
    check_fits(100, 1000, what="x", hint="y")
    with pytest.raises(MemoryBoundError, match="x needs about 1000 B but 1000 B is available: y"):
        check_fits(1000, 1000, what="x", hint="y")
    with pytest.raises(ValueError, match="size=100000"):
        PreprocessSpec(size=100000)
    assert PreprocessSpec(size=MAX_SIDE).size == (MAX_SIDE, MAX_SIDE)
    with pytest.raises(ValueError, match="epochs=1000000"):
        TrainConfig(epochs=1_000_000)


def _kill_task_workers(stop: threading.Event, killed: list) -> None:
    """SIGKILL every worker of this session's Ray running a preprocessing task, as the memory
    monitor would (only descendants of this test process: never another session's Ray)."""
    me = psutil.Process()
    while not stop.is_set():
        for p in me.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline() or [])
                if cmd.startswith("ray::") and "process_batch" in cmd:
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
            except (psutil.Error, ProcessLookupError, TypeError):
                pass
        time.sleep(0.01)


@pytest.mark.slow
def test_tasks_killed_every_time_end_as_error_lines_not_a_loop(ray_local, phantom_dir, tmp_path):
    """Workers killed on every attempt: retried TASK_RETRIES times, then each image is an
    errors.csv line with the reason, and the job ends with inputs == rows + errors."""
    from mammo_ray.data.pipeline import run_preprocess

    raw = tmp_path / "raw"
    shutil.copytree(phantom_dir, raw)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_task_workers, args=(stop, killed), daemon=True)
    killer.start()
    t0 = time.monotonic()
    try:
        # no task ever comes back: the run fails as a whole, after writing its accounting
        with pytest.raises(RuntimeError, match="every task of the job failed"):
            run_preprocess([str(raw)], str(tmp_path / "out"), PreprocessConfig.load(size=32, batch_size=20))
    finally:
        stop.set()
        killer.join()
    assert time.monotonic() - t0 < 600  # bounded: no endless retry loop
    assert len(killed) >= TASK_RETRIES + 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["inputs"] == 60 and summary["rows"] + summary["errors"] == 60 and summary["balanced"]
    with open(tmp_path / "out" / "errors.csv") as f:
        reasons = [r["reason"] for r in csv.DictReader(f)]
    assert len(reasons) == summary["errors"] >= 20
    assert all(f"is retried {TASK_RETRIES} times" in r for r in reasons)
