"""The explain batch job: score and Grad-CAM every image of an archive with Ray Data.

    list -> read + decode + preprocess with the checkpoint's spec (CPU tasks)
         -> score + CAM in an actor pool (the model loaded once per actor; GPU when there is one)
         -> map the CAM back to the source geometry, write heatmap + overlay PNGs and one
            Parquet part per batch (CPU tasks)

Output folder::

    explain.yaml            what produced the results (checkpoint sha256, method, layer, inputs...)
    scores.parquet/         a Parquet dataset, one part per batch (``pd.read_parquet`` reads it)
    heatmaps/ab/<id>.png    16-bit CAM in [0, 1] at the source image's geometry
    overlays/ab/<id>.png    CAM over the source image at the preview size
    overview.png            the highest-scoring overlays on one sheet
    errors.csv, summary.json, localization.json (when annotations are given)

Nothing is lost and nothing is done twice: a batch's Parquet part is written last and is its
commit; ``--resume`` skips every image that already has a row (in ``scores.parquet`` or in
the error parts), a retried task rewrites its own part (named by a hash of its image ids),
and the job ends by checking that every input has exactly one row or one error.
File names are image ids (a hash of the source path), never patient identifiers.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mammo_ray import io as mio
from mammo_ray.config import MAX_BATCH, MAX_SIDE, PreprocessConfig, PreprocessSpec, check_finite
from mammo_ray.data.decode import describe_exception
from mammo_ray.data.parquet import write_table
from mammo_ray.data.transforms import GEOMETRY_FIELDS
from mammo_ray.explain.cam import check_method, localization, resolve_target_layer, top_energy_fraction
from mammo_ray.outputs import check_inputs_vs_out
from mammo_ray.resources import TASK_RETRIES, check_fits, largest_node_memory, preprocess_task_bytes

logger = logging.getLogger(__name__)

SCORES = "scores.parquet"
ERROR_PARTS = "_errors"
IDENTITY_FILE = "explain.yaml"
# explain.yaml keys that must match for --resume to continue a folder
IDENTITY_KEYS = ("checkpoint_sha256", "backbone", "method", "target_layer", "threshold", "preview_size",
                 "heatmap_max_side", "inputs", "annotations_sha256", "amp")
SCORE_COLUMNS = ("image_id", "source_path", "label", "probability", "predicted", "threshold",
                 "cam_peak_x", "cam_peak_y", "cam_peak_value", "cam_top5_energy", "orig_height", "orig_width",
                 "heatmap_path", "overlay_path", "pointing_hit", "energy_inside", "lesion_area_fraction",
                 "cam_peak_in_breast", "pointing_hit_in_breast", "lesion_area_fraction_in_breast",
                 "warning", "node_id", "seconds_preprocess", "seconds_cam", "seconds_write")


class OutputInUseError(ValueError):
    pass


@dataclass(frozen=True)
class ExplainOptions:
    """How to explain. ``workers``: size of the CAM actor pool (default: one per GPU, or the
    CPUs less one on CPU-only clusters, so the read tasks keep a core)."""

    method: str = "gradcam"
    target_layer: str | None = None
    batch_size: int = 32
    gpus_per_worker: float | None = None
    workers: int | None = None
    preview_size: int = 512
    heatmap_max_side: int = 0
    threshold: float | None = None
    annotations: str | None = None
    top_n: int = 16
    prep_batch_size: int = 8
    amp: bool = True

    def __post_init__(self) -> None:
        check_finite(self)
        check_method(self.method)
        for name, top in (("batch_size", MAX_BATCH), ("preview_size", MAX_SIDE), ("top_n", 1024),
                          ("prep_batch_size", MAX_BATCH)):
            if not 1 <= int(getattr(self, name)) <= top:
                raise ValueError(f"{name}={getattr(self, name)!r}: use an int in [1, {top}]")
        if not 0 <= self.heatmap_max_side <= MAX_SIDE:
            raise ValueError(f"heatmap_max_side={self.heatmap_max_side!r}: 0 (the source's size) or a side in "
                             f"[1, {MAX_SIDE}] pixels")
        if self.workers is not None and not 1 <= self.workers <= 100_000:
            raise ValueError(f"workers={self.workers!r}: use an int in [1, 100000]")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker!r}: must be >= 0")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r}: must be in [0, 1]")


# ----------------------------------------------------------------------------- worker side
def _display_uint8(img: np.ndarray) -> np.ndarray:
    """A source image windowed for display (0.5-99.5th percentile to 0-255)."""
    f = img.astype(np.float32)
    lo, hi = np.percentile(f, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((f - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def _scale_for(h: int, w: int, side: int) -> float:
    return 1.0 if side <= 0 else min(1.0, side / max(h, w))


# typed placeholders for failed rows, so every batch column converts to one Arrow type
_EMPTY_GEOMETRY = {k: (False if k in ("inverted", "flipped") else 0.0 if k.startswith("scale") else 0)
                   for k in GEOMETRY_FIELDS}


def prepare_batch(batch: pd.DataFrame, *, cfg: PreprocessConfig, preview_size: int) -> pd.DataFrame:
    """CPU task: decode and preprocess each input with the checkpoint's spec, plus a display
    preview of the source at the preview size. Failed inputs stay in the batch as errors."""
    import cv2

    from mammo_ray.data.pipeline import _node_id, process_record

    cv2.setNumThreads(1)  # a task per core already; OpenCV's pool would oversubscribe
    rows = []
    for rec in batch.to_dict("records"):
        rec = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
        rec.setdefault("split", "external")
        t0 = time.perf_counter()
        row, status = process_record(rec, cfg, keep_source=True)
        out = {"image_id": rec["image_id"], "source_path": rec["path"], "label": int(rec["label"]),
               "status": status["status"], "reason": status["reason"], "warning": status["warning"] or "",
               "pixels": b"", "height": 0, "width": 0, "dtype": "", "preview": b"", "preview_height": 0,
               "preview_width": 0, "breast_mask": b"", **_EMPTY_GEOMETRY}
        if row is not None:
            src = row.pop("source_pixels")
            f = _scale_for(*src.shape, preview_size)
            small = src if f == 1.0 else cv2.resize(src, (max(1, round(src.shape[1] * f)), max(1, round(src.shape[0] * f))),
                                                    interpolation=cv2.INTER_AREA)
            if row["inverted"]:  # show it as the model saw it: dark air, bright tissue
                from mammo_ray.data.transforms import invert

                small = invert(small)
            prev = _display_uint8(small)
            out.update({k: row[k] for k in ("pixels", "height", "width", "dtype", *GEOMETRY_FIELDS)})
            out["breast_mask"] = np.packbits(row["breast_mask"]).tobytes()  # model space, 1 bit per pixel
            out.update(preview=prev.tobytes(), preview_height=prev.shape[0], preview_width=prev.shape[1])
        out["seconds_preprocess"] = time.perf_counter() - t0
        out["prep_node_id"] = _node_id()
        rows.append(out)
    return pd.DataFrame(rows)


class CamActor:
    """Ray Data callable class: loads the checkpoint once, then scores and CAMs batches."""

    def __init__(self, checkpoint: str, method: str, target_layer: str | None, amp: bool = True) -> None:
        import torch

        from mammo_ray.train.checkpoint import checkpoint_spec, load_checkpoint, model_from_checkpoint
        from mammo_ray.train.loop import resolve_device

        state = load_checkpoint(checkpoint)
        self.spec: PreprocessSpec = checkpoint_spec(state)
        self.backbone = state["backbone"]
        self.device = resolve_device("auto")
        # channels_last: faster convolutions on GPU and on CPU (oneDNN), ~1.4x for resnet50 here
        self.model = model_from_checkpoint(state).to(self.device).to(memory_format=torch.channels_last)
        self.method, self.target_layer, self.amp = method, target_layer, amp

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        from mammo_ray.data.pipeline import _node_id
        from mammo_ray.explain.cam import score_and_cam

        t0 = time.perf_counter()
        status = batch["status"].to_numpy().copy()
        reason = batch["reason"].to_numpy().copy()
        ok = np.flatnonzero(status == "ok")
        n = len(batch)
        probs = np.full(n, np.nan, np.float32)
        cams: list[bytes] = [b""] * n
        cam_h = np.zeros(n, np.int64)
        cam_w = np.zeros(n, np.int64)

        def run(idx: np.ndarray) -> None:
            dtype = np.dtype(batch["dtype"].iat[idx[0]])
            px = np.stack([np.frombuffer(batch["pixels"].iat[i], dtype=dtype).reshape(int(batch["height"].iat[i]),
                                                                                      int(batch["width"].iat[i]))
                           for i in idx])
            top = float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0
            x = torch.from_numpy(px).to(self.device).unsqueeze(1).float().div_(top).sub_(self.spec.mean).div_(self.spec.std)
            x = x.contiguous(memory_format=torch.channels_last)
            p, maps = score_and_cam(self.model, self.backbone, x, method=self.method, target_layer=self.target_layer,
                                    amp=self.amp)
            for j, i in enumerate(idx):
                probs[i] = p[j]
                cams[i] = maps[j].astype(np.float32).tobytes()
                cam_h[i], cam_w[i] = maps[j].shape

        if len(ok):
            try:
                run(ok)
            except Exception:  # one image the model cannot take must not fail its batch-mates
                logger.warning("CAM failed on a batch; retrying its images one by one", exc_info=True)
                for i in ok:
                    try:
                        run(np.array([i]))
                    except Exception as exc:
                        status[i] = "error"
                        reason[i] = f"scoring/CAM failed: {describe_exception(exc)}"
        ok = np.flatnonzero(status == "ok")
        per_image = (time.perf_counter() - t0) / max(len(ok), 1)
        out = batch.drop(columns=["pixels"])
        out["status"] = status
        out["reason"] = reason
        out["probability"] = probs
        out["cam"] = cams
        out["cam_height"] = cam_h
        out["cam_width"] = cam_w
        out["seconds_cam"] = np.where(status == "ok", per_image, 0.0)
        out["node_id"] = _node_id()
        return out


def _png(img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def shard_path(kind: str, image_id: str) -> str:
    """Relative path of an image's output file: two-character shards keep folders small."""
    return f"{kind}/{image_id[:2]}/{image_id}.png"


