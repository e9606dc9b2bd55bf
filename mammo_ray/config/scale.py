"""How a training run or trial scales: data-parallel workers, their resources, the ingest.

Checked here, below torch and Ray, so a bad value is one line before any process starts.
``train`` holds these in :class:`TrainConfig`; a sweep holds the worker count and resources at
its top level (per trial) and the rest in its ``train:`` keys.
"""
from __future__ import annotations

from typing import Any

from mammo_ray.config.base import _check_choice

#: memory: the split decoded into arrays once, shipped through Ray's object store; stream: Ray
#: Data reads the split's Parquet shards into each worker, O(batch) memory; auto: memory where
#: the split fits the memory budget (``mammo_ray.train.ingest.choose_ingest``), stream otherwise
INGEST_MODES = ("auto", "memory", "stream")
#: local: file order shuffled each epoch plus a seeded local buffer; full: Ray Data's global
#: random_shuffle each epoch (a shuffle across every row: costly on a large split)
SHUFFLE_MODES = ("local", "full")
MAX_WORKERS = 4096


def check_workers(workers: Any, cpus_per_worker: Any, gpus_per_worker: Any) -> None:
    """Refuse a worker count below 1 and resources Ray cannot place (one line each)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers={workers!r}: use a whole number of data-parallel workers in [1, {MAX_WORKERS}]")
    if cpus_per_worker is not None and not float(cpus_per_worker) > 0:
        raise ValueError(f"cpus_per_worker={cpus_per_worker!r}: use a number > 0")
    if gpus_per_worker is not None:
        g = float(gpus_per_worker)
        if g < 0:
            raise ValueError(f"gpus_per_worker={gpus_per_worker!r}: use a number >= 0")
        if g > 1 and g != int(g):
            # Ray packs fractions of one GPU, or whole GPUs: 1.5 GPUs is a worker Ray cannot place
            raise ValueError(f"gpus_per_worker={g:g}: use a fraction of one GPU (e.g. 0.5) or a whole number (1, 2, ...)")
        if workers > 1 and 0 < g < 1:
            # nccl cannot put two ranks of one process group on one GPU
            raise ValueError(f"gpus_per_worker={g:g} with workers={workers}: data-parallel workers need a whole GPU "
                             "each (nccl); use --gpus-per-worker 1, or --workers 1 to share a GPU between trials")


def check_ingest(ingest: str, shuffle: str, shuffle_buffer: int, accumulate: int, imbalance: str) -> None:
    """Refuse an unknown ingest or shuffle, ``accumulate`` below 1, and a balanced sampler on a stream."""
    _check_choice("ingest", ingest, INGEST_MODES)
    _check_choice("shuffle", shuffle, SHUFFLE_MODES)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or not 1 <= accumulate <= 4096:
        raise ValueError(f"accumulate={accumulate!r}: use a whole number of micro-batches per optimizer step in [1, 4096]")
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer={shuffle_buffer!r}: use a whole number of rows >= 0 (0: no local buffer)")
    if ingest == "stream" and imbalance == "balanced_sampler":
        raise ValueError("imbalance='balanced_sampler' with ingest='stream': the sampler draws with replacement from "
                         "a split in memory; use imbalance=weighted_loss to stream, or ingest=memory")


def per_worker(workers: int, per_worker_value: float | None, per_trial_value: float | None, *, name: str,
               default: float) -> float:
    """A worker's share of a resource, from ``--{name}-per-worker`` or ``--{name}-per-trial``.

    The two flags mean the same thing at one worker; at more they must agree
    (``per_trial == workers x per_worker``) or only one be given.

    Raises:
        ValueError: both given and in conflict, naming both values and the product expected.
    """
    if per_worker_value is not None and per_trial_value is not None:
        if abs(float(per_worker_value) * workers - float(per_trial_value)) > 1e-9:
            raise ValueError(f"{name}_per_trial={float(per_trial_value):g} and {name}_per_worker="
                             f"{float(per_worker_value):g} with workers={workers} disagree: a trial holds workers x "
                             f"{name}_per_worker = {float(per_worker_value) * workers:g}; give one of the two")
        return float(per_worker_value)
    if per_worker_value is not None:
        return float(per_worker_value)
    if per_trial_value is not None:
        return float(per_trial_value) / workers
    return default
