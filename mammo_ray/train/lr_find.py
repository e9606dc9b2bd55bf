"""LR range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", sec. 3.3):
train for a few hundred batches while the LR grows exponentially and watch the loss."""
from __future__ import annotations

import io
import json
import logging
import math
from typing import Any

import numpy as np
import torch

from mammo_ray import io as mio
from mammo_ray.config import PreprocessSpec, TrainConfig
from mammo_ray.models.normalization import resolve_normalization
from mammo_ray.train.data import SplitArrays, augment_params, epoch_order
from mammo_ray.train.loop import (
    batch_input,
    build_training_model,
    make_loss,
    make_optimizer,
    resolve_device,
)

logger = logging.getLogger(__name__)


def suggest_bounds(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float, float]:
    """(base_lr, max_lr) from a range test.

    max_lr: where the smoothed loss stops falling (its minimum), backed off 2x because the
    minimum sits at the edge of divergence; base_lr = max_lr / 4 (Smith suggests a 3-4x
    ratio between the bounds).
    """
    i = int(np.argmin(smoothed))
    max_lr = float(lrs[max(i, 1)]) / 2
    return max_lr / 4, max_lr


def lr_range_test(cfg: TrainConfig, spec: PreprocessSpec, train: SplitArrays, *, start_lr: float = 1e-6,
                  end_lr: float = 1.0, num_steps: int = 100, beta: float = 0.9, diverge: float = 4.0) -> dict[str, Any]:
    """Run the range test on a fresh model (freezing applied) and return lrs, losses and bounds."""
    if not 0 < start_lr < end_lr:
        raise ValueError(f"start_lr={start_lr}, end_lr={end_lr}: need 0 < start_lr < end_lr")
    if num_steps < 10:
        raise ValueError(f"num_steps={num_steps}: use at least 10")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_training_model(cfg).to(device)
    norm = resolve_normalization(cfg, spec)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    loss_fn = make_loss(cfg, train, device)
    labels = torch.from_numpy(train.labels.astype(np.float32))
    factor = (end_lr / start_lr) ** (1 / (num_steps - 1))
    lrs, raw, smooth = [], [], []
    avg, best, step, epoch = 0.0, math.inf, 0, 0
    model.train()
    while step < num_steps:
        order = epoch_order(train.labels, seed=cfg.seed, epoch=epoch, balanced=cfg.imbalance == "balanced_sampler")
        for i in range(0, len(order) - 1, cfg.batch_size):
            if step >= num_steps:
                break
            idx = order[i:i + cfg.batch_size]
            if len(idx) < 2:
                continue
            lr = start_lr * factor ** step
            for g in optimizer.param_groups:
                g["lr"] = lr
            aug = augment_params([train.image_ids[j] for j in idx], seed=cfg.seed, epoch=epoch) if cfg.augment else None
            x = batch_input(train.pixels[idx], norm, device, channels_last=cfg.channels_last, augment=aug)
            loss = loss_fn(model(x).squeeze(1).float(), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            avg = beta * avg + (1 - beta) * value
            s = avg / (1 - beta ** (step + 1))  # bias-corrected moving average
            lrs.append(lr), raw.append(value), smooth.append(s)
            best = min(best, s)
            step += 1
            if not math.isfinite(s) or (step > 10 and s > diverge * best):
                step = num_steps  # diverged: the rest of the range says nothing
                break
        epoch += 1
    lrs_a, smooth_a = np.asarray(lrs), np.asarray(smooth)
    base_lr, max_lr = suggest_bounds(lrs_a, smooth_a)
    return {"lrs": lrs, "losses": raw, "smoothed": smooth, "suggested_base_lr": base_lr, "suggested_max_lr": max_lr,
            "backbone": cfg.backbone, "freeze_ratio": cfg.freeze_ratio}


def write_lr_find(result: dict[str, Any], out: str) -> None:
    """``lr_find.json`` and ``lr_find.png`` (loss against LR, log scale, bounds marked)."""
    import matplotlib  # deferred: only when the plot is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mio.makedirs(out)
    mio.write_bytes(mio.join(out, "lr_find.json"), json.dumps(result, indent=2).encode())
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(result["lrs"], result["losses"], color="0.75", lw=0.8, label="loss")
    ax.plot(result["lrs"], result["smoothed"], color="C0", lw=1.5, label="smoothed")
    for key, colour in (("suggested_base_lr", "C2"), ("suggested_max_lr", "C3")):
        ax.axvline(result[key], color=colour, ls="--", label=f"{key.split('_', 1)[1]} = {result[key]:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {result['backbone']}, freeze {result['freeze_ratio']}")
    lo, hi = np.nanmin(result["smoothed"]), np.nanpercentile(result["smoothed"], 95)
    ax.set_ylim(lo - 0.05 * abs(lo), hi + 0.1 * abs(hi))
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    mio.write_bytes(mio.join(out, "lr_find.png"), buf.getvalue())
