"""Ray Tune sweeps: one trial = one backbone x freezing ratio x cyclic-LR bounds (x mode).

Each trial is a Ray Train run of ``workers`` data-parallel workers (``train/distributed.py``),
launched from a Tune function trainable as Ray's Train + Tune guide does. The splits are
decoded once on the driver and put in the object store (``ingest=memory``), or streamed to
every trial's workers by Ray Data (``ingest=stream``), never re-read per trial. Workers
checkpoint every epoch (``last.pt`` + ``best.pt``); a dead worker is restarted by Train from
the last checkpoint, a dead trial driver by Tune (both ``max_failures``), and an interrupted
sweep continues with ``--resume``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from mammo_ray import io as mio
from mammo_ray.config import SweepConfig, TrainConfig, from_mapping, to_dict
from mammo_ray.models.checkpoint import load_checkpoint
from mammo_ray.models.weights import resolve_weights
from mammo_ray.outputs import check_out_location, finish_out, start_out
from mammo_ray.console import LogWriter, Progress, ray_verbose
from mammo_ray.ray_utils import init_ray
from mammo_ray.train.distributed import Launch, make_trainer
from mammo_ray.train.ingest import probe_rows, read_totals
from mammo_ray.train.launch import check_cluster, prepare_launch
from mammo_ray.train.plan import sweep_plan
from mammo_ray.train.sweep_report import (
    RESULT_FIELDS,
    best_vs_rest,
    group_best,
    is_nan,
    plot_auc_vs_freezing,
    table_markdown,
    write_results_csv,
)

logger = logging.getLogger(__name__)

EXPERIMENT = "sweep"
#: a trial driver needs no CPU (its workers hold them), but Tune refuses a trial of no
#: resources at all: it asks for one byte of memory, so a worker may take every CPU of a node
DRIVER_RESOURCES = {"cpu": 0, "memory": 1}
RUNS = "runs"  # the trials' Ray Train runs, beside Tune's experiment under OUT/tune


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune search space: grids over backbone, freezing ratio, mode and LR bounds
    (or log-uniform LR samples)."""
    space: dict[str, Any] = {
        "backbone": tune.grid_search(list(sweep.backbones)),
        "freeze_ratio": tune.grid_search(list(sweep.freeze_ratios)),
        "clr_mode": tune.grid_search(list(sweep.clr_modes)),
    }
    if sweep.base_lr_range is not None:
        space["base_lr"] = tune.loguniform(*sweep.base_lr_range)
        space["max_lr"] = tune.loguniform(*sweep.max_lr_range)
    else:
        space["lr_bounds"] = tune.grid_search([list(p) for p in sweep.lr_bounds])
    return space


def trial_train_config(config: dict[str, Any], sweep: SweepConfig) -> TrainConfig:
    """A trial's Tune config dict -> the TrainConfig it trains with."""
    base_lr, max_lr = config["lr_bounds"] if "lr_bounds" in config else (config["base_lr"], config["max_lr"])
    return TrainConfig.load(None, **dict(sweep.train), backbone=config["backbone"],
                            freeze_ratio=float(config["freeze_ratio"]), clr_mode=config["clr_mode"],
                            base_lr=float(base_lr), max_lr=float(max_lr), epochs=sweep.epochs,
                            batch_size=sweep.batch_size, seed=sweep.seed, workers=sweep.workers,
                            cpus_per_worker=sweep.worker_cpus, gpus_per_worker=sweep.worker_gpus)


def resolve_start_weights(sweep: SweepConfig) -> dict[str, dict]:
    """The starting weights of each backbone, resolved once on the driver.

    ``train.pretrained`` / ``train.weights`` are read (or downloaded) here, checked against
    each backbone, and handed to the trials through ``tune.with_parameters`` (Ray's object
    store): the nodes of a cluster neither download nor need the file, and a bad file or an
    offline cache miss is one error before any trial starts, not one per trial.

    Why the driver rather than each trial reading its node's cache: one download per sweep
    instead of one per node (spot GPU workers come and go), and one hash check. The driver
    runs on the head, so the cluster manifests (cluster/) fill the head's torch hub cache and
    give the workers none; tests/test_cluster_manifests.py keeps the two in agreement.
    """
    train = TrainConfig.load(None, **dict(sweep.train), backbone=sweep.backbones[0])
    if train.pretrained is None and train.weights is None:
        return {}
    return {b: resolve_weights(b, pretrained=train.pretrained, weights_path=train.weights, offline=train.offline)
            for b in sweep.backbones}


