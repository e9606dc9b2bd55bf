"""Lesion annotations and how well a CAM points at them: reading the annotations CSV, the
lesions' union as a mask at any geometry, the pointing game (overall and within the breast
mask) and the job's localisation summary. Pure functions, no Ray."""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import posixpath
from typing import Any

import cv2
import numpy as np
import pandas as pd

from mammo_ray import io as mio
from mammo_ray.config import LABELS
from mammo_ray.data.decode import decode_bytes
from mammo_ray.data.inputs import printable_path, read_csv_text
from mammo_ray.data.transforms import map_to_original, scale_geometry

logger = logging.getLogger(__name__)


def top_energy_fraction(cam: np.ndarray, top: float = 0.05) -> float:
    """Share of a CAM's total mass held by its ``top`` fraction of pixels (how focused it is:
    about ``top`` for a flat map, near 1 for a single hot spot)."""
    flat = cam.ravel()
    k = max(1, int(round(top * flat.size)))
    if flat.dtype == np.uint16:
        return _top_energy_fraction_u16(flat, k)
    total = float(flat.sum())
    if total <= 0:
        return 0.0
    top_mass = np.partition(flat, flat.size - k)[flat.size - k:].sum(dtype=np.float64)
    return float(min(1.0, top_mass / flat.sum(dtype=np.float64)))  # float32 sums can exceed 1 by an ulp


def _top_energy_fraction_u16(flat: np.ndarray, k: int) -> float:
    """top_energy_fraction of a 16-bit map (the heatmap as written) by counting, not sorting:
    np.partition of a full-field map (3328x2560) took 0.17 s per image, half the explain write
    stage's time; a histogram of its 65,536 levels gives the same sum in a tenth of that."""
    counts = np.bincount(flat, minlength=65536)[::-1].astype(np.int64)  # from the top level down
    levels = np.arange(65535, -1, -1, dtype=np.int64)
    total = int((counts * levels).sum())
    if total <= 0:
        return 0.0
    taken = np.cumsum(counts)
    i = int(np.searchsorted(taken, k))  # the level holding the k-th largest pixel
    top_mass = int((counts[:i] * levels[:i]).sum()) + (k - (int(taken[i - 1]) if i else 0)) * int(levels[i])
    return float(min(1.0, top_mass / total))


def localization(cam: np.ndarray, *, x: float | None = None, y: float | None = None, r: float | None = None,
                 mask: np.ndarray | None = None) -> dict[str, float | bool]:
    """How well a CAM (in the source geometry) points at a lesion given as a circle (centre
    ``x``, ``y``, radius ``r`` in pixels) or a boolean ``mask`` of the CAM's shape.

    Returns:
        pointing_hit: the CAM's peak lies inside the lesion (pointing game, Zhang et al. 2018);
        energy_inside: share of the CAM's total mass inside the lesion;
        area_fraction: the lesion's share of the image, the chance level of both.
    """
    h, w = cam.shape
    if mask is not None:
        inside = np.asarray(mask, bool)
        if inside.shape != cam.shape:
            raise ValueError(f"lesion mask shape {inside.shape} differs from the CAM's {cam.shape}")
    else:
        yy, xx = np.ogrid[0:h, 0:w]
        inside = (xx - x) ** 2 + (yy - y) ** 2 <= r ** 2
    py, px = np.unravel_index(int(np.argmax(cam)), cam.shape)
    total = float(cam.sum())
    return {"pointing_hit": bool(inside[py, px]), "energy_inside": float(cam[inside].sum() / total) if total > 0 else 0.0,
            "area_fraction": float(inside.mean())}


def lesion_mask(shape: tuple[int, int], f_heat: float, lesions: list[dict]) -> np.ndarray:
    """The union of an image's lesions (circles in source pixels, or mask files of the source's
    size) as a boolean mask of the heatmap's ``shape`` (the source scaled by ``f_heat``)."""
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


def lesion_scores(heat: np.ndarray, f_heat: float, lesions: list[dict] | None,
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


def breast_at(rec: dict, geom: dict, f_heat: float, shape: tuple[int, int]) -> np.ndarray | None:
    """The model-space breast mask of a record, mapped onto the heatmap's geometry."""
    packed = rec.get("breast_mask") or b""
    h, w = int(rec.get("height") or 0), int(rec.get("width") or 0)
    if not packed or not h or not w:
        return None
    model = np.unpackbits(np.frombuffer(packed, np.uint8))[: h * w].reshape(h, w).astype(np.float32)
    mapped = map_to_original(model, scale_geometry(geom, f_heat)) > 0.5
    return mapped if mapped.shape == shape else None


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


def _circle(vals: list[str], path: str, lineno: int) -> dict[str, float]:
    try:
        x, y, r = (float(v) for v in vals)
    except ValueError:
        raise ValueError(f"annotations {path} line {lineno}: lesion_x/lesion_y/lesion_r {vals} are not numbers") from None
    if not (r > 0 and math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"annotations {path} line {lineno}: lesion_r={r} must be > 0 with finite lesion_x, lesion_y")
    return {"x": x, "y": y, "r": r}


def load_annotations(path: str, records: list[dict], inputs: list[str] | None = None
                     ) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Lesion annotations keyed by image id: a list of lesions per image.

    A CSV with ``image_id`` or ``path``, and either ``lesion_x``, ``lesion_y``, ``lesion_r``
    (source pixels) or ``mask_path`` (an image, non-zero inside the lesion, of the source's
    size). A ``path`` matches an input when it is, in this order: absolute (or a URI) and
    equal to the input's; relative to the CSV's folder; or the input's path relative to the
    input folder (or manifest folder) it was listed from. Several rows for one image are
    several lesions. Rows without a lesion are counted and skipped; rows that match no input
    are counted (``unmatched_rows``) and warned about. Raises ValueError for missing columns,
    a malformed value (names the line), or lesion rows none of which matches an input.
    """
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
        elif iid not in ids:
            unmatched += 1
            first_unmatched = first_unmatched or (raw or iid)
        else:
            found.setdefault(iid, []).append({"mask_path": resolve(mask)} if mask else _circle(vals, path, lineno))
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


def localization_summary(scores: pd.DataFrame, ann_counts: dict[str, int], method: str, layer: str) -> dict[str, Any]:
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

    names = {-1: "unlabeled", **dict(enumerate(LABELS))}
    return {"method": method, "target_layer": layer, **ann_counts, "all": block(done),
            "by_label": {names[int(k)]: block(g) for k, g in done.groupby("label")},
            "note": "pointing_game: share of images whose CAM peak lies inside the lesion (any of its lesions); "
                    "energy_inside: mean share of CAM mass inside them; chance: mean lesion area fraction (the expected "
                    "value of both for a random map). *_in_breast: the peak searched inside the breast mask only, and "
                    "chance as the lesions' share of the breast",
            "per_image": "scores.parquet columns pointing_hit, energy_inside, lesion_area_fraction, "
                         "pointing_hit_in_breast, lesion_area_fraction_in_breast (chance per image)"}
