"""The training loop: selective freezing, CyclicLR stepped per batch, early stopping on val AUC,
best/last checkpoints. ``train_one_epoch`` / ``evaluate`` / ``fit`` as in torchvision's references.
"""
from __future__ import annotations

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
import yaml
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
from mammo_ray.models.registry import build_model
from mammo_ray.train.data import augment_batch, augment_params, epoch_order

logger = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "val_precision", "val_recall", "val_f1",
                  "lr", "seconds", "train_images_per_s")


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


def make_loss(cfg: TrainConfig, train: SplitArrays, device: torch.device) -> torch.nn.Module:
    counts = np.bincount(train.labels, minlength=2)
    pos_weight = None
    if cfg.imbalance == "weighted_loss":
        pos_weight = torch.tensor([counts[0] / max(counts[1], 1)], dtype=torch.float32, device=device)
    return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)


def _batch_input(arrays: SplitArrays, idx: np.ndarray, norm: Normalization, device: torch.device, *,
                 channels_last: bool, augment: np.ndarray | None = None) -> torch.Tensor:
    """A training batch: stored pixels -> [0, 1] -> (seeded augmentation) -> normalized."""
    x = to_unit(arrays.pixels[idx], device)
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


def train_one_epoch(model: torch.nn.Module, train: SplitArrays, *, cfg: TrainConfig, spec: PreprocessSpec,
                    optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: torch.nn.Module,
                    device: torch.device, epoch: int, scaler: torch.amp.GradScaler | None = None,
                    progress: bool = False, progress_every_s: float = 0.0,
                    norm: Normalization | None = None) -> dict[str, float]:
    """One pass over the training split. Returns mean loss, images, seconds.

    ``progress``: tqdm's bar (a terminal); ``progress_every_s`` > 0: a logged progress line at
    most that often (a log file or CI, where tqdm draws nothing for a whole epoch). ``norm``:
    the input normalisation (default: resolved from the starting weights and ``spec``)."""
    norm = norm or resolve_normalization(cfg, spec)
    train_mode(model, cfg.backbone, cfg.freeze_ratio)
    order = epoch_order(train.labels, seed=cfg.seed, epoch=epoch, balanced=cfg.imbalance == "balanced_sampler")
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm cannot train on one image
        batches = batches[:-1]
    if cfg.max_batches:
        batches = batches[:cfg.max_batches]
    labels = torch.from_numpy(train.labels.astype(np.float32))
    total, seen, t0 = 0.0, 0, time.perf_counter()
    lines = Progress(f"epoch {epoch}/{cfg.epochs}", sum(len(b) for b in batches), interval=progress_every_s,
                     stream=_NO_TTY) if progress_every_s > 0 else None
    for idx in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress):
        aug = augment_params([train.image_ids[i] for i in idx], seed=cfg.seed, epoch=epoch, hflip=cfg.hflip) if cfg.augment else None
        x = _batch_input(train, idx, norm, device, channels_last=cfg.channels_last, augment=aug)
        y = labels[idx].to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            loss = loss_fn(model(x).squeeze(1).float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
        if lines is not None:
            lines.note = f"train_loss {total / seen:.4f}"
            lines.update(len(idx))
    seconds = time.perf_counter() - t0
    return {"train_loss": total / max(seen, 1), "images": seen, "seconds": seconds,
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


def evaluate(model: torch.nn.Module, arrays: SplitArrays, *, norm: Normalization, device: torch.device,
             loss_fn: torch.nn.Module, cfg: TrainConfig) -> tuple[dict[str, float | None], np.ndarray]:
    probs = predict(model, arrays, norm=norm, device=device, batch_size=cfg.eval_batch_size,
                    channels_last=cfg.channels_last, amp=cfg.amp)
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    logits = torch.from_numpy(np.log(p / (1 - p))).float().to(device)
    loss = float(loss_fn(logits, torch.from_numpy(arrays.labels.astype(np.float32)).to(device)))
    return {"val_loss": loss, **binary_metrics(arrays.labels, probs)}, probs


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


def fit(cfg: TrainConfig, spec: PreprocessSpec, train: SplitArrays, val: SplitArrays, *, out: str | None = None,
        resume: str | None = None, on_epoch: Callable[[dict[str, Any], str | None], None] | None = None,
        progress: bool = False, initial_state: dict[str, torch.Tensor] | None = None,
        progress_every_s: float = 0.0) -> FitResult:
    """Train with early stopping on val AUC; write ``best.pt``, ``last.pt``, ``history.csv``,
    ``metrics.json`` and ``config.yaml`` to ``out`` (when given).

    Args:
        resume: a ``last.pt`` to continue from (same backbone and freezing ratio).
        on_epoch: called after each epoch with the epoch's metrics and ``out`` (Ray Tune
            reports and checkpoints from there).
        initial_state: starting weights resolved by the caller (see :func:`build_training_model`).
        progress, progress_every_s: tqdm's bar, or a logged line at most every that many seconds
            (see :func:`train_one_epoch`).

    Raises ValueError for a resume checkpoint of another backbone or freezing ratio.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    norm = resolve_normalization(cfg, spec)
    state = _resume_state(resume, cfg, norm) if resume else None
    model = build_training_model(cfg, initial_state).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps = min(max(1, len(train) // cfg.batch_size), cfg.max_batches or len(train))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    loss_fn = make_loss(cfg, train, device)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported() else None
    start_epoch, history, best_epoch, best_metrics = _restore(state, model, optimizer, scheduler)
    best_score = _score(best_metrics) if best_metrics else -math.inf
    _write_config(out, cfg, spec, norm)
    stale, stopped = 0, False
    for epoch in range(start_epoch, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        tr = train_one_epoch(model, train, cfg=cfg, spec=spec, optimizer=optimizer, scheduler=scheduler,
                             loss_fn=loss_fn, device=device, epoch=epoch, scaler=scaler, progress=progress,
                             progress_every_s=progress_every_s, norm=norm)
        vm, _ = evaluate(model, val, norm=norm, device=device, loss_fn=loss_fn, cfg=cfg)
        row = {"epoch": epoch, "train_loss": tr["train_loss"], **vm, "lr": lr, "seconds": tr["seconds"],
               "train_images_per_s": tr["train_images_per_s"]}
        history.append(row)
        improved = _score(vm) > best_score
        if improved:
            best_score, best_epoch, best_metrics, stale = _score(vm), epoch, dict(row), 0
        else:
            stale += 1
        _log_epoch(row, cfg, improved)
        stopped = cfg.patience > 0 and stale >= cfg.patience and epoch < cfg.epochs
        if out:
            _save_epoch(out, model, cfg, spec, norm, row, optimizer, scheduler, improved=improved,
                        extra={"history": history, "best_epoch": best_epoch, "best_metrics": best_metrics})
        if on_epoch is not None:
            on_epoch({**row, "best_epoch": best_epoch, "best_val_auc": best_metrics.get("val_auc")}, out)
        if stopped:
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