def _first_sample(sweep: SweepConfig) -> dict[str, float]:
    """LR bounds for the probe's trial when the sweep samples them (the ranges' geometric middles)."""
    if sweep.base_lr_range is None:
        return {}
    return {"base_lr": math.sqrt(math.prod(sweep.base_lr_range)), "max_lr": math.sqrt(math.prod(sweep.max_lr_range))}


def trial_driver(config: dict[str, Any], *, launch: Launch, sweep_dict: dict[str, Any], runs: str,
                 starts: dict[str, Any] | None = None) -> None:
    """The Tune function trainable of a trial, as Ray's Train + Tune guide has it: it builds the
    trial's ``TorchTrainer`` (``sweep.workers`` workers running the one training loop) and waits
    for it; the workers' reports reach Tune through ``TuneReportCallback`` (ASHA, the progress
    line and ``results.csv`` read them there).

    The Train run is named by the trial id under ``runs`` (``OUT/tune/runs``, absolute: the
    trial's process runs in a folder of Tune's): a trial Tune restarts (its
    driver failed, or ``tune --resume``) finds the run's checkpoints under the same name and
    continues from the last one; a worker that dies is restarted by Train from it.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    sweep = from_mapping(SweepConfig, sweep_dict)
    cfg = replace(trial_train_config(config, sweep), ingest=launch.ingest)
    trial = replace(launch, cfg=cfg, start=(starts or {}).get(cfg.backbone), log_level="WARNING",
                    extra_metrics={"started_at": time.time()})
    trial_id = tune.get_context().get_trial_id()
    make_trainer(trial, name=f"trial-{trial_id}", storage_path=runs,
                 max_failures=sweep.max_failures, callbacks=[TuneReportCallback()]).fit()


def max_concurrent(sweep: SweepConfig, *, stream: bool) -> int:
    """Trials whose workers fit the cluster at once (Ray's Train + Tune guide: limit the trial
    drivers to what the limiting resource holds, or the rest wait, each holding a process).
    A streamed ingest keeps one CPU for Ray Data's reads."""
    res = ray.cluster_resources()
    fits = [math.floor((res.get("CPU", 0) - (1 if stream else 0)) / (sweep.workers * sweep.worker_cpus))]
    if sweep.worker_gpus:
        fits.append(math.floor(res.get("GPU", 0) / (sweep.workers * sweep.worker_gpus)))
    return max(1, min(fits))


def storage_path(out: str) -> str:
    return mio.join(out, "tune") if mio.is_uri(out) else os.path.join(os.path.abspath(out), "tune")


def _launch(data_dir: str, sweep: SweepConfig) -> tuple[Launch, dict[str, Any]]:
    """The sweep's shared launch (splits in the object store once, or streamed) and each
    backbone's starting weights, put in the object store once."""
    base = TrainConfig.load(None, **dict(sweep.train), backbone=sweep.backbones[0], workers=sweep.workers,
                            cpus_per_worker=sweep.worker_cpus, gpus_per_worker=sweep.worker_gpus)
    check_cluster(sweep.workers, sweep.worker_cpus, sweep.worker_gpus, stream=base.ingest == "stream")
    # weights before data: a backbone without ImageNet weights is refused before the splits are read
    starts = {b: ray.put(state) for b, state in resolve_start_weights(sweep).items()}
    launch = prepare_launch(base, data_dir)
    if launch.ingest == "stream" and base.ingest != "stream":  # auto chose to stream: Ray Data needs its CPU
        check_cluster(sweep.workers, sweep.worker_cpus, sweep.worker_gpus, stream=True)
    return launch, starts


