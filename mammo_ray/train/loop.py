"""The training loop: selective freezing, CyclicLR stepped per optimizer step, gradient
accumulation, early stopping on val AUC, best/last checkpoints, on one rank or many (DDP).
``train_one_epoch`` / ``evaluate`` / ``fit`` as in torchvision's references.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from mammo_ray import io as mio
from mammo_ray.config import PreprocessSpec, TrainConfig, to_dict
from mammo_ray.console import Progress
from mammo_ray.data.arrays import SplitArrays
from mammo_ray.metrics import binary_metrics as set_metrics
from mammo_ray.metrics import choose_threshold, delong_auc_ci
from mammo_ray.models.checkpoint import (
    checkpoint_config,
    load_checkpoint,
    save_checkpoint,
)
from mammo_ray.models.freezing import freeze_units, train_mode, trainable_parameters
from mammo_ray.models.inference import (
    autocast,
    normalize,
    predict,
    resolve_device,
    to_unit,
)
from mammo_ray.models.normalization import Normalization, checkpoint_normalization, resolve_normalization
from mammo_ray.models.recompute import checkpoint_units
from mammo_ray.models.registry import build_model
from mammo_ray.train.data import augment_batch, augment_params
from mammo_ray.train.feed import MIN_BATCH, Batch, MemoryFeed, StreamFeed, optimizer_steps, with_lookahead
from mammo_ray.train.ranks import SINGLE, Ranks
from mammo_ray.train.ranks import current as current_ranks

logger = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "val_precision", "val_recall", "val_f1",
                  "lr", "seconds", "train_images_per_s", "train_images", "optimizer_steps")


def build_training_model(cfg: TrainConfig, initial_state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Backbone from the registry (random init, ImageNet cache or a file), then frozen by ratio.

    ``initial_state``: the starting weights already resolved elsewhere (a sweep's driver resolves
    ``cfg.pretrained``/``cfg.weights`` once and ships the tensors to its trials), used instead of
    reading or downloading them here.
    """
    if initial_state is not None:
        model = build_model(cfg.backbone, state_dict=initial_state)
    else:
        model = build_model(cfg.backbone, pretrained=cfg.pretrained, weights_path=cfg.weights, offline=cfg.offline)
    freeze_units(model, cfg.backbone, cfg.freeze_ratio)
    return model


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Only trainable parameters enter the optimizer (frozen units get no state, no decay)."""
    params = trainable_parameters(model)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.base_lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.CyclicLR:
    """CyclicLR stepped once per batch; half-cycle = ``step_size_epochs`` epochs. Momentum
    (SGD) or Adam's beta1 cycles inversely to the LR, as in Smith (2017)."""
    step_size = max(1, round(cfg.step_size_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.CyclicLR(
        optimizer, base_lr=cfg.base_lr, max_lr=cfg.max_lr, step_size_up=step_size, mode=cfg.clr_mode,
        gamma=cfg.clr_gamma, cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)


def class_counts(train: SplitArrays | MemoryFeed | StreamFeed) -> np.ndarray:
    """(benign, malignant) counts of the whole training split, whatever feeds it."""
    if isinstance(train, SplitArrays):
        return np.bincount(train.labels[train.labels >= 0], minlength=2)
    return np.asarray(train.class_counts, dtype=np.int64)


def make_loss(cfg: TrainConfig, train: SplitArrays | MemoryFeed | StreamFeed, device: torch.device) -> torch.nn.Module:
    """BCE with logits; ``weighted_loss`` weighs positives by benign/malignant of the whole split
    (the same weight on every rank)."""
    counts = class_counts(train)
    pos_weight = None
    if cfg.imbalance == "weighted_loss":
        pos_weight = torch.tensor([counts[0] / max(counts[1], 1)], dtype=torch.float32, device=device)
    return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)


def batch_input(pixels: np.ndarray, norm: Normalization, device: torch.device, *, channels_last: bool,
                augment: np.ndarray | None = None) -> torch.Tensor:
    """A training batch: stored pixels -> [0, 1] -> (seeded augmentation) -> normalized."""
    x = to_unit(pixels, device)
    if augment is not None:
        x = augment_batch(x, augment)
    return normalize(x, norm, channels_last=channels_last)


def as_feed(data: SplitArrays | MemoryFeed | StreamFeed) -> MemoryFeed | StreamFeed:
    return MemoryFeed(data) if isinstance(data, SplitArrays) else data


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (what is frozen, saved and scored)."""
    return model.module if isinstance(model, DDP) else model


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
                for b, s in zip(model.buffers(), saved):
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
    while True:
        batch, more = next(batches, (None, False))
        n_all, active, more_all = ranks.sum([len(batch) if batch is not None else 0, batch is not None, more], device)
        if active == 0:
            break
        weight = 1.0 if batch is not None else 0.0
        batch = batch if batch is not None else (last or _dummy_batch(spec))
        last, micro, step_images = batch, micro + 1, step_images + n_all
        sync = micro == cfg.accumulate or more_all == 0
        aug = augment_params(batch.image_ids, seed=cfg.seed, epoch=epoch, hflip=cfg.hflip) if cfg.augment else None
        x = batch_input(batch.pixels, norm, device, channels_last=cfg.channels_last, augment=aug)
        y = torch.from_numpy(batch.labels.astype(np.float32)).to(device, non_blocking=True)
        quiet = model.no_sync() if ranks.distributed and not sync else contextlib.nullcontext()
        # gradients accumulate locally (no_sync); DDP all-reduces on the step's last micro-batch
        with quiet, _kept_buffers(core, keep=weight == 0.0):
            with autocast(device, cfg.amp):
                logits = model(x).squeeze(1).float()
            loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="sum") * weight
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if weight:
            total, seen = total + float(loss.detach()), seen + len(batch)
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
    total, seen = ranks.sum([total, seen], device)
    seconds = time.perf_counter() - t0
    return {"train_loss": total / max(seen, 1), "images": int(seen), "steps": steps, "seconds": seconds,
            "train_images_per_s": seen / seconds if seconds > 0 else 0.0}


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """Loss-free validation metrics, by the same definitions evaluation uses (``mammo_ray.metrics``):
    an undefined value (AUC with one class, precision with no positive prediction) is None,
    not 0. ``val_auc_low``/``val_auc_high``: DeLong's 95% interval (images as independent)."""
    m = set_metrics(labels, probs, threshold=0.5)
    ci = delong_auc_ci(labels, probs) or {}
    # the Youden threshold on val travels in the checkpoint: explain's predicted labels use it
    return {"val_auc": m["roc_auc"], "val_auc_low": ci.get("low"), "val_auc_high": ci.get("high"),
            "val_threshold": float(choose_threshold(labels, probs)["threshold"]),
            "val_accuracy": m["accuracy"], "val_precision": m["precision"], "val_recall": m["recall"],
            "val_f1": m["f1"]}


def val_scores(model: torch.nn.Module, val: SplitArrays | MemoryFeed | StreamFeed, *, norm: Normalization,
               device: torch.device, cfg: TrainConfig, ranks: Ranks = SINGLE) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, labels, probabilities) of the whole validation split, on every rank.

    Each rank scores its shard; the shards are gathered and ordered by image id, so the metrics
    are computed once over every score: AUC is a ranking over all images and does not average
    across shards.
    """
    core = unwrap(model)
    ids: list[str] = []
    labels, probs = [], []
    for batch in as_feed(val).val_batches(batch_size=cfg.eval_batch_size, ranks=ranks):
        ids += batch.image_ids
        labels.append(batch.labels)
        probs.append(predict(core, batch.as_arrays("val"), norm=norm, device=device, batch_size=cfg.eval_batch_size,
                             channels_last=cfg.channels_last, amp=cfg.amp))
    parts = ranks.gather((ids, np.concatenate(labels) if labels else np.zeros(0, np.int64),
                          np.concatenate(probs) if probs else np.zeros(0, np.float32)))
    all_ids = [i for part in parts for i in part[0]]
    order = np.argsort(np.asarray(all_ids, dtype=object), kind="stable")
    all_labels = np.concatenate([p[1] for p in parts])[order]
    all_probs = np.concatenate([p[2] for p in parts])[order]
    return [all_ids[i] for i in order], all_labels, all_probs


def evaluate(model: torch.nn.Module, val: SplitArrays | MemoryFeed | StreamFeed, *, norm: Normalization,
             device: torch.device, loss_fn: torch.nn.Module, cfg: TrainConfig,
             ranks: Ranks = SINGLE) -> tuple[dict[str, float | None], np.ndarray]:
    """Validation metrics over the whole split (:func:`val_scores`) and its probabilities by image id."""
    _, labels, probs = val_scores(model, val, norm=norm, device=device, cfg=cfg, ranks=ranks)
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    logits = torch.from_numpy(np.log(p / (1 - p))).float().to(device)
    loss = float(loss_fn(logits, torch.from_numpy(labels.astype(np.float32)).to(device)))
    return {"val_loss": loss, **binary_metrics(labels, probs)}, probs


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    out: str | None = None


def _score(metrics: dict[str, Any]) -> float:
    # val AUC decides; when it is undefined (one class in val) the lower val loss does
    return metrics["val_auc"] if metrics.get("val_auc") is not None else -metrics["val_loss"]


def check_ranks(train: MemoryFeed | StreamFeed, val: MemoryFeed | StreamFeed, ranks: Ranks) -> None:
    """Refuse a worker count the split cannot feed: every rank trains on at least 2 images (one
    BatchNorm batch) and scores at least one validation image.

    Raises:
        ValueError: one line naming the rows, the workers, and the most workers that fit.
    """
    if train.rows < MIN_BATCH * ranks.world:
        raise ValueError(f"workers={ranks.world}: the train split has {train.rows} images, fewer than "
                         f"{MIN_BATCH} per worker; use --workers {max(1, train.rows // MIN_BATCH)} or fewer")
    if val.rows < ranks.world:
        raise ValueError(f"workers={ranks.world}: the val split has {val.rows} images, which leaves a worker with no "
                         f"validation rows; use --workers {max(1, val.rows)} or fewer")


def parallel_model(cfg: TrainConfig, device: torch.device, ranks: Ranks,
                   initial_state: dict[str, torch.Tensor] | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model the loop steps, the model inside it): frozen by ratio *before* the DDP wrap, so
    frozen parameters never enter DDP's reducer (it registers ``requires_grad`` ones only).

    Wrapped by hand rather than with ``ray.train.torch.prepare_model``: the same loop runs in
    one process and under ``torch.multiprocessing`` (the equivalence tests), where no Ray Train
    context exists; ``prepare_model`` does this same wrap.
    """
    core = build_training_model(cfg, initial_state).to(device)
    if cfg.activation_checkpointing:
        checkpoint_units(core, cfg.backbone)
    if cfg.channels_last:
        core = core.to(memory_format=torch.channels_last)
    if not ranks.distributed:
        return core, core
    return DDP(core, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True), core


