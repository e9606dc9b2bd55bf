"""Ray Tune sweeps on phantoms: outputs, the paper's table, fault tolerance, resume, 2 nodes."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mammo_ray.cli import main
from mammo_ray.config import SweepConfig
from mammo_ray.train.sweep import run_sweep
from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def small_sweep(**kw) -> SweepConfig:
    base = dict(backbones=("simplecnn",), freeze_ratios=(0.0, 0.5), lr_bounds=((1e-4, 1e-3), (1e-3, 1e-2)),
                epochs=3, batch_size=32, train={"optimizer": "adamw", "pretrained": "none"}, max_failures=2)
    base.update(kw)
    return SweepConfig(**base)


def read_results(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_four_trial_sweep_writes_every_output(phantom_sweep):
    """small_sweep() run once for the session (conftest.phantom_sweep; evaluate's tests read it too)."""
    out, summary, lines = phantom_sweep
    assert summary["trials"] == 4 and summary["errors"] == 0
    # the progress line ranks trials by their best epoch so far, as Tune does, not the last epoch
    assert lines and lines[-1].startswith("sweep: 4/4 (100%), 0 errors"), lines
    shown = float(re.search(r"best val AUC ([0-9.]+)", lines[-1]).group(1))
    for name in ("results.csv", "table.md", "auc_vs_freezing.png", "sweep.yaml", "summary.json",
                 "best/simplecnn-r0/checkpoint.pt", "best/simplecnn-r0.5/checkpoint.pt", "best/overall/checkpoint.pt"):
        assert (out / name).exists(), name
    rows = read_results(out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"TERMINATED"}
    assert {(r["freeze_ratio"], r["base_lr"]) for r in rows} == {("0.0", "0.0001"), ("0.0", "0.001"),
                                                                 ("0.5", "0.0001"), ("0.5", "0.001")}
    # table.md: one row per group, numbers equal to the best results.csv row of that group
    table = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| simplecnn")]
    assert len(table) == 2
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        num = lambda c: None if c == "n/a" else float(c)  # noqa: E731 (undefined, e.g. no positive prediction)
        ratio, auc, acc, prec, rec, f1, trial = (float(cells[1]), float(cells[2]), *map(num, cells[4:8]), cells[9])
        low, high = map(float, re.fullmatch(r"\[(\S+), (\S+)\]", cells[3]).groups())
        group = [r for r in rows if float(r["freeze_ratio"]) == ratio]
        best = max(group, key=lambda r: float(r["val_auc"]))
        assert trial == best["trial_id"]
        assert low <= auc <= high and (low, high) == (round(float(best["val_auc_low"]), 3),
                                                      round(float(best["val_auc_high"]), 3))
        for value, key in ((auc, "val_auc"), (acc, "val_accuracy"), (prec, "val_precision"), (rec, "val_recall"),
                           (f1, "val_f1")):
            if value is None:  # undefined in the table is undefined (empty) in results.csv, never a 0
                assert best[key] in ("", "nan"), (key, best[key])
            else:
                assert value == pytest.approx(float(best[key]), abs=5e-5)
    assert shown == pytest.approx(max(float(r["val_auc"]) for r in rows), abs=5e-4)  # printed with 3 decimals
    # the summary says whether the best group's interval overlaps the others'
    verdict = summary["best_vs_rest"]
    top = max(rows, key=lambda r: float(r["val_auc"]))
    others = [max((r for r in rows if r["freeze_ratio"] == ratio), key=lambda r: float(r["val_auc"]))
              for ratio in {r["freeze_ratio"] for r in rows} - {top["freeze_ratio"]}]
    assert verdict["overlapping"] == [f"simplecnn-r{float(o['freeze_ratio']):g}" for o in others
                                      if float(o["val_auc_high"]) >= float(top["val_auc_low"])]
    assert verdict["statement"] in (out / "table.md").read_text()
    # the overall checkpoint is the best trial's best epoch, and loads with weights_only=True
    from mammo_ray.models.checkpoint import load_checkpoint

    state = load_checkpoint(str(out / "best" / "overall" / "checkpoint.pt"))
    top = max(rows, key=lambda r: float(r["val_auc"]))
    assert state["metrics"]["val_auc"] == pytest.approx(float(top["val_auc"]))
    assert state["backbone"] == "simplecnn" and state["spec"]["size"] == [96, 96]


def _trial_workers() -> list[int]:
    """This session's Ray Train workers of the trials (never another Ray's on the same machine)."""
    from tests.conftest import own_processes

    return sorted(own_processes("ray::", "RayTrainWorker"))


def _checkpointed_trials(out: Path) -> list[Path]:
    """The trials' Tune folders whose Train run holds a checkpoint (under OUT/tune/runs)."""
    runs = out / "tune" / "runs"
    return [t for t in (out / "tune" / "sweep").glob("trial_driver_*")
            if any(runs.glob(f"trial-{t.name.split('_')[2]}_{t.name.split('_')[3]}/checkpoint_*"))]


def _results_logged(trial_dir) -> int:
    """Results the Tune driver has processed for a trial (its JSON logger's lines)."""
    try:
        return sum(1 for line in (trial_dir / "result.json").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def test_killed_trial_worker_is_retried_from_its_checkpoint(ray_local, train_data_dir, tmp_path):
    out = tmp_path / "sweep"
    killed: list[int] = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            # both trials checkpointed AND the driver knows it: whichever worker is killed has a
            # checkpoint to restore from (killing a trial before its first checkpoint rightly
            # restarts it from scratch). The checkpoint folder appears when the worker writes it,
            # before the driver has processed that report (a loaded CI machine lagged): the
            # driver's own result.json holding a third result proves an earlier checkpoint registered.
            # (any checkpoint folder: with num_to_keep=2, checkpoint_000001 goes once _000003 exists)
            trials = _checkpointed_trials(out)
            if len(trials) >= 2 and all(_results_logged(t) >= 3 for t in trials):
                pids = _trial_workers()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    # patience 0: every trial runs all 8 epochs (early stopping would make the count data-dependent)
    summary = run_sweep(str(train_data_dir), str(out), small_sweep(epochs=8, freeze_ratios=(0.0,),
                                                                  train={"optimizer": "adamw", "patience": 0, "pretrained": "none"}))
    thread.join(timeout=5)
    assert killed, "no trial worker was found to kill"
    rows = read_results(out)
    assert summary["errors"] == 0 and len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    assert all(r["epochs_run"] == "8" for r in rows)
    restored = [r for r in rows if r["restored"] == "True"]
    assert restored, rows  # the killed trial came back from its checkpoint, not from scratch


def test_resume_after_the_driver_is_killed(ray_local, train_data_dir, tmp_path):
    """The CLI's driver, attached to a running Ray (this session's, with RAY_ADDRESS), is
    killed after one trial finished; `tune --resume` (in this process, on the same Ray) runs
    only the unfinished trial."""
    import ray

    epochs = 8
    out = tmp_path / "sweep"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [str(BIN / "mammo-ray"), "tune", "--data", str(train_data_dir), "--out", str(out), "--backbones", "simplecnn",
           "--freeze-ratios", "0.5", "--lr-bounds", "1e-4:1e-3", "1e-3:1e-2", "--epochs", str(epochs),
           "--patience", "0", "--cpus-per-trial", "2", "--pretrained", "none"]  # one trial at a time: the first finishes before the kill
    # (8 epochs: the second trial, which starts at once in the first one's process, is still
    # running a second after the first finished)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    finished_before: set[str] = set()
    deadline = time.time() + 300
    while time.time() < deadline:
        # finished: the driver has recorded the trial's last epoch (a checkpoint folder alone is
        # written by the trial and can be ahead of the driver's record by a result)
        finished_before = {p.parent.name for p in (out / "tune" / "sweep").glob("*/result.json")
                           if len(p.read_text().splitlines()) == epochs}
        if finished_before:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # the experiment state is snapshotted after the result
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; Ray ends its job's trials
    proc.wait()
    assert finished_before, "no trial finished before the kill"
    assert not (out / "results.csv").exists()
    lines_before = {d: len((out / "tune" / "sweep" / d / "result.json").read_text().splitlines()) for d in finished_before}

    # no grid flags: --resume reads the interrupted sweep's own sweep.yaml
    assert main(["tune", "--data", str(train_data_dir), "--out", str(out), "--resume"]) == 0
    rows = read_results(out)
    assert len(rows) == 2 and {x["status"] for x in rows} == {"TERMINATED"}
    trial_ids = {"_".join(p.name.split("_")[2:4]) for p in (out / "tune" / "sweep").iterdir() if p.is_dir()}
    assert len(trial_ids) == 2  # the same two trials, none created anew (Tune may give a restarted one a new folder)
    assert {p.name for p in (out / "tune" / "runs").iterdir()} == {f"trial-{t}" for t in trial_ids}
    for d in finished_before:  # finished trials were not run again
        assert len((out / "tune" / "sweep" / d / "result.json").read_text().splitlines()) == lines_before[d] == epochs


# Trials spread over a Cluster's nodes: test_sweep_of_two_worker_trials_on_a_two_node_cluster
# (tests/train/test_distributed.py), whose trials each fill a node, checks both nodes in node_id
# and in every worker's placement; a sweep of one-worker trials here ran 4 more trials (85 s)
# for the node_id half of that.


@pytest.mark.cluster
def test_sweep_survives_losing_a_worker_node(ray_cluster, train_data_dir, tmp_path):
    """A worker node disappears mid-sweep: its trial is restored from its last checkpoint on
    the other node and the sweep finishes with every trial complete."""
    from tests.conftest import node_of_pid, remove_node_when

    cluster, workers = ray_cluster
    out = tmp_path / "sweep"
    removed: list = []

    def a_trials_node():
        return next((n for n in (node_of_pid(workers, pid) for pid in _trial_workers()) if n is not None), None)

    thread = remove_node_when(cluster, lambda: len(list((out / "tune" / "runs").glob("*/checkpoint_*"))) >= 2,
                              a_trials_node, removed)
    summary = run_sweep(str(train_data_dir), str(out), small_sweep(epochs=8, freeze_ratios=(0.0,), max_failures=3,
                                                                  train={"optimizer": "adamw", "patience": 0, "pretrained": "none"}))
    thread.join(timeout=5)
    assert removed, "no trial's node was found to remove"
    rows = read_results(out)
    assert summary["errors"] == 0 and len(rows) == 2 and {r["status"] for r in rows} == {"TERMINATED"}
    assert all(r["epochs_run"] == "8" for r in rows)
    assert any(r["restored"] == "True" for r in rows), rows
    assert all(r["node_id"] != removed[0] for r in rows if r["restored"] == "True")


@pytest.mark.parametrize("yaml_text,argv,needle", [
    ("backbones: [simplecnn]\nfreeze_ratio: [0.5]\n", [], "unknown SweepConfig key(s) freeze_ratio"),
    ("backbones: [simplecnn]\nfreeze_ratios: []\n", [], "freeze_ratios: the grid is empty"),
    ("backbones: [simplecnn]\nlr_bounds: [[0.01, 0.001]]\n", [], "lr_bounds: [0.01, 0.001] needs 0 < base_lr < max_lr"),
    ("backbones: [simplecnn]\n", ["--gpus-per-trial", "1"], "gpus_per_worker=1: no node has that many GPUs"),
    ("backbones: [simplecnn]\n", ["--workers", "0"], "workers=0: use a whole number of data-parallel workers"),
    ("backbones: [simplecnn]\n", ["--workers", "3"], "workers=3 x cpus_per_worker=1 needs 3 CPUs, but the cluster has 2"),

    ("backbones: [simplecnn]\n", ["--accumulate", "0"], "accumulate=0: use a whole number"),
    ("backbones: [simplecnn]\n", ["--workers", "2", "--cpus-per-trial", "4", "--cpus-per-worker", "1"],
     "cpus_per_trial=4 and cpus_per_worker=1 with workers=2 disagree"),
    ("backbones: [simplecnn]\n", ["--resume"], "holds no sweep to resume"),
])
def test_bad_sweeps_are_refused_before_any_trial(yaml_text, argv, needle, ray_local, train_data_dir, tmp_path, capsys):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml_text)
    code = main(["tune", "--data", str(train_data_dir), "--out", str(tmp_path / "out"), "--config", str(cfg), *argv])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not list((tmp_path / "out").glob("tune/runs/*/checkpoint_*"))


def test_asha_scheduler_sweep_finishes(ray_local, train_data_dir, tmp_path):
    summary = run_sweep(str(train_data_dir), str(tmp_path / "asha"),
                        small_sweep(scheduler="asha", epochs=4, grace_period=1, lr_bounds=((1e-4, 1e-3),)))
    rows = read_results(tmp_path / "asha")
    assert summary["errors"] == 0 and len(rows) == 2
    assert all(1 <= int(r["epochs_run"]) <= 4 for r in rows)


@pytest.mark.parametrize("name", ["sweep-paper.yaml", "sweep-cpu.yaml"])
def test_shipped_sweep_files_are_valid(name):
    sweep = SweepConfig.load(str(REPO / "jobs" / name))
    assert sweep.grid_size >= 4


@pytest.mark.restarts_ray
def test_sweep_storage_on_s3(s3_server, train_data_dir):
    """Tune's experiment state, checkpoints and every output on an S3-protocol server (moto)."""
    import ray

    from tests.conftest import S3_BUCKET, s3_keys

    if ray.is_initialized():
        ray.shutdown()  # restart so the job's workers get the S3 endpoint and credentials
    try:
        out = f"s3://{S3_BUCKET}/sweeps/one"
        summary = run_sweep(str(train_data_dir), out, small_sweep(epochs=2, freeze_ratios=(0.5,),
                                                                   lr_bounds=((1e-3, 1e-2),)))
        assert summary["trials"] == 1 and summary["errors"] == 0
        keys = set(s3_keys(s3_server, "sweeps/one/"))
        for name in ("results.csv", "table.md", "auc_vs_freezing.png", "best/overall/checkpoint.pt",
                     "best/simplecnn-r0.5/checkpoint.pt"):
            assert f"sweeps/one/{name}" in keys, name
        assert any(k.startswith("sweeps/one/tune/runs/") and k.endswith("/last.pt") for k in keys), sorted(keys)
    finally:
        ray.shutdown()


def test_start_weights_are_resolved_once_on_the_driver_and_shipped(ray_local, train_data_dir, tmp_path, monkeypatch):
    """`--weights FILE` is read once by the driver and reaches every trial through the object
    store: the file is deleted as soon as the driver has read it, and the trials still start
    from its tensors (at freezing 1.0 the backbone's conv weights in the result are the file's)."""
    import torch

    import mammo_ray.train.sweep as sweep_module
    from mammo_ray.models.registry import get_backbone
    from mammo_ray.models.checkpoint import load_checkpoint

    torch.manual_seed(123)
    state = get_backbone("simplecnn").builder(weights=None).state_dict()
    path = tmp_path / "start.pt"
    torch.save(state, path)
    real, calls = sweep_module.resolve_weights, []

    def resolve_then_delete(name, **kw):
        calls.append(name)
        out = real(name, **kw)
        path.unlink(missing_ok=True)  # a trial that read the file itself would now fail
        return out

    monkeypatch.setattr(sweep_module, "resolve_weights", resolve_then_delete)
    out = tmp_path / "sweep"
    summary = run_sweep(str(train_data_dir), str(out),
                        small_sweep(freeze_ratios=(1.0,), lr_bounds=((1e-4, 1e-3), (1e-3, 1e-2)), epochs=1,
                                    train={"pretrained": "none", "weights": str(path)}))
    assert summary["trials"] == 2 and summary["errors"] == 0, summary
    assert calls == ["simplecnn"] and not path.exists()
    trained = load_checkpoint(str(out / "best" / "overall" / "checkpoint.pt"))["model"]
    first = get_backbone("simplecnn").first_conv + ".weight"  # folded to one channel: not comparable
    convs = [k for k, v in state.items() if v.ndim == 4 and k != first]
    assert convs and all(torch.equal(trained[k], state[k]) for k in convs)
