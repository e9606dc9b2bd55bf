"""Scoring a preprocessed split: in-process batches, or a Ray Data actor pool for large sets
(the model is loaded once per actor; GPU actors when the cluster has GPUs)."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mammo_ray import io as mio
from mammo_ray.data.arrays import SplitArrays, pixels_from_bytes
from mammo_ray.data.parquet import split_files
from mammo_ray.models.inference import load_for_inference, predict
from mammo_ray.ray_utils import init_ray

logger = logging.getLogger(__name__)

DISTRIBUTED_MIN_ROWS = 20_000


class ScoreActor:
    """Ray Data callable class: loads a checkpoint once, scores batches of Parquet rows."""

    def __init__(self, checkpoint: str, batch_size: int = 64, tta: str = "none") -> None:
        self.loaded = load_for_inference(checkpoint)
        self.batch_size, self.tta = batch_size, tta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        pixels = pixels_from_bytes(list(batch["pixels"]), batch["height"], batch["width"], batch["dtype"])
        arrays = SplitArrays(pixels=pixels, labels=np.zeros(n, np.int64), image_ids=list(batch["image_id"]),
                             patient_keys=[None] * n, split="")
        m = self.loaded
        scores = predict(m.model, arrays, norm=m.norm, device=m.device, batch_size=self.batch_size, tta=self.tta)
        return {"image_id": np.asarray(batch["image_id"]), "probability": scores.astype(np.float32)}


def score_distributed(checkpoint: str, folder: str, split: str, *, batch_size: int = 64,
                      actors: int | None = None, tta: str = "none") -> dict[str, float]:
    """image_id -> probability for every row of a split, scored by a Ray Data actor pool."""
    import ray  # deferred: in-process scoring (sets under 20,000 images) needs no Ray

    init_ray()
    files = split_files(folder, split)
    fs, _ = mio.resolve(files[0])
    paths = [mio.resolve(f)[1] for f in files]
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    # CPU-only: leave one CPU for the Parquet read tasks, or actors holding every CPU would
    # starve the reads that feed them (a deadlock on small clusters)
    n_actors = actors or (gpus if gpus else max(1, int(resources.get("CPU", 1)) - 1))
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["image_id", "pixels", "height", "width", "dtype"])
    ds = ds.map_batches(ScoreActor, fn_constructor_kwargs={"checkpoint": checkpoint, "batch_size": batch_size, "tta": tta},
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=n_actors), num_gpus=1 if gpus else 0,
                        num_cpus=0 if gpus else 1, batch_format="numpy")
    out: dict[str, float] = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        out.update(zip(batch["image_id"].tolist(), batch["probability"].astype(float).tolist(), strict=True))
    return out


def score_split(model: Any, arrays, *, norm, device, checkpoint: str, folder: str, split: str,
                distributed: str = "auto", batch_size: int = 64, tta: str = "none") -> np.ndarray:
    """Scores in ``arrays`` order; Ray Data when ``distributed`` is ``always`` or the split is
    large (``auto``: at least DISTRIBUTED_MIN_ROWS rows), else batched in this process. ``tta``:
    ``models.inference.TTA_VIEWS``; ``norm``: the checkpoint's normalisation."""

    if distributed not in ("auto", "always", "never"):
        raise ValueError(f"distributed={distributed!r}: use one of auto, always, never")
    use_ray = distributed == "always" or (distributed == "auto" and len(arrays) >= DISTRIBUTED_MIN_ROWS)
    if not use_ray:
        return predict(model, arrays, norm=norm, device=device, batch_size=batch_size, tta=tta)
    logger.info("scoring %d rows of %s/%s with a Ray Data actor pool", len(arrays), folder, split)
    scores = score_distributed(checkpoint, folder, split, batch_size=batch_size, tta=tta)
    missing = [i for i in arrays.image_ids if i not in scores]
    if missing:
        raise RuntimeError(f"{len(missing)} rows of {folder}/{split} came back without a score")
    return np.asarray([scores[i] for i in arrays.image_ids], dtype=np.float32)
