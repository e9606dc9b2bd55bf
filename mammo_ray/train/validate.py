"""Validation during training: every rank scores its shard, the scores are gathered, and
every rank computes the same metrics over the whole split (AUC is a ranking over all images:
it does not average across shards), by the definitions evaluation uses."""
from __future__ import annotations

import numpy as np
import torch

from mammo_ray.config import TrainConfig
from mammo_ray.data.arrays import SplitArrays
from mammo_ray.metrics import binary_metrics as set_metrics
from mammo_ray.metrics import choose_threshold, delong_auc_ci
from mammo_ray.models.inference import predict
from mammo_ray.models.normalization import Normalization
from mammo_ray.train.feed import MemoryFeed, StreamFeed, as_feed
from mammo_ray.train.ranks import SINGLE, Ranks, unwrap


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