def overlay_image(preview: np.ndarray, heat: np.ndarray, peak: tuple[int, int] | None = None) -> np.ndarray:
    """BGR overlay of a CAM (in [0, 1], the preview's shape) on a uint8 grey preview, with
    pytorch-grad-cam's colouring; the peak marked by a small circle."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat((preview.astype(np.float32) / 255.0)[:, :, None], 3, axis=2)
    vis = show_cam_on_image(rgb, heat.astype(np.float32), use_rgb=False, image_weight=0.6)
    if peak is not None:
        r = max(3, round(0.02 * max(heat.shape)))
        cv2.circle(vis, (int(peak[0]), int(peak[1])), r, (255, 255, 255), max(1, r // 3), cv2.LINE_AA)
    return vis


def lesion_mask(shape: tuple[int, int], f_heat: float, lesions: list[dict]) -> np.ndarray:
    """The union of an image's lesions (circles in source pixels, or mask files of the source's
    size) as a boolean mask of the heatmap's ``shape`` (the source scaled by ``f_heat``)."""
    import cv2

    from mammo_ray.data.decode import decode_bytes

    h, w = shape
    inside = np.zeros(shape, bool)
    yy, xx = np.ogrid[0:h, 0:w]
    for ann in lesions:
        if ann.get("mask_path"):
            mask = decode_bytes(mio.read_bytes(ann["mask_path"]), min_side=1).pixels
            inside |= cv2.resize((mask > 0).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        else:
            x, y, r = ann["x"] * f_heat, ann["y"] * f_heat, max(ann["r"] * f_heat, 0.5)
            inside |= (xx - x) ** 2 + (yy - y) ** 2 <= r ** 2
    return inside


def _lesion_scores(heat: np.ndarray, f_heat: float, lesions: list[dict] | None,
                   breast: np.ndarray | None = None) -> dict[str, Any]:
    # several lesions on one image: one hit when the peak is in any of them, energy and chance
    # over their union. Within the breast: the peak is looked for inside the breast mask only,
    # and chance is the lesion's share of the breast (what a random point in the breast hits).
    empty = {"pointing_hit": None, "energy_inside": None, "lesion_area_fraction": None,
             "pointing_hit_in_breast": None, "lesion_area_fraction_in_breast": None}
    if not lesions:
        return empty
    inside = lesion_mask(heat.shape, f_heat, lesions)
    res = localization(heat, mask=inside)
    out = {**empty, "pointing_hit": res["pointing_hit"], "energy_inside": res["energy_inside"],
           "lesion_area_fraction": res["area_fraction"]}
    if breast is not None and breast.any():
        py, px = np.unravel_index(int(np.argmax(np.where(breast, heat, -1.0))), heat.shape)
        out["pointing_hit_in_breast"] = bool(inside[py, px])
        out["lesion_area_fraction_in_breast"] = float((inside & breast).sum() / breast.sum())
    return out


def _breast_at(rec: dict, geom: dict, f_heat: float, shape: tuple[int, int]) -> np.ndarray | None:
    """The model-space breast mask of a record, mapped onto the heatmap's geometry."""
    from mammo_ray.data.transforms import map_to_original, scale_geometry

    packed = rec.get("breast_mask") or b""
    h, w = int(rec.get("height") or 0), int(rec.get("width") or 0)
    if not packed or not h or not w:
        return None
    model = np.unpackbits(np.frombuffer(packed, np.uint8))[: h * w].reshape(h, w).astype(np.float32)
    mapped = map_to_original(model, scale_geometry(geom, f_heat)) > 0.5
    return mapped if mapped.shape == shape else None


def write_batch(batch: pd.DataFrame, *, out: str, threshold: float, preview_size: int, heatmap_max_side: int,
                annotations: dict[str, dict]) -> pd.DataFrame:
    """CPU task: map each CAM back to the source geometry, write its heatmap and overlay, then
    the batch's Parquet part (scores) and error part; return one status row per input."""
    import cv2

    from mammo_ray.data.transforms import map_to_original, scale_geometry

    cv2.setNumThreads(1)
    rows, errors, statuses = [], [], []
    for rec in batch.to_dict("records"):
        t0 = time.perf_counter()
        status = {"image_id": rec["image_id"], "path": rec["source_path"], "status": rec["status"],
                  "reason": rec["reason"], "node_id": rec.get("node_id", ""), "prep_node_id": rec.get("prep_node_id", "")}
        if rec["status"] == "ok":
            try:
                geom = {k: rec[k] for k in GEOMETRY_FIELDS}
                cam = np.frombuffer(rec["cam"], np.float32).reshape(int(rec["cam_height"]), int(rec["cam_width"]))
                h, w = int(geom["orig_height"]), int(geom["orig_width"])
                f_heat = _scale_for(h, w, heatmap_max_side)
                heat = np.clip(map_to_original(cam, scale_geometry(geom, f_heat)), 0.0, 1.0)
                py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
                preview = np.frombuffer(rec["preview"], np.uint8).reshape(int(rec["preview_height"]), int(rec["preview_width"]))
                f_prev = preview.shape[0] / h
                pheat = np.clip(map_to_original(cam, scale_geometry(geom, f_prev)), 0.0, 1.0)
                if pheat.shape != preview.shape:  # rounding of the preview's size
                    pheat = cv2.resize(pheat, (preview.shape[1], preview.shape[0]), interpolation=cv2.INTER_LINEAR)
                hp, op = shard_path("heatmaps", rec["image_id"]), shard_path("overlays", rec["image_id"])
                mio.write_bytes(mio.join(out, hp), _png(np.round(heat * 65535).astype(np.uint16)))
                vis = overlay_image(preview, pheat, (px * f_prev / f_heat, py * f_prev / f_heat))
                mio.write_bytes(mio.join(out, op), _png(vis))
                prob = float(rec["probability"])
                lesion_warning = ""
                breast = _breast_at(rec, geom, f_heat, heat.shape)
                try:
                    lesion = _lesion_scores(heat, f_heat, annotations.get(rec["image_id"]), breast)
                except Exception as exc:  # a bad annotation does not make the image an error
                    lesion = _lesion_scores(heat, f_heat, None)
                    lesion_warning = f"lesion annotation unusable: {describe_exception(exc)}"
                rows.append({
                    "image_id": rec["image_id"], "source_path": rec["source_path"], "label": int(rec["label"]),
                    "probability": prob, "predicted": int(prob >= threshold), "threshold": float(threshold),
                    "cam_peak_x": float(px / f_heat), "cam_peak_y": float(py / f_heat),
                    "cam_peak_value": float(heat[py, px]), "cam_top5_energy": top_energy_fraction(heat, 0.05),
                    "orig_height": h, "orig_width": w, "heatmap_path": hp, "overlay_path": op,
                    "cam_peak_in_breast": None if breast is None else bool(breast[py, px]),
                    **lesion,
                    "warning": "; ".join(x for x in (rec["warning"], lesion_warning) if x), "node_id": rec["node_id"],
                    "seconds_preprocess": float(rec["seconds_preprocess"]), "seconds_cam": float(rec["seconds_cam"]),
                    "seconds_write": time.perf_counter() - t0,
                })
            except Exception as exc:  # one bad image (e.g. an unreadable mask) must not stop the archive
                logger.warning("writing outputs failed for %s", rec["source_path"], exc_info=True)
                status.update(status="error", reason=f"writing outputs failed: {describe_exception(exc)}")
        if status["status"] != "ok":
            errors.append({"image_id": rec["image_id"], "path": rec["source_path"], "reason": status["reason"]})
        statuses.append(status)
    import pyarrow as pa

    ids = sorted(r["image_id"] for r in batch.to_dict("records"))
    digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20]
    if errors:
        write_table(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA), mio.join(out, ERROR_PARTS, f"part-{digest}.parquet"))
    # the scores part is written last: its presence commits the batch (see the module doc)
    if rows:
        write_table(pa.Table.from_pylist(rows, schema=SCORE_SCHEMA), mio.join(out, SCORES, f"part-{digest}.parquet"))
    return pd.DataFrame(statuses, columns=["image_id", "path", "status", "reason", "node_id", "prep_node_id"])


