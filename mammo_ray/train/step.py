"""One training epoch on one rank: micro-batches, gradient accumulation, the optimizer step.

Each micro-batch's loss is a *sum* over its images; gradients accumulate over
``cfg.accumulate`` micro-batches (DDP all-reduces only the last one's, ``no_sync`` the rest)
and are scaled to a mean over every image of the optimizer step, however the images were
split across ranks and micro-batches (:func:`_optimizer_step`). Ranks whose shards run out
first join the others' all-reduce with zero-weight steps (``train/feed.py``).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mammo_ray.config import PreprocessSpec, TrainConfig
from mammo_ray.console import Progress
from mammo_ray.data.arrays import SplitArrays
from mammo_ray.models.freezing import train_mode
from mammo_ray.models.inference import autocast, normalize, to_unit
from mammo_ray.models.normalization import Normalization, resolve_normalization
from mammo_ray.train.data import augment_batch, augment_params
from mammo_ray.train.feed import MIN_BATCH, Batch, MemoryFeed, StreamFeed, as_feed, optimizer_steps, with_lookahead
from mammo_ray.train.ranks import SINGLE, Ranks, unwrap


def batch_input(pixels: np.ndarray, norm: Normalization, device: torch.device, *, channels_last: bool,
                augment: np.ndarray | None = None) -> torch.Tensor:
    """A training batch: stored pixels -> [0, 1] -> (seeded augmentation) -> normalized."""
    x = to_unit(pixels, device)
    if augment is not None:
        x = augment_batch(x, augment)
    return normalize(x, norm, channels_last=channels_last)


class _LogLines:
    """The progress lines' stream beside tqdm: never a terminal, so Progress logs a line every
    interval instead of redrawing one (tqdm owns the terminal)."""

    @staticmethod
    def isatty() -> bool:
        return False


_NO_TTY = _LogLines()


@contextlib.contextmanager
def _kept_buffers(model: torch.nn.Module, keep: bool):
    """Restore BatchNorm's running statistics after a zero-weight step (a rank whose shard ended
    early repeats a batch only to join the others' gradient all-reduce)."""
    saved = [b.detach().clone() for b in model.buffers()] if keep else None
    try:
        yield
    finally:
        if saved is not None:
            with torch.no_grad():
                for b, s in zip(model.buffers(), saved, strict=True):
                    b.copy_(s)


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, scale: float) -> None:
    """One optimizer step on gradients summed over the step's images (all ranks, all
    micro-batches): scaled by ``world / images`` here, after DDP's all-reduce averaged them over
    ranks, so the step is the mean over every image of the step, however they were split."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(scale)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _dummy_batch(spec: PreprocessSpec) -> Batch:
    """A zero-weight stand-in for a rank whose shard holds no image at all."""
    h, w = spec.size
    return Batch(np.zeros((MIN_BATCH, h, w), np.dtype(spec.dtype)), np.zeros(MIN_BATCH, np.int64), [""] * MIN_BATCH)


def _agree(batches: Any, last: Batch | None, spec: PreprocessSpec,
           ranks: Ranks) -> tuple[Batch, float, float, float] | None:
    """This rank's next micro-batch and what every rank agrees on, in one all-reduce: (batch,
    weight, images of this micro-step on all ranks, ranks with more to come), or None when no
    rank has a batch left. A rank whose shard has ended repeats its last batch at weight 0."""
    batch, more = next(batches, (None, False))
    n_all, active, more_all = ranks.sum([len(batch) if batch is not None else 0, batch is not None, more])
    if active == 0:
        return None
    if batch is None:
        return last or _dummy_batch(spec), 0.0, n_all, more_all
    return batch, 1.0, n_all, more_all


def _backward(model: torch.nn.Module, core: torch.nn.Module, batch: Batch, weight: float, *, cfg: TrainConfig,
              epoch: int, norm: Normalization, device: torch.device, pos_weight: torch.Tensor | None,
              scaler: torch.amp.GradScaler | None, sync: bool) -> float:
    """Forward and backward of one micro-batch (seeded augmentation on the worker): its summed
    loss, times ``weight`` (0: a rank's stand-in step). Without ``sync``, DDP keeps the
    gradients local (``no_sync``); the step's last micro-batch all-reduces them."""
    aug = augment_params(batch.image_ids, seed=cfg.seed, epoch=epoch, hflip=cfg.hflip) if cfg.augment else None
    x = batch_input(batch.pixels, norm, device, channels_last=cfg.channels_last, augment=aug)
    y = torch.from_numpy(batch.labels.astype(np.float32)).to(device, non_blocking=True)
    quiet = contextlib.nullcontext() if sync else model.no_sync()
    with quiet, _kept_buffers(core, keep=weight == 0.0):
        with autocast(device, cfg.amp):
            logits = model(x).squeeze(1).float()
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="sum") * weight
        (scaler.scale(loss) if scaler is not None else loss).backward()
    return float(loss.detach())


