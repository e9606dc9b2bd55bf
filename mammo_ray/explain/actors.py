"""The archive jobs' model actors: Ray Data callable classes, one per actor process.

:class:`ScoreActor` scores batches (``mammo-ray score`` and explain's scoring pass);
:class:`CamActor` scores and computes each image's CAM (explain). Ray imports an actor's
class by its module, so this one holds the actors and what they run (torch, the model, the CAM
code) and none of the jobs' driver code: the engine (``archive.py``) and the read/write tasks
(``tasks.py``) import no torch.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from mammo_ray.data.arrays import pixels_from_bytes
from mammo_ray.data.decode import describe_exception
from mammo_ray.explain.cam import score_and_cam
from mammo_ray.models.inference import (autocast, check_tta, load_for_inference, to_model_input,
                                        view_probabilities)
from mammo_ray.ray_utils import node_id

logger = logging.getLogger(__name__)


def worker_name(device: torch.device) -> str:
    """Where an actor runs: node, process, the GPUs Ray gave it (CUDA_VISIBLE_DEVICES holds the
    same ids) and the device it chose; summary.json's cam_workers counts images per name."""
    return f"{node_id()[:12]}/{os.getpid()}/gpus={os.environ.get('CUDA_VISIBLE_DEVICES', '')}/{device.type}"


def batch_then_images(batch: pd.DataFrame, run: Callable[[np.ndarray], Any], what: str
                      ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, Any]]]:
    """Run the model on a batch's ok rows at once; if that fails, image by image, so one image
    the model cannot take does not fail its batch-mates. Returns (status, reason, [(rows,
    result)...]) with the failures marked ``error`` and ``<what> failed: <exception>``."""
    status, reason = batch["status"].to_numpy().copy(), batch["reason"].to_numpy().copy()
    ok = np.flatnonzero(status == "ok")
    groups, done = ([ok] if len(ok) else []), []
    for attempt, group in enumerate(groups):
        try:
            done.append((group, run(group)))
        except Exception as exc:
            if attempt == 0 and len(group) > 1:
                logger.warning("%s failed on a batch; retrying its images one by one", what, exc_info=True)
                groups.extend(np.array([i]) for i in group)
            else:
                status[group], reason[group] = "error", f"{what} failed: {describe_exception(exc)}"
    return status, reason, done


class ScoreActor:
    """Ray Data callable class: loads the checkpoint once, then scores batches; ``tta``: each
    probability is the mean over the image and its flipped views (``TTA_VIEWS``)."""

    def __init__(self, checkpoint: str, amp: bool = True, tta: str = "none") -> None:
        self.views = check_tta(tta)
        self.loaded = load_for_inference(checkpoint)
        self.amp = amp
        self.worker = worker_name(self.loaded.device)

    def _run(self, batch: pd.DataFrame, idx: np.ndarray) -> np.ndarray:
        m, rows = self.loaded, batch.iloc[idx]
        px = pixels_from_bytes(list(rows["pixels"]), rows["height"], rows["width"], rows["dtype"])
        x = to_model_input(px, m.norm, m.device)
        with torch.inference_mode(), autocast(m.device, self.amp):
            return view_probabilities(m.model, x, self.views).cpu().numpy()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        status, reason, done = batch_then_images(batch, lambda idx: self._run(batch, idx), "scoring")
        probs = np.full(len(batch), np.nan, np.float32)
        for group, p in done:
            probs[group] = p
        per_image = (time.perf_counter() - t0) / max(int((status == "ok").sum()), 1)
        return batch.drop(columns=["pixels", "preview", "breast_mask"]).assign(
            status=status, reason=reason, probability=probs, seconds_cam=np.where(status == "ok", per_image, 0.0),
            node_id=node_id(), cam_worker=self.worker)


class CamActor:
    """Ray Data callable class: loads the checkpoint once, then scores and CAMs batches. With
    ``tta`` the probability is the mean over the image and its flipped views, as the score job
    computes it; the CAM explains the image as given (a flipped view's map would explain
    another picture)."""

    def __init__(self, checkpoint: str, method: str, target_layer: str | None, amp: bool = True,
                 tta: str = "none") -> None:
        self.flipped = check_tta(tta)[1:]  # the views besides the image itself, whose pass gives the CAM
        self.loaded = load_for_inference(checkpoint)
        self.method, self.target_layer, self.amp = method, target_layer, amp
        self.worker = worker_name(self.loaded.device)

    def _run(self, batch: pd.DataFrame, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, rows = self.loaded, batch.iloc[idx]
        px = pixels_from_bytes(list(rows["pixels"]), rows["height"], rows["width"], rows["dtype"])
        x = to_model_input(px, m.norm, m.device)
        p, maps = score_and_cam(m.model, m.backbone, x, method=self.method, target_layer=self.target_layer,
                                amp=self.amp)
        if self.flipped:
            with torch.inference_mode(), autocast(m.device, self.amp):
                others = view_probabilities(m.model, x, self.flipped).cpu().numpy()
            p = (p + others * len(self.flipped)) / (1 + len(self.flipped))
        return p, maps

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        status, reason, done = batch_then_images(batch, lambda idx: self._run(batch, idx), "scoring/CAM")
        n = len(batch)
        probs, cams = np.full(n, np.nan, np.float32), [b""] * n
        cam_h, cam_w = np.zeros(n, np.int64), np.zeros(n, np.int64)
        for group, (p, maps) in done:
            for j, i in enumerate(group):
                probs[i], cams[i] = p[j], maps[j].astype(np.float32).tobytes()
                cam_h[i], cam_w[i] = maps[j].shape
        per_image = (time.perf_counter() - t0) / max(int((status == "ok").sum()), 1)
        return batch.drop(columns=["pixels"]).assign(
            status=status, reason=reason, probability=probs, cam=cams, cam_height=cam_h, cam_width=cam_w,
            seconds_cam=np.where(status == "ok", per_image, 0.0), node_id=node_id(), cam_worker=self.worker)
