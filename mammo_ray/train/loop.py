"""The training loop: selective freezing, CyclicLR stepped per optimizer step, gradient
accumulation, early stopping on val AUC, best/last checkpoints, on one rank or many (DDP).
``train_one_epoch`` (``step.py``) / ``evaluate`` (``validate.py``) / ``fit`` as in
torchvision's references; what a run writes is ``records.py``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from mammo_ray.config import PreprocessSpec, TrainConfig
from mammo_ray.data.arrays import SplitArrays
from mammo_ray.models.checkpoint import checkpoint_config, load_checkpoint
from mammo_ray.models.freezing import freeze_units, trainable_parameters
from mammo_ray.models.inference import predict, resolve_device
from mammo_ray.models.normalization import Normalization, checkpoint_normalization, resolve_normalization
from mammo_ray.models.recompute import checkpoint_units
from mammo_ray.models.registry import build_model
from mammo_ray.train.feed import MemoryFeed, StreamFeed, as_feed, check_ranks, optimizer_steps
from mammo_ray.train.ranks import Ranks, gradient_group
from mammo_ray.train.ranks import current as current_ranks
from mammo_ray.train.records import HISTORY_FIELDS, log_epoch, save_epoch, write_config, write_metrics
from mammo_ray.train.step import batch_input, train_one_epoch
from mammo_ray.train.validate import binary_metrics, evaluate, val_scores

logger = logging.getLogger(__name__)

# the loop's parts keep answering to their old home (callers and tests import them from here)
__all__ = ["FitResult", "HISTORY_FIELDS", "batch_input", "binary_metrics", "build_training_model", "check_ranks",
           "class_counts", "evaluate", "fit", "make_loss", "make_optimizer", "make_scheduler", "parallel_model",
           "predict", "train_one_epoch", "val_scores"]


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
    return DDP(core, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
               process_group=gradient_group(ranks, device)), core


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
    train, val = as_feed(train), as_feed(val)
    check_ranks(train, val, ranks)
    run = _prepare(cfg, spec, train, ranks, device, initial_state)
    state = _resume_state(resume, cfg, run.norm) if resume else None
    start_epoch, history, best_epoch, best_metrics = _restore(state, run.core, run.optimizer, run.scheduler)
    best = _Best(history, best_epoch, best_metrics, patience=cfg.patience)
    out = out if ranks.main else None  # rank 0 writes; the others train, score and report
    write_config(out, cfg, spec, run.norm)
    for epoch in range(start_epoch, cfg.epochs + 1):
        row = _epoch(run, train, val, epoch, cfg=cfg, spec=spec, device=device, ranks=ranks, trace=trace,
                     progress=progress, progress_every_s=progress_every_s)
        improved = best.record(row)
        if ranks.main:
            log_epoch(row, cfg, improved)
        if out:
            save_epoch(out, run.core, cfg, spec, run.norm, row, run.optimizer, run.scheduler, improved=improved,
                       extra={"history": best.history, "best_epoch": best.epoch, "best_metrics": best.metrics})
        if on_epoch is not None:
            on_epoch({**row, "best_epoch": best.epoch, "best_val_auc": best.metrics.get("val_auc")}, out)
        if best.stops(epoch, cfg.epochs, log=ranks.main):
            break
    write_metrics(out, best.epoch, best.metrics, best.stopped, len(best.history))
    return FitResult(best_epoch=best.epoch, best_metrics=best.metrics, history=best.history,
                     stopped_early=best.stopped, out=out)


def _epoch(run: _Run, train: MemoryFeed | StreamFeed, val: MemoryFeed | StreamFeed, epoch: int, *,
           cfg: TrainConfig, spec: PreprocessSpec, device: torch.device, ranks: Ranks,
           trace: Callable[[int, list[str]], None] | None, progress: bool, progress_every_s: float) -> dict[str, Any]:
    """One epoch's training pass and validation: its history row."""
    lr = run.optimizer.param_groups[0]["lr"]
    tr = train_one_epoch(run.model, train, cfg=cfg, spec=spec, optimizer=run.optimizer, scheduler=run.scheduler,
                         loss_fn=run.loss_fn, device=device, epoch=epoch, scaler=run.scaler, progress=progress,
                         progress_every_s=progress_every_s, norm=run.norm, ranks=ranks, trace=trace)
    vm, _ = evaluate(run.model, val, norm=run.norm, device=device, loss_fn=run.loss_fn, cfg=cfg, ranks=ranks)
    return {"epoch": epoch, "train_loss": tr["train_loss"], **vm, "lr": lr, "seconds": tr["seconds"],
            "train_images_per_s": tr["train_images_per_s"], "train_images": tr["images"], "optimizer_steps": tr["steps"]}


@dataclass
class _Run:
    """What a rank trains with: the (DDP-wrapped) model, the model inside, and its optimizer,
    cyclic LR, loss, AMP scaler and input normalisation."""

    model: torch.nn.Module
    core: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: torch.nn.Module
    scaler: torch.amp.GradScaler | None
    norm: Normalization


def _prepare(cfg: TrainConfig, spec: PreprocessSpec, train: MemoryFeed | StreamFeed, ranks: Ranks,
             device: torch.device, initial_state: dict[str, torch.Tensor] | None) -> _Run:
    model, core = parallel_model(cfg, device, ranks, initial_state)
    optimizer = make_optimizer(core, cfg)
    steps = optimizer_steps(train.rows, cfg.batch_size, ranks.world, cfg.accumulate, cfg.max_batches)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported() else None
    return _Run(model=model, core=core, optimizer=optimizer, scheduler=make_scheduler(optimizer, cfg, steps),
                loss_fn=make_loss(cfg, train, device), scaler=scaler, norm=resolve_normalization(cfg, spec))


@dataclass
class _Best:
    """The run's history, its best epoch so far (by :func:`_score`) and early stopping's count
    of epochs without a better one (``patience`` 0: never stop)."""

    history: list[dict[str, Any]]
    epoch: int
    metrics: dict[str, Any]
    patience: int
    stale: int = 0
    stopped: bool = False

    def record(self, row: dict[str, Any]) -> bool:
        """Add an epoch's row; True when it is the best so far."""
        self.history.append(row)
        if _score(row) > (_score(self.metrics) if self.metrics else -math.inf):
            self.epoch, self.metrics, self.stale = int(row["epoch"]), dict(row), 0
            return True
        self.stale += 1
        return False

    def stops(self, epoch: int, epochs: int, *, log: bool = True) -> bool:
        """Whether to stop after ``epoch`` (logged once, by the rank that ``log``s)."""
        self.stopped = self.patience > 0 and self.stale >= self.patience and epoch < epochs
        if self.stopped and log:
            logger.info("early stop: val AUC did not improve for %d epochs (best %s at epoch %d)",
                        self.patience, self.metrics.get("val_auc"), self.epoch)
        return self.stopped


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


