"""Ray Tune sweeps: one trial = one backbone x freezing ratio x cyclic-LR bounds (x mode).

The preprocessed splits are loaded once on the driver and shipped to trials through the
object store (``tune.with_parameters``), not re-read by every trial. Trials checkpoint
every epoch (``last.pt`` + ``best.pt``); a failed trial restarts from its last checkpoint
(``FailureConfig``) and an interrupted sweep continues with ``--resume``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import math
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from mammo_ray import io as mio
from mammo_ray.config import SweepConfig, TrainConfig, from_mapping, to_dict
from mammo_ray.models.checkpoint import load_checkpoint
from mammo_ray.models.inference import resolve_device
from mammo_ray.models.weights import resolve_weights
from mammo_ray.outputs import check_out_location, finish_out, start_out
from mammo_ray.console import LogWriter, Progress, ray_verbose
from mammo_ray.ray_utils import init_ray
from mammo_ray.train.data import load_training_data
from mammo_ray.train.loop import fit
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
                            batch_size=sweep.batch_size, seed=sweep.seed)


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (float("nan") if v is None else v) for k, v in metrics.items()}


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


def train_trial(config: dict[str, Any], *, data: tuple, sweep_dict: dict[str, Any],
                start_weights: dict[str, dict] | None = None) -> None:
    """The Tune function trainable (Ray 2.60 API: ``ray.tune.report`` / ``get_checkpoint``)."""
    node_id = ray.get_runtime_context().get_node_id()
    # one "Checkpoint successfully created" INFO line per trial per epoch floods the driver's
    # console; Tune's own progress table already says where checkpoints are
    logging.getLogger("ray.train").setLevel(logging.WARNING)

    cfg = trial_train_config(config, from_mapping(SweepConfig, sweep_dict))
    # which GPUs Ray gave this trial (it also sets CUDA_VISIBLE_DEVICES to them), and when it
    # started: results.csv shows placement, and the scheduling tests check packing with them
    placement = {"gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()), "started_at": time.time(),
                 "device": str(resolve_device(cfg.device))}
    spec, train, val = data
    work = tempfile.mkdtemp(prefix="mammo-trial-")
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        restored = checkpoint.to_directory(tempfile.mkdtemp(prefix="mammo-restored-"))
        for name in ("last.pt", "best.pt"):
            if os.path.exists(os.path.join(restored, name)):
                shutil.copy(os.path.join(restored, name), os.path.join(work, name))
        shutil.rmtree(restored, ignore_errors=True)
        resume = os.path.join(work, "last.pt")
        logger.info("trial restored from its checkpoint (epoch in %s)", resume)

    def on_epoch(metrics: dict[str, Any], out: str | None) -> None:
        # fit() has just written last.pt/best.pt into `out`: Tune persists that folder as the
        # epoch's checkpoint (one copy, into the storage path; no staging copy of our own).
        # metrics carry best_val_auc (the trial's best epoch so far, kept across a restore): what
        # Tune ranks by ("Current best trial" on the console, ASHA's rungs), not the last epoch's
        tune.report(_finite({**metrics, "restored": resume is not None, "node_id": node_id, **placement}),
                    checkpoint=tune.Checkpoint.from_directory(out))

    try:
        fit(cfg, spec, train, val, out=work, resume=resume, on_epoch=on_epoch,
            initial_state=(start_weights or {}).get(cfg.backbone))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_resources(sweep: SweepConfig) -> None:
    """Refuse a trial size that no node of the cluster can host (before any trial starts)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    max_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    max_gpu = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    if sweep.gpus_per_trial > max_gpu:
        raise ValueError(f"gpus_per_trial={sweep.gpus_per_trial}: no node has that many GPUs "
                         f"(largest node: {max_gpu:g} GPU{'s' if max_gpu != 1 else ''})")
    if sweep.cpus_per_trial > max_cpu:
        raise ValueError(f"cpus_per_trial={sweep.cpus_per_trial}: no node has that many CPUs (largest node: {max_cpu:g})")


def storage_path(out: str) -> str:
    return mio.join(out, "tune") if mio.is_uri(out) else os.path.join(os.path.abspath(out), "tune")


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
        ValueError: bad data, a resume path without a sweep, trials larger than any node.
    """
    check_out_location(out, folders=[data_dir])
    path = mio.join(storage_path(out), EXPERIMENT)
    if resume and not tune.Tuner.can_restore(path):
        raise ValueError(f"--resume {out}: holds no sweep to resume (no Tune experiment at {path})")
    spec, train, val = load_training_data(data_dir)
    init_ray(address)
    check_resources(sweep)
    start_weights = resolve_start_weights(sweep)  # before anything is written: a bad file stops here
    if confirm is not None and not resume:
        first = trial_train_config({k: v["grid_search"][0] for k, v in param_space(sweep).items()
                                    if isinstance(v, dict)} | _first_sample(sweep), sweep)
        confirm(sweep_plan(sweep, first, spec, train, val, gpus=ray.cluster_resources().get("GPU", 0),
                           initial_state=start_weights.get(first.backbone)))
    start_out(out, "tune", overwrite=overwrite, resume=resume)  # refuses an --out holding a run (also a sweep)
    if not resume:  # the sweep's own file: `--resume` reads it back, outputs describe themselves
        mio.write_bytes(mio.join(out, "sweep.yaml"), yaml.safe_dump(to_dict(sweep), sort_keys=False).encode())
    logger.info("sweep: %d grid points x %d samples on %s; train %d, val %d images", sweep.grid_size,
                sweep.num_samples, ", ".join(sweep.backbones), len(train), len(val))
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, data=(spec, train, val), sweep_dict=to_dict(sweep),
                             start_weights=start_weights),
        {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial})
    if resume:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if sweep.scheduler == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=sweep.epochs,
                                      grace_period=min(sweep.grace_period, sweep.epochs), reduction_factor=2)
        tuner = tune.Tuner(
            trainable, param_space=param_space(sweep),
            # reuse_actors: a trial that ends hands its process (its resources) to the next one
            # instead of a new actor importing torch, torchvision and timm again (~10 s of CPU
            # each on a small node); train_trial keeps no state between trials.
            tune_config=tune.TuneConfig(metric="best_val_auc", mode="max", num_samples=sweep.num_samples,
                                        scheduler=scheduler, reuse_actors=True),
            run_config=tune.RunConfig(
                name=EXPERIMENT, storage_path=storage_path(out), verbose=1 if ray_verbose() else 0,
                callbacks=[SweepProgress(sweep.grid_size * sweep.num_samples)],
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    grid = _fit_or_explain(tuner, data_dir, out, address)
    summary = write_outputs(grid, out, sweep)
    finish_out(out, "tune")
    return summary


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


def _best_state(result) -> tuple[dict[str, Any] | None, str | None]:
    if result.checkpoint is None:
        return None, None
    with result.checkpoint.as_directory() as d:
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
        state, local = _best_state(result)
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


