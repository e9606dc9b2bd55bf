"""A sweep's plan before it starts: trials x epochs and an estimate of its time, timed by a short
probe (a few training steps of the first trial's model on the sweep's batch size).

The estimate is rough on purpose (the probe runs on the driver, trials share the machine's
cores), but it tells 10 minutes from 10 hours before anyone waits for either.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from mammo_ray.config import PreprocessSpec, SweepConfig, TrainConfig
from mammo_ray.models.inference import resolve_device
from mammo_ray.data.arrays import SplitArrays
from mammo_ray.train.loop import build_training_model, make_loss, make_optimizer, make_scheduler
from mammo_ray.train.step import train_one_epoch

logger = logging.getLogger(__name__)

#: training steps timed by the probe (after one untimed warm-up step)
PROBE_STEPS = 2
#: a val image (forward only, no augmentation) costs about a third of a training image
EVAL_SHARE = 1 / 3


def probe_seconds_per_image(cfg: TrainConfig, spec: PreprocessSpec, train: SplitArrays, *,
                            initial_state: dict[str, torch.Tensor] | None = None,
                            steps: int = PROBE_STEPS) -> float:
    """Seconds per training image of ``cfg``'s model: one warm-up step, then ``steps`` timed.

    Args:
        initial_state: the starting weights already resolved (else the model starts at random:
            the time per step does not depend on the weights).
    """
    device = resolve_device(cfg.device)
    probe = dataclasses.replace(cfg, pretrained=None, weights=None)
    model = build_training_model(probe, initial_state).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, max(1, len(train) // cfg.batch_size))
    cfg = dataclasses.replace(cfg, accumulate=1)  # the probe times single steps, in one process
    loss_fn = make_loss(cfg, train, device)
    kw = dict(spec=spec, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, device=device, epoch=1)
    train_one_epoch(model, train, cfg=dataclasses.replace(cfg, max_batches=1), **kw)  # warm-up: allocations
    timed = train_one_epoch(model, train, cfg=dataclasses.replace(cfg, max_batches=steps), **kw)
    return timed["seconds"] / max(timed["images"], 1)


def sweep_plan(sweep: SweepConfig, first: TrainConfig, spec: PreprocessSpec, sample: SplitArrays,
               totals: dict[str, Any], *, gpus: float,
               initial_state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """The plan: ``{"trials", "epochs", "seconds_per_image", "estimate_s", "gpus", "line"}``.

    Args:
        first: the first trial's training config (its model is probed, in one process).
        sample: training rows to probe on (the split, or its first rows when it streams).
        totals: each split's rows (``train.ingest.SplitTotals``).
        gpus: the cluster's GPUs; on GPUs, trials that fit side by side divide the time, and
            a trial's workers divide its own.
    """
    trials = sweep.grid_size * sweep.num_samples
    n_train, n_val = totals["train"].rows, totals["val"].rows
    per_image = probe_seconds_per_image(first, spec, sample, initial_state=initial_state)
    images = n_train if not first.max_batches else min(n_train, first.max_batches * first.batch_size * sweep.workers)
    per_trial = sweep.epochs * (images + EVAL_SHARE * n_val) * per_image
    side_by_side = 1
    trial_gpus = sweep.workers * sweep.worker_gpus
    if gpus and trial_gpus:
        # on GPUs, a trial's workers each take their share; on CPUs they share the probe's cores
        per_trial /= sweep.workers
        side_by_side = max(1, min(trials, math.floor(gpus / trial_gpus)))
    # on CPUs, trials side by side share the cores the probe used alone: no speed-up assumed
    estimate = trials * per_trial / side_by_side
    line = (f"plan: {trials} trials x {sweep.epochs} epochs ({sweep.grid_size} grid points x {sweep.num_samples} "
            f"samples), {n_train} train / {n_val} val images; estimate {_duration(estimate)} "
            f"({per_image * 1000:.0f} ms per training image, timed on {PROBE_STEPS} steps of "
            f"{first.backbone} at batch {first.batch_size})")
    return {"trials": trials, "epochs": sweep.epochs, "seconds_per_image": per_image, "estimate_s": estimate,
            "gpus": gpus, "line": line}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
