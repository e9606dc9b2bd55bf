"""The driver's side of a data-parallel run: checks before any worker starts, the launch, the outputs.

``mammo-ray train --workers N`` (N > 1, or a streamed ingest) comes here; one worker in
memory trains in this process through the same loop (``cli/commands.py``). A sweep's trials
use :func:`prepare_launch` and :func:`check_cluster` too (``train/sweep.py``).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from typing import Any

from mammo_ray import io as mio
from mammo_ray.config import LABELS, TRAIN, VAL, TrainConfig
from mammo_ray.train.distributed import Launch, make_trainer
from mammo_ray.train.feed import check_ranks
from mammo_ray.train.ranks import Ranks
from mammo_ray.train.ingest import SplitTotals, choose_ingest, read_totals

logger = logging.getLogger(__name__)

OUTPUT_FILES = ("best.pt", "last.pt", "history.csv", "config.yaml")


def check_totals(data_dir: str, totals: dict[str, SplitTotals], workers: int) -> None:
    """What ``load_training_data`` checks, from the footers and labels alone (no pixels read):
    labelled rows only, both classes in train, and enough rows for every worker.

    Raises:
        ValueError: one line naming the split, the count and what would fit.
    """
    for split in (TRAIN, VAL):
        t = totals[split]
        if t.rows == 0:
            raise ValueError(f"{data_dir}: no {split}/ split with rows (run `mammo-ray preprocess` without --external)")
        if sum(t.class_counts) != t.rows:
            raise ValueError(f"{data_dir}/{split}: {t.rows - sum(t.class_counts)} unlabeled rows; training needs "
                             "benign/malignant labels")
    counts = totals[TRAIN].class_counts
    if min(counts) == 0:
        only = LABELS[0 if counts[0] else 1]
        raise ValueError(f"{data_dir}/train: one class only ({max(counts)} {only}); training needs both benign and malignant")
    check_ranks(totals[TRAIN], totals[VAL], Ranks(0, workers))


def check_cluster(workers: int, cpus: float, gpus: float, *, concurrent: int = 1, stream: bool = False) -> None:
    """Refuse workers Ray cannot place: a worker larger than any node, or ``concurrent`` groups
    of ``workers`` larger than the cluster. A streamed ingest also needs a CPU left over for
    Ray Data's read tasks (workers holding every CPU would starve the reads that feed them).

    Raises:
        ValueError: one line naming the request and the largest node or the cluster's total.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    max_cpu = max((n.get("CPU", 0) for n in nodes), default=0)
    max_gpu = max((n.get("GPU", 0) for n in nodes), default=0)
    if gpus > max_gpu:
        raise ValueError(f"gpus_per_worker={gpus:g}: no node has that many GPUs (largest node: {max_gpu:g})")
    if cpus > max_cpu:
        raise ValueError(f"cpus_per_worker={cpus:g}: no node has that many CPUs (largest node: {max_cpu:g})")
    if workers * gpus > total_gpu:
        raise ValueError(f"workers={workers} x gpus_per_worker={gpus:g} = {workers * gpus:g} GPUs, but the cluster "
                         f"has {total_gpu:g}; use --workers {int(total_gpu // gpus) if gpus else workers} or fewer")
    spare = 1 if stream else 0
    if workers * cpus + spare > total_cpu:
        need = f"{workers * cpus:g} CPUs" + (" plus 1 for Ray Data's reads" if stream else "")
        raise ValueError(f"workers={workers} x cpus_per_worker={cpus:g} needs {need}, but the cluster has "
                         f"{total_cpu:g}; use fewer --workers or a smaller --cpus-per-worker (e.g. "
                         f"{max(0.1, (total_cpu - spare) / workers):.2g})")


def prepare_launch(cfg: TrainConfig, data_dir: str, *, start_state: dict | None = None,
                   resume: str | None = None) -> Launch:
    """Everything checked and shipped once before the trainer starts: the splits' totals, the
    ingest chosen (``memory`` puts the decoded splits in Ray's object store once), the
    starting weights and a ``--resume`` file's bytes."""
    import ray

    from mammo_ray.train.data import load_training_data

    spec, totals = read_totals(data_dir)
    check_totals(data_dir, totals, cfg.workers)
    ingest = choose_ingest(cfg, data_dir, spec, totals)
    arrays = None
    if ingest == "memory":
        spec, train, val = load_training_data(data_dir)
        arrays = ray.put((train, val))
    start = ray.put(start_state) if start_state is not None else None
    blob = None
    if resume:
        blob = ray.put(mio.read_bytes(resume))
    return Launch(cfg=replace(cfg, ingest=ingest), spec=spec, data_dir=data_dir, ingest=ingest, totals=totals,
                  arrays=arrays, start=start, resume=blob)


