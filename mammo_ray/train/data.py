"""Training data: the train/val splits checked for training, epoch orders and seeded augmentation.

The splits are read by ``mammo_ray.data.arrays`` (decoded once; a training step only slices
arrays). Augmentation is
drawn per image from a generator seeded by (seed, epoch, image_id) and applied to the
whole batch at once (one ``affine_grid``/``grid_sample``), so a rerun is identical and
the cost does not grow with Python per-image loops.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from mammo_ray.config import LABELS, TRAIN, VAL, PreprocessSpec
from mammo_ray.data.arrays import SplitArrays, load_split
from mammo_ray.data.parquet import read_spec, split_files


def load_training_data(data_dir: str) -> tuple[PreprocessSpec, SplitArrays, SplitArrays]:
    """The spec and the train/val splits of a preprocessed folder, checked for training.

    Raises:
        ValueError: no ``train/`` or ``val/`` split, unlabeled rows, or a single class in train.
    """
    for split in (TRAIN, VAL):
        if not split_files(data_dir, split):
            raise ValueError(f"{data_dir}: no {split}/ split with Parquet files (run `mammo-ray preprocess` without --external)")
    spec = read_spec(data_dir)
    train, val = load_split(data_dir, "train"), load_split(data_dir, "val")
    for arr in (train, val):
        if (arr.labels < 0).any():
            raise ValueError(f"{data_dir}/{arr.split}: {int((arr.labels < 0).sum())} unlabeled rows; training needs benign/malignant labels")
    counts = train.class_counts()
    if len(counts) < 2:
        only = LABELS[next(iter(counts))]
        raise ValueError(f"{data_dir}/train: one class only ({counts[next(iter(counts))]} {only}); training needs both benign and malignant")
    return spec, train, val


def _image_seed(seed: int, epoch: int, image_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{image_id}".encode(), digest_size=8).digest(), "little")


def augment_params(image_ids: list[str], *, seed: int, epoch: int, hflip: bool = False) -> np.ndarray:
    """Per-image augmentation draws (N, 8): angle, scale, tx, ty, vflip, hflip, brightness, contrast.

    Mammography-safe ranges: +-10 degrees, 0.9-1.1 zoom, +-5% shift, +-10% brightness and
    contrast; vertical flips only by default, since orientation already put the chest wall
    on the left and a horizontal flip would undo that.
    """
    out = np.empty((len(image_ids), 8), np.float32)
    for i, iid in enumerate(image_ids):
        rng = np.random.default_rng(_image_seed(seed, epoch, iid))
        out[i] = (rng.uniform(-10, 10), rng.uniform(0.9, 1.1), rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05),
                  rng.random() < 0.5, hflip and rng.random() < 0.5, rng.uniform(-0.1, 0.1), rng.uniform(0.9, 1.1))
    return out


def augment_batch(x01: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """Apply per-image affine + flips + brightness/contrast to a (B, 1, H, W) batch in [0, 1]."""
    p = torch.as_tensor(params, dtype=x01.dtype, device=x01.device)
    angle = p[:, 0] * (math.pi / 180)
    scale = 1.0 / p[:, 1]  # affine_grid maps output -> input coordinates
    sy = torch.where(p[:, 4] > 0.5, -1.0, 1.0).to(x01.dtype)
    sx = torch.where(p[:, 5] > 0.5, -1.0, 1.0).to(x01.dtype)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, p[:, 2] * 2], 1),
                         torch.stack([sin * sx, cos * sy, p[:, 3] * 2], 1)], 1)
    grid = F.affine_grid(theta, list(x01.shape), align_corners=False)
    x = F.grid_sample(x01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * p[:, 7].view(-1, 1, 1, 1) + mean + p[:, 6].view(-1, 1, 1, 1)
    return x.clamp_(0.0, 1.0)


def epoch_order(labels: np.ndarray, *, seed: int, epoch: int, balanced: bool) -> np.ndarray:
    """Indices for one epoch: a seeded permutation, or a class-balanced draw with replacement."""
    rng = np.random.default_rng([seed, epoch, 7])
    n = labels.shape[0]
    if not balanced:
        return rng.permutation(n)
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    weights = 1.0 / counts[labels]
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())
