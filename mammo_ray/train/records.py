"""What a training run writes each epoch: ``best.pt``, ``last.pt`` (with the optimizer and
scheduler states for ``--resume``), ``history.csv``, and at the start and end ``config.yaml``
and ``metrics.json``; and the epoch's log line. Rank 0 alone calls these."""
from __future__ import annotations

import csv
import io
import json
import logging
from typing import Any

import torch
import yaml

from mammo_ray import io as mio
from mammo_ray.config import PreprocessSpec, TrainConfig, to_dict
from mammo_ray.models.checkpoint import save_checkpoint
from mammo_ray.models.normalization import Normalization

logger = logging.getLogger("mammo_ray.train.loop")  # the epoch lines keep the logger users filter on

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "val_precision", "val_recall", "val_f1",
                  "lr", "seconds", "train_images_per_s", "train_images", "optimizer_steps")


def write_metrics(out: str | None, best_epoch: int, best: dict[str, Any], stopped: bool, epochs_run: int) -> None:
    if not out:  # fit without an output folder (a probe, a test): nothing written
        return
    mio.write_bytes(mio.join(out, "metrics.json"), json.dumps(
        {"best_epoch": best_epoch, "best": best, "stopped_early": stopped, "epochs_run": epochs_run}, indent=2).encode())


def write_config(out: str | None, cfg: TrainConfig, spec: PreprocessSpec, norm: Normalization) -> None:
    """config.yaml: what the run was asked for, and the normalisation it resolved."""
    if not out:
        return
    mio.write_bytes(mio.join(out, "config.yaml"),
                    yaml.safe_dump({"train": to_dict(cfg), "spec": to_dict(spec), "normalization": norm.to_dict()},
                                   sort_keys=False).encode())


def log_epoch(row: dict[str, Any], cfg: TrainConfig, improved: bool) -> None:
    auc = "n/a" if row["val_auc"] is None else f"{row['val_auc']:.4f}"
    logger.info("epoch %d/%d train_loss %.4f val_loss %.4f val_auc %s val_acc %.3f lr %.2e %.1f img/s%s",
                row["epoch"], cfg.epochs, row["train_loss"], row["val_loss"], auc, row["val_accuracy"], row["lr"],
                row["train_images_per_s"], " *" if improved else "")


def save_epoch(out: str, model: torch.nn.Module, cfg: TrainConfig, spec: PreprocessSpec, norm: Normalization,
                row: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, *, improved: bool,
                extra: dict[str, Any]) -> None:
    """best.pt (when the epoch improved), last.pt (with optimizer/scheduler for --resume), history.csv."""
    metrics = {k: v for k, v in row.items() if k != "epoch"}
    if improved:
        save_checkpoint(mio.join(out, "best.pt"), model=model, cfg=cfg, spec=spec, norm=norm, epoch=row["epoch"],
                        metrics=metrics, extra={"best_epoch": row["epoch"]})
    save_checkpoint(mio.join(out, "last.pt"), model=model, cfg=cfg, spec=spec, norm=norm, epoch=row["epoch"],
                    metrics=metrics, optimizer=optimizer, scheduler=scheduler, extra=extra)
    write_history(out, extra["history"])


def write_history(out: str, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(HISTORY_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    mio.write_bytes(mio.join(out, "history.csv"), buf.getvalue().encode())