def _schemas():
    import pyarrow as pa

    score = pa.schema([
        ("image_id", pa.string()), ("source_path", pa.string()), ("label", pa.int8()),
        ("probability", pa.float32()), ("predicted", pa.int8()), ("threshold", pa.float32()),
        ("cam_peak_x", pa.float32()), ("cam_peak_y", pa.float32()), ("cam_peak_value", pa.float32()),
        ("cam_top5_energy", pa.float32()), ("orig_height", pa.int32()), ("orig_width", pa.int32()),
        ("heatmap_path", pa.string()), ("overlay_path", pa.string()),
        ("pointing_hit", pa.bool_()), ("energy_inside", pa.float32()), ("lesion_area_fraction", pa.float32()),
        ("cam_peak_in_breast", pa.bool_()), ("pointing_hit_in_breast", pa.bool_()),
        ("lesion_area_fraction_in_breast", pa.float32()),
        ("warning", pa.string()), ("node_id", pa.string()),
        ("seconds_preprocess", pa.float32()), ("seconds_cam", pa.float32()), ("seconds_write", pa.float32()),
    ])
    errors = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("reason", pa.string())])
    return score, errors


SCORE_SCHEMA, ERROR_SCHEMA = _schemas()


# ----------------------------------------------------------------------------- driver side
def _parts(out: str, folder: str) -> list[str]:
    base = mio.join(out, folder)
    if not mio.exists(base):
        return []
    return sorted(p for p, _ in mio.list_files(base) if p.endswith(".parquet"))


