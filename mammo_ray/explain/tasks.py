"""The archive jobs' CPU tasks: read + decode + preprocess (``prepare_batch``) and the write
stages (``write_score_batch`` for score, ``write_batch`` for explain), with the status rows
they return to the driver.

Deliberately free of torch (and of pytorch-grad-cam, scipy, scikit-learn): Ray imports a task's
module in every worker process that runs it. Defined beside the actors, these tasks made each
CPU worker import torch and torchvision, about 4-6 CPU-s at its start and some 600 MB of
resident memory more per process (750 vs 130 MB measured), times the cores of every node.
``tests/test_layers.py`` keeps it so.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import pandas as pd

from mammo_ray.config import PreprocessConfig
from mammo_ray.data.decode import describe_exception
from mammo_ray.data.pipeline import process_record
from mammo_ray.data.transforms import GEOMETRY_FIELDS
from mammo_ray.explain.maps import explain_record
from mammo_ray.explain.render import make_preview
from mammo_ray.explain.results import ERROR_PARTS, SCORES, write_parts
from mammo_ray.ray_utils import node_id

logger = logging.getLogger(__name__)

#: what every input's status row says (plus the header fields the exam tables need: raw here,
#: pseudonymised by the driver, which alone holds the patient key)
STATUS_COLUMNS = ["image_id", "path", "status", "reason", "node_id", "prep_node_id", "cam_worker"]
META_COLUMNS = ["patient_id", "exam_id", "laterality", "view"]
# typed placeholders for failed rows, so every batch column converts to one Arrow type
_EMPTY_GEOMETRY = {k: (False if k in ("inverted", "flipped") else 0.0 if k.startswith("scale") else 0)
                   for k in GEOMETRY_FIELDS}


def prepare_batch(batch: pd.DataFrame, *, cfg: PreprocessConfig, preview_size: int) -> pd.DataFrame:
    """CPU task: decode and preprocess each input with the checkpoint's spec, plus (when
    ``preview_size`` > 0) a display preview of the source for the overlays. Failed inputs stay
    in the batch as errors."""
    import cv2  # deferred: configured per worker process below

    cv2.setNumThreads(1)  # a task per core already; OpenCV's pool would oversubscribe
    rows = []
    for rec in batch.to_dict("records"):
        rec = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
        rec.setdefault("split", "external")
        t0 = time.perf_counter()
        # a preview means the CAM stage, which judges maps against the breast mask: its edge
        # is drawn at full resolution there (the score stage uses no mask)
        row, status = process_record(rec, cfg, keep_source=preview_size > 0, refine_mask=preview_size > 0)
        out = {"image_id": rec["image_id"], "source_path": rec["path"], "label": int(rec["label"]),
               "status": status["status"], "reason": status["reason"], "warning": status["warning"] or "",
               "pixels": b"", "height": 0, "width": 0, "dtype": "", "preview": b"", "preview_height": 0,
               "preview_width": 0, "breast_mask": b"", **_EMPTY_GEOMETRY,
               # a manifest's columns first, then the DICOM header's
               **{k: str(rec.get(k) or status.get(k) or "") for k in META_COLUMNS}}
        if row is not None:
            out.update({k: row[k] for k in ("pixels", "height", "width", "dtype", *GEOMETRY_FIELDS)})
            out["breast_mask"] = np.packbits(row["breast_mask"]).tobytes()  # model space, 1 bit per pixel
            if preview_size > 0:
                prev = make_preview(row.pop("source_pixels"), bool(row["inverted"]), preview_size)
                out.update(preview=prev.tobytes(), preview_height=prev.shape[0], preview_width=prev.shape[1])
        out["seconds_preprocess"] = time.perf_counter() - t0
        out["prep_node_id"] = node_id()
        rows.append(out)
    return pd.DataFrame(rows)


def score_row(rec: dict, threshold: float) -> dict[str, Any]:
    """A scored record's row of ``scores.parquet`` (the CAM columns stay null)."""
    prob = float(rec["probability"])
    return {"image_id": rec["image_id"], "source_path": rec["source_path"], "label": int(rec["label"]),
            "probability": prob, "predicted_label": int(prob >= threshold), "threshold": float(threshold),
            "orig_height": int(rec["orig_height"]), "orig_width": int(rec["orig_width"]), "warning": rec["warning"],
            "node_id": rec["node_id"], "seconds_preprocess": float(rec["seconds_preprocess"]),
            "seconds_cam": float(rec["seconds_cam"]), "seconds_write": 0.0}


def status_row(rec: dict) -> dict[str, Any]:
    return {"image_id": rec["image_id"], "path": rec["source_path"], "status": rec["status"], "reason": rec["reason"],
            "node_id": rec.get("node_id", ""), "prep_node_id": rec.get("prep_node_id", ""),
            "cam_worker": rec.get("cam_worker", ""), **{k: rec.get(k) or "" for k in META_COLUMNS}}


def write_score_batch(batch: pd.DataFrame, *, out: str, threshold: float) -> pd.DataFrame:
    """CPU task: the batch's rows and errors as Parquet parts; one status row per input."""
    rows, errors, statuses = [], [], []
    for rec in batch.to_dict("records"):
        status = status_row(rec)
        if rec["status"] == "ok":
            rows.append(score_row(rec, threshold))
        else:
            errors.append({"image_id": rec["image_id"], "path": rec["source_path"], "reason": rec["reason"]})
        statuses.append(status)
    write_parts(out, list(batch["image_id"]), rows, errors)
    return pd.DataFrame(statuses, columns=STATUS_COLUMNS + META_COLUMNS)


def write_batch(batch: pd.DataFrame, *, out: str, threshold: float, preview_size: int, heatmap_max_side: int,
                annotations: dict[str, list[dict]], within_breast: bool = True, scores: str = SCORES,
                errors_folder: str = ERROR_PARTS) -> pd.DataFrame:
    """CPU task: each scored record's heatmap, overlay and scores row (``maps.explain_record``),
    then the batch's Parquet parts; one status row per input."""
    import cv2  # deferred: configured per worker process below

    cv2.setNumThreads(1)
    rows, errors, statuses = [], [], []
    for rec in batch.to_dict("records"):
        status = status_row(rec)
        if rec["status"] == "ok":
            try:
                rows.append(explain_record(rec, out=out, threshold=threshold, heatmap_max_side=heatmap_max_side,
                                           lesions=annotations.get(rec["image_id"]), within_breast=within_breast))
            except Exception as exc:  # one bad image (e.g. an unreadable mask) must not stop the archive
                logger.warning("writing outputs failed for %s", rec["source_path"], exc_info=True)
                status.update(status="error", reason=f"writing outputs failed: {describe_exception(exc)}")
        if status["status"] != "ok":
            errors.append({"image_id": rec["image_id"], "path": rec["source_path"], "reason": status["reason"]})
        statuses.append(status)
    write_parts(out, list(batch["image_id"]), rows, errors, scores=scores, errors_folder=errors_folder)
    return pd.DataFrame(statuses, columns=STATUS_COLUMNS + META_COLUMNS)