def fit(cfg: TrainConfig, spec: PreprocessSpec, train: SplitArrays | MemoryFeed | StreamFeed,
        val: SplitArrays | MemoryFeed | StreamFeed, *, out: str | None = None, resume: str | None = None,
        on_epoch: Callable[[dict[str, Any], str | None], None] | None = None, progress: bool = False,
        initial_state: dict[str, torch.Tensor] | None = None, progress_every_s: float = 0.0,
        ranks: Ranks | None = None, device: torch.device | None = None,
        trace: Callable[[int, list[str]], None] | None = None) -> FitResult:
    """Train with early stopping on val AUC; write ``best.pt``, ``last.pt``, ``history.csv``,
    ``metrics.json`` and ``config.yaml`` to ``out`` (when given).

    The one training loop: ``train``, every trial of ``tune`` and every worker of a
    data-parallel trial run this function. Under a process group (Ray Train's workers) each
    rank trains on its share of every step (``train/feed.py``) with gradients all-reduced by DDP,
    scores its share of val, and every rank computes the same metrics from the gathered scores,
    so early stopping agrees; rank 0 alone writes files.

    Args:
        train, val: splits in memory (:class:`SplitArrays` or :class:`MemoryFeed`) or this rank's
            Ray Data shards (:class:`StreamFeed`).
        resume: a ``last.pt`` to continue from (same backbone and freezing ratio).
        on_epoch: called on every rank after each epoch with the epoch's metrics and ``out``
            (Ray Train and Tune report and checkpoint from there).
        initial_state: starting weights resolved by the caller (see :func:`build_training_model`).
        progress, progress_every_s: tqdm's bar, or a logged line at most every that many seconds
            (see :func:`train_one_epoch`).
        ranks: this process's rank (default: the process group joined, or one process).
        device: where to train (default: ``cfg.device`` resolved; Ray Train passes the worker's GPU).
        trace: called with (epoch, image ids) for every micro-batch this rank trains on.

    Raises:
        ValueError: a resume checkpoint of another backbone, freezing ratio or normalisation; a
            worker count the split cannot feed (:func:`check_ranks`).
    """
    ranks = ranks or current_ranks()
    device = device or resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    norm = resolve_normalization(cfg, spec)
    state = _resume_state(resume, cfg, norm) if resume else None
    train, val = as_feed(train), as_feed(val)
    check_ranks(train, val, ranks)
    model, core = parallel_model(cfg, device, ranks, initial_state)
    optimizer = make_optimizer(core, cfg)
    scheduler = make_scheduler(optimizer, cfg, optimizer_steps(train.rows, cfg.batch_size, ranks.world,
                                                               cfg.accumulate, cfg.max_batches))
    loss_fn = make_loss(cfg, train, device)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported() else None
    start_epoch, history, best_epoch, best_metrics = _restore(state, core, optimizer, scheduler)
    best_score = _score(best_metrics) if best_metrics else -math.inf
    out = out if ranks.main else None  # rank 0 writes; the others train, score and report
    _write_config(out, cfg, spec, norm)
    stale, stopped = 0, False
    for epoch in range(start_epoch, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        tr = train_one_epoch(model, train, cfg=cfg, spec=spec, optimizer=optimizer, scheduler=scheduler,
                             loss_fn=loss_fn, device=device, epoch=epoch, scaler=scaler, progress=progress,
                             progress_every_s=progress_every_s, norm=norm, ranks=ranks, trace=trace)
        vm, _ = evaluate(model, val, norm=norm, device=device, loss_fn=loss_fn, cfg=cfg, ranks=ranks)
        row = {"epoch": epoch, "train_loss": tr["train_loss"], **vm, "lr": lr, "seconds": tr["seconds"],
               "train_images_per_s": tr["train_images_per_s"], "train_images": tr["images"],
               "optimizer_steps": tr["steps"]}
        history.append(row)
        improved = _score(vm) > best_score
        if improved:
            best_score, best_epoch, best_metrics, stale = _score(vm), epoch, dict(row), 0
        else:
            stale += 1
        if ranks.main:
            _log_epoch(row, cfg, improved)
        stopped = cfg.patience > 0 and stale >= cfg.patience and epoch < cfg.epochs
        if out:
            _save_epoch(out, core, cfg, spec, norm, row, optimizer, scheduler, improved=improved,
                        extra={"history": history, "best_epoch": best_epoch, "best_metrics": best_metrics})
        if on_epoch is not None:
            on_epoch({**row, "best_epoch": best_epoch, "best_val_auc": best_metrics.get("val_auc")}, out)
        if stopped:
            if ranks.main:
                logger.info("early stop: val AUC did not improve for %d epochs (best %s at epoch %d)",
                            cfg.patience, best_metrics.get("val_auc"), best_epoch)
            break
    _write_metrics(out, best_epoch, best_metrics, stopped, len(history))
    return FitResult(best_epoch=best_epoch, best_metrics=best_metrics, history=history, stopped_early=stopped, out=out)


def _resume_state(resume: str, cfg: TrainConfig, norm: Normalization) -> dict[str, Any]:
    state = load_checkpoint(resume)
    old = checkpoint_config(state)
    if old.backbone != cfg.backbone or abs(old.freeze_ratio - cfg.freeze_ratio) > 1e-9:
        raise ValueError(f"checkpoint {resume} is {old.backbone} at freeze_ratio={old.freeze_ratio}, "
                         f"not {cfg.backbone} at freeze_ratio={cfg.freeze_ratio}")
    before = checkpoint_normalization(state)
    if (before.mean, before.std) != (norm.mean, norm.std):
        # the weights so far were fitted to the other scaling: continuing with this one cannot be right
        raise ValueError(f"checkpoint {resume} was trained with normalisation {before.describe()}, this run would "
                         f"apply {norm.describe()}: resume with the data and flags it was trained with")
    return state


def _restore(state: dict[str, Any] | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any) -> tuple[int, list[dict[str, Any]], int, dict[str, Any]]:
    """A resumed run's weights, optimizer and scheduler states; (start epoch, history, best
    epoch, best metrics), or a fresh start's."""
    if state is None:
        return 1, [], 0, {}
    model.load_state_dict(state["model"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    logger.info("resuming at epoch %d", int(state["epoch"]) + 1)
    return (int(state["epoch"]) + 1, list(state.get("history", [])), int(state.get("best_epoch", 0)),
            dict(state.get("best_metrics", {})))


def _write_metrics(out: str | None, best_epoch: int, best: dict[str, Any], stopped: bool, epochs_run: int) -> None:
    if not out:  # fit without an output folder (a probe, a test): nothing written
        return
    mio.write_bytes(mio.join(out, "metrics.json"), json.dumps(
        {"best_epoch": best_epoch, "best": best, "stopped_early": stopped, "epochs_run": epochs_run}, indent=2).encode())


def _write_config(out: str | None, cfg: TrainConfig, spec: PreprocessSpec, norm: Normalization) -> None:
    """config.yaml: what the run was asked for, and the normalisation it resolved."""
    if not out:
        return
    mio.write_bytes(mio.join(out, "config.yaml"),
                    yaml.safe_dump({"train": to_dict(cfg), "spec": to_dict(spec), "normalization": norm.to_dict()},
                                   sort_keys=False).encode())


def _log_epoch(row: dict[str, Any], cfg: TrainConfig, improved: bool) -> None:
    auc = "n/a" if row["val_auc"] is None else f"{row['val_auc']:.4f}"
    logger.info("epoch %d/%d train_loss %.4f val_loss %.4f val_auc %s val_acc %.3f lr %.2e %.1f img/s%s",
                row["epoch"], cfg.epochs, row["train_loss"], row["val_loss"], auc, row["val_accuracy"], row["lr"],
                row["train_images_per_s"], " *" if improved else "")


def _save_epoch(out: str, model: torch.nn.Module, cfg: TrainConfig, spec: PreprocessSpec, norm: Normalization,
                row: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, *, improved: bool,
                extra: dict[str, Any]) -> None:
    """best.pt (when the epoch improved), last.pt (with optimizer/scheduler for --resume), history.csv."""
    metrics = {k: v for k, v in row.items() if k != "epoch"}
    if improved:
        save_checkpoint(mio.join(out, "best.pt"), model=model, cfg=cfg, spec=spec, norm=norm, epoch=row["epoch"],
                        metrics=metrics, extra={"best_epoch": row["epoch"]})
    save_checkpoint(mio.join(out, "last.pt"), model=model, cfg=cfg, spec=spec, norm=norm, epoch=row["epoch"],
                    metrics=metrics, optimizer=optimizer, scheduler=scheduler, extra=extra)
    _write_history(out, extra["history"])


def _write_history(out: str, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(HISTORY_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    mio.write_bytes(mio.join(out, "history.csv"), buf.getvalue().encode())