def train_one_epoch(model: torch.nn.Module, train: SplitArrays | MemoryFeed | StreamFeed, *, cfg: TrainConfig,
                    spec: PreprocessSpec, optimizer: torch.optim.Optimizer, scheduler: Any,
                    loss_fn: torch.nn.Module, device: torch.device, epoch: int,
                    scaler: torch.amp.GradScaler | None = None, progress: bool = False,
                    progress_every_s: float = 0.0, norm: Normalization | None = None,
                    ranks: Ranks = SINGLE, trace: Callable[[int, list[str]], None] | None = None) -> dict[str, float]:
    """One pass over the training split on this rank. Returns the mean loss and the images of
    every rank, seconds, and images/s.

    Each micro-batch's loss is a *sum* over its images; gradients accumulate over
    ``cfg.accumulate`` micro-batches (DDP all-reduces only the last one's, ``no_sync`` the
    rest) and are scaled to a mean over every image of the step (:func:`_optimizer_step`). The
    cyclic LR steps once per optimizer step. Ranks agree each micro-batch on how many images
    the step holds and whether any rank has more: one all-reduce of three numbers.

    ``progress``: tqdm's bar (a terminal); ``progress_every_s`` > 0: a logged progress line at
    most that often (a log file or CI, where tqdm draws nothing for a whole epoch). ``norm``:
    the input normalisation (default: resolved from the starting weights and ``spec``).
    ``trace``: called with (epoch, image ids) for each micro-batch this rank trains on.
    """
    feed, core = as_feed(train), unwrap(model)
    norm = norm or resolve_normalization(cfg, spec)
    train_mode(core, cfg.backbone, cfg.freeze_ratio)
    pos_weight = getattr(loss_fn, "pos_weight", None)
    batches = with_lookahead(feed.train_batches(epoch=epoch, seed=cfg.seed, batch_size=cfg.batch_size, ranks=ranks,
                                                balanced=cfg.imbalance == "balanced_sampler"))
    planned = optimizer_steps(feed.rows, cfg.batch_size, ranks.world, cfg.accumulate, cfg.max_batches)
    lines = Progress(f"epoch {epoch}/{cfg.epochs}", planned * cfg.accumulate * cfg.batch_size * ranks.world,
                     interval=progress_every_s, stream=_NO_TTY) if progress_every_s > 0 and ranks.main else None
    bar = tqdm(total=planned, desc=f"epoch {epoch}", leave=False, disable=not (progress and ranks.main))
    total = seen = step_images = 0.0
    micro = steps = 0
    last: Batch | None = None
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    while (agreed := _agree(batches, last, spec, ranks)) is not None:
        batch, weight, n_all, more_all = agreed
        last, micro, step_images = batch, micro + 1, step_images + n_all
        sync = micro == cfg.accumulate or more_all == 0
        loss = _backward(model, core, batch, weight, cfg=cfg, epoch=epoch, norm=norm, device=device,
                         pos_weight=pos_weight, scaler=scaler, sync=sync or not ranks.distributed)
        if weight:
            total, seen = total + loss, seen + len(batch)
            if trace is not None:
                trace(epoch, list(batch.image_ids))
            if lines is not None:
                lines.note = f"train_loss {total / seen:.4f}"
                lines.update(len(batch) * ranks.world)
        if sync:
            _optimizer_step(optimizer, scaler, ranks.world / step_images)
            scheduler.step()
            bar.update(1)
            micro, steps, step_images = 0, steps + 1, 0.0
            if cfg.max_batches and steps >= cfg.max_batches:
                break
    bar.close()
    total, seen = ranks.sum([total, seen])
    seconds = time.perf_counter() - t0
    return {"train_loss": total / max(seen, 1), "images": int(seen), "steps": steps, "seconds": seconds,
            "train_images_per_s": seen / seconds if seconds > 0 else 0.0}