def read_parts(out: str, folder: str, columns: list[str]) -> pd.DataFrame:
    """The rows of every committed part of ``scores.parquet`` or the error parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = SCORE_SCHEMA if folder == SCORES else ERROR_SCHEMA
    tables = []
    for p in _parts(out, folder):
        fs, inner = mio.resolve(p)
        tables.append(pq.read_table(inner, filesystem=fs, columns=columns))
    if not tables:
        return pa.schema([schema.field(c) for c in columns]).empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()


def dedupe_parts(out: str) -> int:
    """Remove rows of images that were done twice, keeping their first row (parts in name order,
    score rows before error rows). This happens only when a killed run's last tasks were still
    writing while a ``--resume`` started: the work was repeated, not lost. Returns rows removed.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    seen: set[str] = set()
    removed = 0
    for folder in (SCORES, ERROR_PARTS):
        for p in _parts(out, folder):
            fs, inner = mio.resolve(p)
            table = pq.read_table(inner, filesystem=fs)
            ids = table.column("image_id").to_pylist()
            keep = [i not in seen for i in ids]
            seen.update(ids)
            if all(keep):
                continue
            removed += keep.count(False)
            logger.warning("%s: %d row(s) of images already in another part removed", p, keep.count(False))
            kept = table.filter(pa.array(keep))
            if kept.num_rows:
                write_table(kept, p)
            else:
                fs.delete_file(inner)
    return removed


def checkpoint_sha256(path: str) -> str:
    return hashlib.sha256(mio.read_bytes(path)).hexdigest()


def _annotation_keys(records: list[dict], inputs: list[str]) -> dict[str, set[str]]:
    """Every name an annotation row may use for an input: its absolute path (or URI), and its
    path relative to the input folder (or manifest folder) it was listed from."""
    roots = []
    for inp in inputs:
        root = inp if mio.is_dir(inp) else (posixpath.dirname(inp) if mio.is_uri(inp) else os.path.dirname(inp))
        roots.append(root.rstrip("/") if mio.is_uri(root) else os.path.abspath(root))
    keys: dict[str, set[str]] = {}
    for rec in records:
        keys.setdefault(rec["path"], set()).add(rec["image_id"])
        for root in roots:
            if rec["path"].startswith(root.rstrip("/") + "/"):
                keys.setdefault(mio.relpath(rec["path"], root), set()).add(rec["image_id"])
    return keys