def train_storage(out: str) -> str:
    """Where Ray Train keeps a ``train`` run's checkpoints: ``OUT/ray_train`` (absolute)."""
    return mio.join(out, "ray_train") if mio.is_uri(out) else os.path.join(os.path.abspath(out), "ray_train")


def prepare_train(cfg: TrainConfig, data_dir: str, *, resume: str | None = None, address: str | None = None,
                  trace_dir: str | None = None) -> Launch:
    """Everything ``train`` on Ray Train checks and ships before ``--out`` is touched: Ray
    started or joined, the workers' size against the cluster, the splits' totals and ingest,
    the starting weights resolved once here (the workers never download).

    Args:
        trace_dir: where every rank records the image ids it trains on (see ``Launch``).

    Raises:
        ValueError: one line naming the bad value and what would fit.
    """
    from mammo_ray.models.weights import resolve_weights
    from mammo_ray.ray_utils import init_ray

    init_ray(address)
    check_cluster(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker, stream=cfg.ingest == "stream")
    start = None
    if cfg.pretrained is not None or cfg.weights is not None:
        start = resolve_weights(cfg.backbone, pretrained=cfg.pretrained, weights_path=cfg.weights, offline=cfg.offline)
    launch = replace(prepare_launch(cfg, data_dir, start_state=start, resume=resume), trace_dir=trace_dir)
    if launch.ingest == "stream" and cfg.ingest != "stream":  # auto chose to stream: Ray Data needs its CPU
        check_cluster(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker, stream=True)
    return launch


def execute_train(launch: Launch, out: str) -> dict[str, Any]:
    """Run a prepared ``train`` on Ray Train and write the in-process run's files to ``out``
    (``best.pt``, ``last.pt``, ``history.csv``, ``config.yaml``, ``metrics.json``), copied
    from the run's last checkpoint.

    Returns:
        ``{"best_epoch", "best_metrics", "history", "stopped_early", "ingest", "restored",
        "placement"}`` (``restored``: the worker group was restarted from a checkpoint).
    """
    from mammo_ray.models.checkpoint import load_checkpoint

    cfg = launch.cfg
    logger.info("train on Ray Train: %d worker(s) x %g CPU %g GPU, ingest %s, train %d val %d images",
                cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker, launch.ingest, launch.totals[TRAIN].rows,
                launch.totals[VAL].rows)
    result = make_trainer(launch, name="train", storage_path=train_storage(out)).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the training run ended without a checkpoint ({result.error})")
    with result.checkpoint.as_directory() as d:
        for name in OUTPUT_FILES:
            if os.path.exists(os.path.join(d, name)):
                with open(os.path.join(d, name), "rb") as f:
                    mio.write_bytes(mio.join(out, name), f.read())
        state = load_checkpoint(os.path.join(d, "last.pt"))
    history = list(state.get("history", []))
    summary = {"best_epoch": int(state.get("best_epoch", 0)), "best": dict(state.get("best_metrics", {})),
               "stopped_early": len(history) < cfg.epochs and bool(history), "epochs_run": len(history)}
    mio.write_bytes(mio.join(out, "metrics.json"), json.dumps(summary, indent=2).encode())
    metrics = result.metrics or {}
    return {"best_epoch": summary["best_epoch"], "best_metrics": summary["best"], "history": history,
            "stopped_early": summary["stopped_early"], "ingest": launch.ingest,
            "restored": bool(metrics.get("restored")), "placement": metrics.get("placement")}


def run_distributed_train(cfg: TrainConfig, data_dir: str, out: str, *, resume: str | None = None,
                          address: str | None = None, trace_dir: str | None = None) -> dict[str, Any]:
    """``mammo-ray train`` on Ray Train (:func:`prepare_train`, then :func:`execute_train`)."""
    return execute_train(prepare_train(cfg, data_dir, resume=resume, address=address, trace_dir=trace_dir), out)