def run_sweep(data_dir: str, out: str, sweep: SweepConfig, *, resume: bool = False, overwrite: bool = False,
              address: str | None = None, confirm: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep and write its outputs to ``out``.

    Args:
        confirm: called with the plan (:func:`mammo_ray.train.plan.sweep_plan`: trials x epochs and
            a probe's time estimate) before anything is written; it raises to stop the sweep.
            Not called on ``resume``.

    Returns:
        ``{"trials": n, "results": rows, "best": {...}}``.

    Raises:
        ValueError: bad data, a resume path without a sweep, workers larger than any node or
            the cluster.
    """
    check_out_location(out, folders=[data_dir])
    path = mio.join(storage_path(out), EXPERIMENT)
    if resume and not tune.Tuner.can_restore(path):
        raise ValueError(f"--resume {out}: holds no sweep to resume (no Tune experiment at {path})")
    read_totals(data_dir)  # a missing split is one line before Ray starts
    init_ray(address)
    launch, starts = _launch(data_dir, sweep)
    if confirm is not None and not resume:
        first = trial_train_config({k: v["grid_search"][0] for k, v in param_space(sweep).items()
                                    if isinstance(v, dict)} | _first_sample(sweep), sweep)
        confirm(sweep_plan(sweep, first, launch.spec, probe_rows(launch), launch.totals,
                           gpus=ray.cluster_resources().get("GPU", 0),
                           initial_state=ray.get(starts[first.backbone]) if first.backbone in starts else None))
    start_out(out, "tune", overwrite=overwrite, resume=resume)  # refuses an --out holding a run (also a sweep)
    if not resume:  # the sweep's own file: `--resume` reads it back, outputs describe themselves
        mio.write_bytes(mio.join(out, "sweep.yaml"), yaml.safe_dump(to_dict(sweep), sort_keys=False).encode())
    logger.info("sweep: %d grid points x %d samples on %s; %d worker(s) per trial, ingest %s; train %d, val %d images",
                sweep.grid_size, sweep.num_samples, ", ".join(sweep.backbones), sweep.workers, launch.ingest,
                launch.totals["train"].rows, launch.totals["val"].rows)
    grid = _fit_or_explain(_tuner(sweep, launch, starts, out, resume=resume), data_dir, out, address)
    summary = write_outputs(grid, out, sweep)
    finish_out(out, "tune")
    return summary


def _tuner(sweep: SweepConfig, launch: Launch, starts: dict[str, Any], out: str, *, resume: bool) -> tune.Tuner:
    """The sweep's Tuner, or the interrupted one restored from ``OUT/tune/sweep`` (``--resume``)."""
    # the trial's function only drives its Train run (DRIVER_RESOURCES); max_concurrent_trials
    # keeps the drivers to the trials whose workers fit
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, launch=launch, sweep_dict=to_dict(sweep), starts=starts,
                             runs=mio.join(storage_path(out), RUNS)),
        DRIVER_RESOURCES)
    if resume:
        return tune.Tuner.restore(mio.join(storage_path(out), EXPERIMENT), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    scheduler = None
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=sweep.epochs,
                                  grace_period=min(sweep.grace_period, sweep.epochs), reduction_factor=2)
    return tune.Tuner(
        trainable, param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric="best_val_auc", mode="max", num_samples=sweep.num_samples,
                                    scheduler=scheduler,
                                    max_concurrent_trials=max_concurrent(sweep, stream=launch.ingest == "stream")),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=storage_path(out), verbose=1 if ray_verbose() else 0,
            callbacks=[SweepProgress(sweep.grid_size * sweep.num_samples)],
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures)))


class SweepProgress(tune.Callback):
    """The sweep's progress line in place of Tune's trial tables (those only with ``-v``): trials
    done and failed, ETA, and the best val AUC so far, each trial's best epoch as Tune ranks."""

    def __init__(self, total: int) -> None:
        self.progress = Progress("sweep", total, unit="trials")
        self.best = -1.0

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        auc = result.get("best_val_auc")
        if auc is not None and auc > self.best:
            self.best, c = float(auc), trial.config
            self.progress.note = f"best val AUC {self.best:.3f} ({c.get('backbone')} freeze {c.get('freeze_ratio')})"

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.progress.update(1)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.progress.update(1, 1)

    def on_experiment_end(self, trials, **info) -> None:
        self.progress.close()


class SweepInterrupted(RuntimeError):
    """The sweep's driver loop stopped; its trials' checkpoints are kept for ``--resume``."""

    user_facing = True  # the CLI prints the message as it is: it already names cause and remedy


def _fit_or_explain(tuner, data_dir: str, out: str, address: str | None = None):
    """``tuner.fit()``; if Tune's controller itself fails (e.g. its workers were killed by Ray's
    memory monitor faster than ``max_failures`` covers), one line naming the cause and the
    command that continues the sweep from its checkpoints, instead of a 150-line traceback."""
    try:
        if ray_verbose():
            return tuner.fit()
        # Tune prints its experiment box and paths even at verbose=0: into the log file
        with contextlib.redirect_stdout(LogWriter("mammo_ray.tune_console", logging.DEBUG)):
            return tuner.fit()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "low on memory" in text or "OutOfMemory" in type(exc).__name__:
            text = f"Ray's memory monitor killed trial workers ({text[:160]})"
        address = address or os.environ.get("RAY_ADDRESS")
        command = ["mammo-ray", "tune", "--data", data_dir, "--out", out, "--resume",
                   *(["--address", address] if address else [])]
        raise SweepInterrupted(f"the sweep stopped: {text}; its checkpoints are kept: continue with "
                               f"`{shlex.join(command)}`") from exc