def load_annotations(path: str, records: list[dict], inputs: list[str] | None = None
                     ) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Lesion annotations keyed by image id: a list of lesions per image.

    A CSV with ``image_id`` or ``path``, and either ``lesion_x``, ``lesion_y``, ``lesion_r``
    (source pixels) or ``mask_path`` (an image, non-zero inside the lesion, of the source's
    size). A ``path`` matches an input when it is, in this order: absolute (or a URI) and
    equal to the input's; relative to the CSV's folder; or the input's path relative to the
    input folder (or manifest folder) it was listed from. Several rows for one image are
    several lesions. Rows without a lesion are counted and skipped; rows that match no input
    are counted (``unmatched_rows``) and warned about.

    Raises:
        ValueError: missing columns, a malformed value (names the line), or rows with lesions
            none of which matches an input (names the first path and the rules).
    """
    from mammo_ray.data.inputs import printable_path, read_csv_text

    reader = csv.DictReader(io.StringIO(read_csv_text(path, "annotations")))
    reader.fieldnames = [c.strip() for c in (reader.fieldnames or [])]
    cols = set(reader.fieldnames)
    if not ({"path", "image_id"} & cols) or not ({"lesion_x", "lesion_y", "lesion_r"} <= cols or "mask_path" in cols):
        raise ValueError(f"annotations {path}: need a path or image_id column and lesion_x, lesion_y, lesion_r or "
                         f"mask_path columns; found {', '.join(sorted(cols)) or 'none'}")
    root = posixpath.dirname(path) if mio.is_uri(path) else os.path.dirname(os.path.abspath(path))

    def resolve(raw: str) -> str:
        if mio.is_uri(raw) or os.path.isabs(raw):
            return raw
        return posixpath.join(root, raw) if mio.is_uri(root) else os.path.normpath(os.path.join(root, raw))

    keys = _annotation_keys(records, list(inputs or []))
    ids = {r["image_id"] for r in records}
    found: dict[str, list[dict]] = {}
    unmatched = skipped = ambiguous = 0
    first_unmatched = None
    for lineno, row in enumerate(reader, start=2):
        iid = (row.get("image_id") or "").strip()
        raw = (row.get("path") or "").strip()
        if not iid and raw:
            match = keys.get(resolve(raw)) or keys.get(posixpath.normpath(raw.replace(os.sep, "/")), set())
            if len(match) > 1:
                ambiguous += 1  # the same relative name under two input folders
            iid = next(iter(match)) if len(match) == 1 else ""
        mask = (row.get("mask_path") or "").strip()
        vals = [(row.get(k) or "").strip() for k in ("lesion_x", "lesion_y", "lesion_r")]
        if not mask and not any(vals):
            skipped += 1
            continue
        if iid not in ids:
            unmatched += 1
            first_unmatched = first_unmatched or (raw or iid)
            continue
        if mask:
            found.setdefault(iid, []).append({"mask_path": resolve(mask)})
            continue
        try:
            x, y, r = (float(v) for v in vals)
        except ValueError:
            raise ValueError(f"annotations {path} line {lineno}: lesion_x/lesion_y/lesion_r {vals} are not numbers") from None
        if not (r > 0 and math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"annotations {path} line {lineno}: lesion_r={r} must be > 0 with finite lesion_x, lesion_y")
        found.setdefault(iid, []).append({"x": x, "y": y, "r": r})
    rules = (f"a path matches when absolute, relative to the CSV's folder {root}, or relative to the input folder "
             f"it was listed from")
    if unmatched and not found:
        raise ValueError(f"annotations {path}: none of its {unmatched} lesion rows matches an input (first: "
                         f"{printable_path(first_unmatched)!r}; {rules})")
    if unmatched:
        logger.warning("annotations %s: %d lesion rows match no input (first: %r); %s", path, unmatched,
                       printable_path(first_unmatched), rules)
    return found, {"annotated": len(found), "lesions": sum(len(v) for v in found.values()),
                   "unmatched_rows": unmatched, "ambiguous_rows": ambiguous, "rows_without_lesion": skipped}


def _identity(checkpoint: str, state: dict, opts: ExplainOptions, layer: str, threshold: float,
              inputs: list[str]) -> dict[str, Any]:
    return {"checkpoint": checkpoint, "checkpoint_sha256": checkpoint_sha256(checkpoint), "backbone": state["backbone"],
            "method": opts.method, "target_layer": layer, "threshold": float(threshold),
            "preview_size": int(opts.preview_size), "heatmap_max_side": int(opts.heatmap_max_side),
            "inputs": list(inputs), "annotations": opts.annotations,
            "annotations_sha256": hashlib.sha256(mio.read_bytes(opts.annotations)).hexdigest() if opts.annotations else None,
            "amp": bool(opts.amp), "spec": state["spec"]}


def _check_output(out: str, identity: dict, resume: bool) -> bool:
    """Refuse a folder holding other results; True when resuming previous results."""
    path = mio.join(out, IDENTITY_FILE)
    if not mio.exists(path):
        stray = [p for p in (SCORES, ERROR_PARTS, "summary.json") if mio.exists(mio.join(out, p))]
        if stray:
            raise OutputInUseError(f"--out {out} holds results without {IDENTITY_FILE} ({', '.join(stray)}): use another folder")
        return False
    previous = yaml.safe_load(mio.read_bytes(path)) or {}
    differ = [k for k in IDENTITY_KEYS if previous.get(k) != identity[k]]
    if not resume:
        what = ("another checkpoint's results (sha256 " + str(previous.get("checkpoint_sha256", "?"))[:12] + ")"
                if "checkpoint_sha256" in differ else "explain results")
        raise OutputInUseError(f"--out {out} already holds {what}: pass --resume to continue them, or use another folder")
    if differ:
        raise OutputInUseError(f"--out {out}: --resume needs the same run, but {', '.join(differ)} differ from its "
                               f"{IDENTITY_FILE}: use another folder")
    return True


def _check_pool(workers: int, gpw: float, cpus: int, gpus: float, *, autoscaling: bool) -> None:
    """The actor pool fits the cluster: on a local Ray a pool that cannot be placed (or that
    would hold every CPU, starving the tasks that feed it) would wait forever, so it is refused;
    on a cluster the autoscaler may still add nodes, so it is a warning."""
    problem = None
    if gpw > 0 and workers * gpw > gpus:
        problem = f"--workers {workers} x --gpus-per-worker {gpw:g} needs {workers * gpw:g} GPU(s), the cluster has {gpus:g}"
    elif gpw == 0 and cpus < 2:
        problem = f"a CPU-only explain job needs at least 2 CPUs (one CAM actor + its read/write tasks); Ray has {cpus}"
    elif gpw == 0 and workers > cpus - 1:
        problem = (f"--workers {workers} CPU actors on {cpus} CPU(s) leave none for the read/write tasks: "
                   f"use at most {cpus - 1}")
    if problem and not autoscaling:
        raise ValueError(problem)
    if problem:
        logger.warning("%s: waiting for the cluster to scale up", problem)


def _check_layer(state: dict, layer: str, method: str) -> None:
    """The target layer exists, gives a (N, C, H, W) map, and a CAM runs through it (a dry
    score + CAM on one blank input, as the actors will do it)."""
    import torch

    from mammo_ray.explain.cam import score_and_cam
    from mammo_ray.models.registry import get_submodule
    from mammo_ray.train.checkpoint import checkpoint_spec, model_from_checkpoint

    model = model_from_checkpoint(state)
    module = get_submodule(model, layer)
    seen: list[tuple] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape) if isinstance(o, torch.Tensor) else ()))
    h, w = checkpoint_spec(state).size
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, h, w))
    finally:
        handle.remove()
    if not seen or len(seen[0]) != 4:
        raise ValueError(f"--target-layer {layer!r}: its output has shape {seen[0] if seen else 'none'}, a CAM needs a "
                         f"(N, C, H, W) feature map (e.g. the backbone's last conv block)")
    try:
        score_and_cam(model, state["backbone"], torch.zeros(1, 1, h, w), method=method, target_layer=layer)
    except Exception as exc:
        raise ValueError(f"--target-layer {layer!r} with --method {method}: the CAM fails "
                         f"({type(exc).__name__}: {exc})".splitlines()[0]) from exc


def contact_sheet(out: str, scores: pd.DataFrame, *, n: int = 16, cols: int = 4, tile: int = 256,
                  annotations: dict[str, list[dict]] | None = None) -> int:
    """``overview.png``: the ``n`` highest-scoring overlays, captioned with the probability, the
    label when known and the source file's name, with the annotated lesions outlined (green)."""
    import cv2

    names = {0: "benign", 1: "malignant"}
    top = scores.sort_values(["probability", "image_id"], ascending=[False, True]).head(n)
    tiles = []
    for r in top.itertuples():
        try:
            img = cv2.imdecode(np.frombuffer(mio.read_bytes(mio.join(out, r.overlay_path)), np.uint8), cv2.IMREAD_COLOR)
        except OSError:
            logger.warning("overview: overlay %s is missing", r.overlay_path)
            continue
        lesions = (annotations or {}).get(r.image_id) or []
        if lesions and getattr(r, "orig_height", 0):
            try:  # outlines at the overlay's scale of the source
                ring = lesion_mask(img.shape[:2], img.shape[0] / float(r.orig_height), lesions).astype(np.uint8)
                contours, _ = cv2.findContours(ring, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(img, contours, -1, (0, 255, 0), max(1, img.shape[0] // 200), cv2.LINE_AA)
            except Exception:  # an unreadable mask file: the tile goes without its outline
                logger.warning("overview: lesion outline of %s not drawn", r.image_id, exc_info=True)
        f = tile / max(img.shape[:2])
        img = cv2.resize(img, (max(1, round(img.shape[1] * f)), max(1, round(img.shape[0] * f))), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((tile, tile, 3), np.uint8)
        y0, x0 = (tile - img.shape[0]) // 2, (tile - img.shape[1]) // 2
        canvas[y0:y0 + img.shape[0], x0:x0 + img.shape[1]] = img
        name = posixpath.basename(str(getattr(r, "source_path", "") or r.image_id))
        label = names.get(int(r.label), "")
        for k, text in enumerate((f"p={r.probability:.2f} {label}".strip(), name[:34])):
            cv2.putText(canvas, text, (4, tile - 26 + 16 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1,
                        cv2.LINE_AA)
        tiles.append(canvas)
    if not tiles:
        return 0
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])
    mio.write_bytes(mio.join(out, "overview.png"), _png(grid))
    return len(top)


def _localization_summary(scores: pd.DataFrame, ann_counts: dict[str, int], method: str, layer: str) -> dict[str, Any]:
    done = scores[scores["pointing_hit"].notna()]

    def block(df: pd.DataFrame) -> dict[str, Any]:
        if not len(df):
            return {"n": 0}
        pg, chance = float(df["pointing_hit"].astype(float).mean()), float(df["lesion_area_fraction"].mean())
        inb = df[df["pointing_hit_in_breast"].notna()]
        pg_b = float(inb["pointing_hit_in_breast"].astype(float).mean()) if len(inb) else None
        chance_b = float(inb["lesion_area_fraction_in_breast"].mean()) if len(inb) else None
        return {"n": int(len(df)), "pointing_game": pg, "energy_inside": float(df["energy_inside"].mean()),
                "chance": chance, "pointing_game_over_chance": pg / chance if chance > 0 else None,
                "n_in_breast": int(len(inb)), "pointing_game_in_breast": pg_b, "chance_in_breast": chance_b,
                "pointing_game_in_breast_over_chance": pg_b / chance_b if pg_b is not None and chance_b else None}

    names = {-1: "unlabeled", 0: "benign", 1: "malignant"}
    return {"method": method, "target_layer": layer, **ann_counts, "all": block(done),
            "by_label": {names[int(k)]: block(g) for k, g in done.groupby("label")},
            "note": "pointing_game: share of images whose CAM peak lies inside the lesion (any of its lesions); "
                    "energy_inside: mean share of CAM mass inside them; chance: mean lesion area fraction (the expected "
                    "value of both for a random map). *_in_breast: the peak searched inside the breast mask only, and "
                    "chance as the lesions' share of the breast",
            "per_image": "scores.parquet columns pointing_hit, energy_inside, lesion_area_fraction, "
                         "pointing_hit_in_breast, lesion_area_fraction_in_breast (chance per image)"}


def run_explain(inputs: list[str], checkpoint: str, out: str, opts: ExplainOptions | None = None, *,
                resume: bool = False, address: str | None = None) -> dict[str, Any]:
    """Score and explain every input image; see the module doc for the outputs.

    Returns:
        The summary (also written to ``out/summary.json``).

    Raises:
        ValueError: bad options, a checkpoint or layer that cannot be explained, or an output
            folder holding other results (all before any work starts).
        RuntimeError: the final accounting (one row or one error per input) fails.
    """
    import ray

    from mammo_ray.data.inputs import discover
    from mammo_ray.data.pipeline import write_errors
    from mammo_ray.ray_utils import remote_args
    from mammo_ray.ray_utils import init_ray
    from mammo_ray.train.checkpoint import load_checkpoint

    opts = opts or ExplainOptions()
    t0 = time.perf_counter()
    state = load_checkpoint(checkpoint)
    layer = resolve_target_layer(state["backbone"], opts.target_layer)
    _check_layer(state, layer, opts.method)
    stored = (state.get("metrics") or {}).get("val_threshold")
    threshold = opts.threshold if opts.threshold is not None else (float(stored) if stored is not None else 0.5)
    threshold_source = "--threshold" if opts.threshold is not None else ("checkpoint val_threshold (Youden on val)"
                                                                         if stored is not None else "0.5 (the checkpoint has no val threshold)")
    listing = discover(list(inputs), labels_optional=True)
    check_inputs_vs_out(list(inputs), [r["path"] for r in listing.records], out, extra_folders=listing.linked_folders)
    identity = _identity(checkpoint, state, opts, layer, threshold, inputs)
    resumed = _check_output(out, identity, resume)
    annotations, ann_counts = (load_annotations(opts.annotations, listing.records, list(inputs)) if opts.annotations
                                else ({}, {}))
    done: set[str] = set()
    if resumed:
        done = set(read_parts(out, SCORES, ["image_id"])["image_id"]) | set(read_parts(out, ERROR_PARTS, ["image_id"])["image_id"])
    todo = [r for r in listing.records if r["image_id"] not in done]
    logger.info("%d inputs: %d to explain, %d already done, %d refused while listing", listing.inputs, len(todo),
                len(listing.records) - len(todo), len(listing.errors))

    statuses = []
    if todo:
        init_ray(address)
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        gpw = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        cpus = int(resources.get("CPU", 1))
        # CPU-only: leave a CPU to the read/write tasks or the pool starves its own input
        workers = opts.workers or (max(1, int(gpus // gpw)) if gpw else max(1, cpus - 1))
        _check_pool(workers, gpw, cpus, gpus, autoscaling=bool(address or os.environ.get("RAY_ADDRESS")))
        cfg = PreprocessConfig(spec=state["spec"], external=True, unlabeled=True)
        check_fits(preprocess_task_bytes(size=cfg.spec.size, dtype=cfg.spec.dtype, batch_size=opts.prep_batch_size,
                                         max_pixels=cfg.max_pixels, keep_sources=True), largest_node_memory(),
                   what=f"explain: one read task ({opts.prep_batch_size} sources of up to {cfg.max_pixels} pixels, "
                        "kept for the overlays)", hint="run on nodes with more memory")
    # every check passed: from here on the folder holds this run's results
    mio.makedirs(out)
    mio.write_bytes(mio.join(out, IDENTITY_FILE), yaml.safe_dump(identity, sort_keys=False).encode())
    t_job = time.perf_counter()  # images/s of the pipeline itself, not of starting a local Ray
    if todo:
        ray.data.DataContext.get_current().op_resource_reservation_enabled = False  # see data/pipeline.py
        env = remote_args([*inputs, out, checkpoint, *([opts.annotations] if opts.annotations else [])])
        # Ray Data retries failed tasks forever by default; max_retries has no named parameter
        # in 2.60, only the deprecated **ray_remote_args (hence the warning filter below)
        task_env = {**env, "max_retries": TASK_RETRIES}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / opts.prep_batch_size)))
            # a batch whose task keeps dying becomes error lines (below), not a failed job; this
            # dataset's own context, not the process-wide one
            ds.context.max_errored_blocks = -1
            ds = ds.map_batches(prepare_batch, batch_format="pandas", batch_size=opts.prep_batch_size,
                                fn_kwargs={"cfg": cfg, "preview_size": opts.preview_size}, num_cpus=1, **task_env)
            ds = ds.map_batches(CamActor, batch_format="pandas", batch_size=opts.batch_size,
                                compute=ray.data.ActorPoolStrategy(size=workers),
                                fn_constructor_kwargs={"checkpoint": checkpoint, "method": opts.method,
                                                       "target_layer": layer, "amp": opts.amp},
                                # the actor keeps Ray Data's restart/retry defaults: a node that goes
                                # away makes its actor "temporarily unavailable" several times before
                                # the restart elsewhere, and bounded retries turned those batches into
                                # errors (tests/test_cluster.py); a failing batch is retried image by
                                # image inside the actor instead
                                num_gpus=gpw, num_cpus=0 if gpw else 1, **env)
            ds = ds.map_batches(write_batch, batch_format="pandas", batch_size=opts.batch_size, num_cpus=1,
                                fn_kwargs={"out": out, "threshold": threshold, "preview_size": opts.preview_size,
                                           "heatmap_max_side": opts.heatmap_max_side, "annotations": annotations}, **task_env)
        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            statuses.append(batch)
    job_seconds = time.perf_counter() - t_job
    status = pd.concat(statuses, ignore_index=True) if statuses else pd.DataFrame(
        columns=["image_id", "path", "status", "reason", "node_id", "prep_node_id"])

    # ---- the accounting: every input has exactly one score row or one error
    # only a resume can meet rows a dying run was still writing; in a fresh run a duplicate is a bug
    deduplicated = dedupe_parts(out) if resumed else 0
    scores = read_parts(out, SCORES, ["image_id", "source_path", "label", "orig_height", "probability", "predicted",
                                      "overlay_path", "pointing_hit",
                                      "energy_inside", "lesion_area_fraction", "cam_peak_in_breast",
                                      "pointing_hit_in_breast", "lesion_area_fraction_in_breast"])
    part_errors = read_parts(out, ERROR_PARTS, ["image_id", "path", "reason"])
    dup = int(scores["image_id"].duplicated().sum()) + int(part_errors["image_id"].duplicated().sum())
    both = set(scores["image_id"]) & set(part_errors["image_id"])
    expected = {r["image_id"] for r in listing.records}
    got = set(scores["image_id"]) | set(part_errors["image_id"])
    missing, extra = expected - got, got - expected
    errors = listing.errors + part_errors.to_dict("records")
    if missing:  # their task failed every retry (worker killed for memory, a crash): errors, not a lost job
        reason = (f"its Ray task failed (a dying worker, e.g. killed for memory, is retried {TASK_RETRIES} times; an "
                  "error in the task is in the Ray logs)")
        errors += [{"path": r["path"], "image_id": r["image_id"], "reason": reason}
                   for r in listing.records if r["image_id"] in missing]
        logger.warning("%d image(s) had no result after %d attempts: listed in errors.csv", len(missing), TASK_RETRIES + 1)
        missing = set()
    write_errors(out, errors)
    if len(scores):
        contact_sheet(out, scores, n=opts.top_n, annotations=annotations)
    seconds = time.perf_counter() - t0
    processed = len(status)
    summary = {
        "inputs": listing.inputs, "rows": int(len(scores)), "errors": len(errors),
        "skipped_while_listing": dict(sorted(listing.skipped.items())),
        "balanced": listing.inputs == len(scores) + len(errors) and not (dup or both or missing or extra),
        "processed_this_run": processed, "resumed": resumed, "duplicate_rows_removed": deduplicated, "skipped_as_done": len(listing.records) - len(todo),
        "checkpoint": checkpoint, "backbone": state["backbone"], "method": opts.method, "target_layer": layer,
        "threshold": threshold, "threshold_source": threshold_source,
        "predicted_malignant": int(scores["predicted"].sum()),
        # a peak on a removed label, film edge or the padding: the map explains no anatomy
        "cam_peaks_outside_breast": int((scores["cam_peak_in_breast"] == False).sum()),  # noqa: E712 (nullable)
        "cam_nodes": dict(Counter(status["node_id"])) if processed else {},
        "preprocess_nodes": dict(Counter(status["prep_node_id"])) if processed else {},
        "seconds": round(seconds, 3),
        "images_per_second": round(processed / job_seconds, 2) if processed and job_seconds > 0 else None,
    }
    if opts.annotations:
        summary["annotations"] = ann_counts  # matched images, lesions, unmatched and ambiguous rows
    if annotations:
        loc = _localization_summary(scores, ann_counts, opts.method, layer)
        mio.write_bytes(mio.join(out, "localization.json"), json.dumps(loc, indent=2).encode())
        summary["localization"] = {k: loc["all"].get(k) for k in ("n", "pointing_game", "energy_inside", "chance",
                                                                    "pointing_game_in_breast", "chance_in_breast")}
    mio.write_bytes(mio.join(out, "summary.json"), json.dumps(summary, indent=2).encode())
    line = f"inputs={summary['inputs']} rows={summary['rows']} errors={summary['errors']}"
    if not summary["balanced"]:
        raise RuntimeError(f"nothing-lost check failed: {line}; duplicates={dup} in_both={len(both)} "
                           f"missing={len(missing)} unexpected={len(extra)}")
    logger.info("nothing lost: %s", line)
    return summary
