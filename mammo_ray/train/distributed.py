"""Data-parallel runs on Ray Train: a ``TorchTrainer`` whose workers run the one training loop.

Every worker calls :func:`mammo_ray.train.loop.fit` (through :func:`worker_loop`) inside the
process group ``TorchTrainer`` set up (gloo on CPU, nccl on GPU). What the workers need is
prepared once on the driver (:class:`Launch`): the starting weights and, for the in-memory
ingest, the decoded splits, both put in Ray's object store once; for the streamed ingest,
Ray Data datasets handed to the trainer (``datasets=``), split across the workers without
dropping or repeating a row (:class:`EveryRowOnce`).

Rank 0 writes its files into a local folder and reports it as the epoch's checkpoint
(``ray.train.report``); Ray Train persists it to ``storage_path`` and, when a worker dies,
restarts the group from it (``FailureConfig``). A ``tune`` trial builds the same trainer in
its function trainable and reports to Tune through ``TuneReportCallback``, as Ray's Train +
Tune guide does.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
from ray import LoggingConfig
from ray.data import DataContext
from ray.train import DataConfig
from ray.train.torch import TorchTrainer

from mammo_ray.config import TRAIN, VAL, PreprocessSpec, TrainConfig
from mammo_ray.console import ray_verbose
from mammo_ray.train.ingest import SplitTotals, split_dataset
from mammo_ray.train.rendezvous import BoundTorchConfig

logger = logging.getLogger(__name__)

@dataclass
class Launch:
    """What a data-parallel run's workers need, prepared once on the driver.

    Attributes:
        arrays: an ObjectRef of ``(train, val)`` SplitArrays (``ingest='memory'``), else None.
        totals: each split's rows and class counts (the loss weight and the LR's step count
            must agree on every rank, whatever its shard holds).
        start: an ObjectRef of the starting state dict (resolved on the driver), or None.
        resume: an ObjectRef of a ``last.pt``'s bytes to continue from (``train --resume``).
        trace_dir: a folder every rank appends the image ids it trains on to, one file per
            epoch and rank (the exactly-once and determinism tests read them), or None.
        log_level: rank 0's level for mammo_ray's records, which Ray prints on the driver's
            console (``train``: INFO, an epoch line each epoch; a sweep's trials: WARNING, the
            sweep's progress line says it); the other ranks log warnings only.
    """

    cfg: TrainConfig
    spec: PreprocessSpec
    data_dir: str
    ingest: str
    totals: dict[str, SplitTotals]
    arrays: Any = None
    start: Any = None
    resume: Any = None
    trace_dir: str | None = None
    log_level: str = "INFO"
    extra_metrics: dict[str, Any] = field(default_factory=dict)


class EveryRowOnce(DataConfig):
    """Ray Train's dataset split with ``equal=False`` and the order preserved.

    Ray's default (``equal=True``) truncates each epoch to a multiple of the worker count:
    up to ``workers - 1`` images never trained on. The loop handles uneven shards (a rank that
    runs out joins the others' all-reduce with zero-weight steps), so every row is kept; with
    ``preserve_order`` the split is a function of the (seeded) file order, so the same seed
    and worker count give every rank the same rows in the same order.
    """

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any,
                  **kwargs: Any) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            # the driver's options (Ray's default ingest options set a deprecated field)
            options = copy.deepcopy(DataContext.get_current().execution_options)
            options.preserve_order = True
            ds.context.execution_options = options
            # one bar per operator per epoch from every split coordinator, on the driver's console
            ds.context.enable_progress_bars = False
            ds.context.print_on_execution_start = False
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output


def _feeds(launch: Launch):
    from mammo_ray.train.feed import MemoryFeed, StreamFeed

    cfg = launch.cfg
    if launch.ingest == "memory":
        train, val = ray.get(launch.arrays)
        return MemoryFeed(train), MemoryFeed(val)
    t, v = launch.totals[TRAIN], launch.totals[VAL]
    return (StreamFeed(ray.train.get_dataset_shard(TRAIN), rows=t.rows, class_counts=t.class_counts,
                       shuffle_buffer=cfg.shuffle_buffer if cfg.shuffle == "local" else 0),
            StreamFeed(ray.train.get_dataset_shard(VAL), rows=v.rows, class_counts=v.class_counts))


def _restore(work: str, launch: Launch) -> str | None:
    """The ``last.pt`` this worker continues from: Ray Train's latest checkpoint (a restarted
    worker group, a resumed sweep), else ``train --resume``'s file, else None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            for name in os.listdir(d):
                shutil.copy(os.path.join(d, name), os.path.join(work, name))
        return os.path.join(work, "last.pt")
    if launch.resume is not None:
        path = os.path.join(work, "resume-last.pt")
        with open(path, "wb") as f:
            f.write(ray.get(launch.resume))
        return path
    return None


def _placement(device: Any) -> dict[str, Any]:
    return {"node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()), "device": str(device)}


def _tracer(folder: str | None, rank: int):
    if not folder:
        return None

    def trace(epoch: int, ids: list[str]) -> None:
        with open(os.path.join(folder, f"epoch{epoch}-rank{rank}.txt"), "a") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return trace


def worker_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: every rank runs :func:`mammo_ray.train.loop.fit`."""
    import ray.train.torch
    import torch

    from mammo_ray.models.inference import resolve_device
    from mammo_ray.train.loop import fit
    from mammo_ray.train.ranks import current

    from ray.train.v2._internal.execution import context as train_context

    # Ray Train logs every report of every rank at INFO, under a logger named by its file path
    # (logging.getLogger(__file__)), not under "ray.train": quieted by that name
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    launch: Launch = config["launch"]
    # Train's device is this rank's GPU when it was given one; a logical GPU (or a torch without
    # CUDA) runs on the CPU, with resolve_device's one warning, rather than failing every restart
    ranks = current()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else resolve_device("auto")
    # rank 0 logs the run's lines (train); the others would repeat them
    logging.getLogger("mammo_ray").setLevel(launch.log_level if ranks.main else logging.WARNING)
    train, val = _feeds(launch)
    work = tempfile.mkdtemp(prefix="mammo-rank-")
    resume = _restore(work, launch)
    placements = ranks.gather(_placement(device))
    where = {"workers": ranks.world, "node_id": placements[0]["node_id"], "gpu_ids": placements[0]["gpu_ids"],
             "device": placements[0]["device"],
             "placement": json.dumps([[p["node_id"][:12], p["gpu_ids"]] for p in placements])}

    def on_epoch(metrics: dict[str, Any], out: str | None) -> None:
        # every rank reports (Ray Train's report is a barrier); rank 0 alone hands its folder over
        checkpoint = ray.train.Checkpoint.from_directory(out) if out else None
        ray.train.report({k: (float("nan") if v is None else v) for k, v in metrics.items()}
                         | {"restored": resume is not None, **where, **launch.extra_metrics}, checkpoint=checkpoint)

    try:
        fit(launch.cfg, launch.spec, train, val, out=work, resume=resume, on_epoch=on_epoch, ranks=ranks,
            device=device, initial_state=ray.get(launch.start) if launch.start is not None else None,
            trace=_tracer(launch.trace_dir, ranks.rank))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def make_trainer(launch: Launch, *, name: str, storage_path: str, max_failures: int = 2,
                 callbacks: list[Any] | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` of one run: ``launch.cfg.workers`` workers of the configured size,
    the streamed datasets when ``launch.ingest == 'stream'``, checkpoints kept 2
    deep under ``storage_path/name`` and ``max_failures`` restarts of the worker group."""
    cfg = launch.cfg
    gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if gpu else {})}
    datasets = None
    if launch.ingest == "stream":
        datasets = {TRAIN: split_dataset(launch.data_dir, TRAIN, seed=cfg.seed, shuffle=cfg.shuffle,
                                         block_rows=cfg.batch_size),
                    VAL: split_dataset(launch.data_dir, VAL, seed=cfg.seed, block_rows=cfg.eval_batch_size)}
    return TorchTrainer(
        worker_loop, train_loop_config={"launch": launch},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=gpu, resources_per_worker=resources),
        # gloo for the group Train sets up, on CPUs and GPUs alike; the gradients get an nccl
        # group where the model is on CUDA (train/ranks.py: gradient_group says why). Its
        # sockets listen on the workers' meeting address only (train/rendezvous.py)
        torch_config=BoundTorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks or [],
                                       # Train's own INFO lines (resources requested, worker group
                                       # started, process group set up) only with -v
                                       logging_config=LoggingConfig(log_level="INFO" if ray_verbose() else "WARNING"),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets=datasets, dataset_config=EveryRowOnce() if datasets else None)