def _best_state(result, out: str) -> tuple[dict[str, Any] | None, str | None]:
    """The trial's ``best.pt`` from its Train run's last checkpoint (``TuneReportCallback`` puts
    the checkpoint's path among the metrics; the path is on the storage ``out`` lives on)."""
    from ray.train import Checkpoint

    where = (result.metrics or {}).get("checkpoint_path")
    if not where:
        return None, None
    fs, _ = mio.resolve(storage_path(out))
    with Checkpoint(where, filesystem=fs).as_directory() as d:
        best = os.path.join(d, "best.pt")
        if not os.path.exists(best):
            return None, None
        local = tempfile.mkdtemp(prefix="mammo-best-")
        shutil.copy(best, os.path.join(local, "best.pt"))
    return load_checkpoint(os.path.join(local, "best.pt")), os.path.join(local, "best.pt")


def write_outputs(grid, out: str, sweep: SweepConfig) -> dict[str, Any]:
    """``results.csv``, ``table.md``, ``best/<backbone>-r<ratio>/checkpoint.pt``,
    ``best/overall/checkpoint.pt``, ``auc_vs_freezing.png``, ``summary.json`` (``sweep.yaml`` is
    written by ``run_sweep`` when the sweep starts)."""
    rows, files = [], {}
    for result in grid:
        config = result.config or {}
        metrics = result.metrics or {}
        state, local = _best_state(result, out)
        best = (state or {}).get("metrics", {})
        trial_id = metrics.get("trial_id") or os.path.basename(result.path)
        base_lr, max_lr = config.get("lr_bounds") or (config.get("base_lr"), config.get("max_lr"))
        rows.append({
            "trial_id": trial_id, "backbone": config.get("backbone"), "freeze_ratio": config.get("freeze_ratio"),
            "base_lr": base_lr, "max_lr": max_lr, "clr_mode": config.get("clr_mode"),
            "status": "ERROR" if result.error else "TERMINATED",
            "epochs_run": metrics.get("training_iteration"), "best_epoch": (state or {}).get("epoch"),
            **{k: best.get(k) for k in ("val_auc", "val_auc_low", "val_auc_high", "val_accuracy", "val_precision",
                                         "val_recall", "val_f1", "val_loss")},
            "time_s": metrics.get("time_total_s"), "restored": bool(metrics.get("restored", False)),
            "workers": metrics.get("workers"), "placement": metrics.get("placement"),
            "node_id": metrics.get("node_id"), "gpu_ids": metrics.get("gpu_ids"), "device": metrics.get("device"),
            "started_at": metrics.get("started_at"), "finished_at": metrics.get("timestamp"), "checkpoint": local,
        })
        files[trial_id] = local
    rows.sort(key=lambda r: (r["backbone"], r["freeze_ratio"], r["base_lr"], r["trial_id"]))
    table_rows, best_rows = group_best(rows)
    for r in best_rows:
        name = f"{r['backbone']}-r{r['freeze_ratio']:g}"
        _copy_checkpoint(r["checkpoint"], mio.join(out, "best", name, "checkpoint.pt"))
    scored = [r for r in rows if r["val_auc"] is not None and not is_nan(r["val_auc"])]
    overall = max(scored, key=lambda r: r["val_auc"]) if scored else None
    if overall:
        _copy_checkpoint(overall["checkpoint"], mio.join(out, "best", "overall", "checkpoint.pt"))
    public = [{k: r[k] for k in RESULT_FIELDS if k != "checkpoint"} for r in rows]
    write_results_csv(mio.join(out, "results.csv"), public)
    overlap = best_vs_rest(table_rows)
    if overlap:
        logger.info("%s", overlap["statement"])
    mio.write_bytes(mio.join(out, "table.md"), table_markdown(table_rows, overlap).encode())
    plot_auc_vs_freezing(rows, mio.join(out, "auc_vs_freezing.png"))
    summary = {"trials": len(rows), "errors": sum(r["status"] == "ERROR" for r in rows),
               "best": {k: overall[k] for k in RESULT_FIELDS if k != "checkpoint"} if overall else None,
               "best_vs_rest": overlap}
    mio.write_bytes(mio.join(out, "summary.json"), json.dumps(summary, indent=2, default=str).encode())
    for local in files.values():
        if local:
            shutil.rmtree(os.path.dirname(local), ignore_errors=True)
    return {**summary, "results": public}


def _copy_checkpoint(local: str | None, dest: str) -> None:
    if local:
        with open(local, "rb") as f:
            mio.write_bytes(dest, f.read())


