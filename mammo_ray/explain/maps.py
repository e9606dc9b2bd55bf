"""One explained image's outputs: its CAM mapped back to the source geometry, the 16-bit
heatmap and the overlay written, the peak located, and the lesion scores. Pure per-record
work (plus the two PNG writes), called by the explain job's write stage."""
from __future__ import annotations

import time
from typing import Any

import cv2
import numpy as np

from mammo_ray import io as mio
from mammo_ray.data.decode import describe_exception
from mammo_ray.data.transforms import GEOMETRY_FIELDS, map_to_original, scale_geometry
from mammo_ray.explain.lesions import breast_at, lesion_scores, top_energy_fraction
from mammo_ray.explain.render import encode_png, overlay_image, scale_for, shard_path


def source_maps(rec: dict, geom: dict, heatmap_max_side: int) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, float]:
    """The record's CAM at the heatmap's geometry (the source, scaled to ``heatmap_max_side``)
    and at the preview's. Returns (heat, f_heat, preview, preview_heat, f_preview)."""
    cam = np.frombuffer(rec["cam"], np.float32).reshape(int(rec["cam_height"]), int(rec["cam_width"]))
    h, w = int(geom["orig_height"]), int(geom["orig_width"])
    f_heat = scale_for(h, w, heatmap_max_side)
    heat = np.clip(map_to_original(cam, scale_geometry(geom, f_heat)), 0.0, 1.0)
    preview = np.frombuffer(rec["preview"], np.uint8).reshape(int(rec["preview_height"]), int(rec["preview_width"]))
    f_prev = preview.shape[0] / h
    pheat = np.clip(map_to_original(cam, scale_geometry(geom, f_prev)), 0.0, 1.0)
    if pheat.shape != preview.shape:  # rounding of the preview's size
        pheat = cv2.resize(pheat, (preview.shape[1], preview.shape[0]), interpolation=cv2.INTER_LINEAR)
    return heat, f_heat, preview, pheat, f_prev


def explain_record(rec: dict, *, out: str, threshold: float, heatmap_max_side: int,
                   lesions: list[dict] | None, within_breast: bool = True) -> dict[str, Any]:
    """Write a scored record's heatmap and overlay under ``out``; return its scores row.

    ``within_breast``: the written heatmap, the overlay and the peak keep the CAM inside the
    breast mask only (zero outside: a peak on a removed film label or the padding explains no
    anatomy). The raw map is still judged: ``cam_peak_in_breast`` and the overall pointing game
    use its own peak."""
    t0 = time.perf_counter()
    geom = {k: rec[k] for k in GEOMETRY_FIELDS}
    heat, f_heat, preview, pheat, f_prev = source_maps(rec, geom, heatmap_max_side)
    breast = breast_at(rec, geom, f_heat, heat.shape)
    raw_py, raw_px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    raw_peak_in_breast = None if breast is None else bool(breast[raw_py, raw_px])
    lesion_warning = ""
    try:  # on the raw map: pointing_hit (its own peak) and pointing_hit_in_breast (the peak inside the mask)
        lesion = lesion_scores(heat, f_heat, lesions, breast)
    except Exception as exc:  # a bad annotation does not make the image an error
        lesion = lesion_scores(heat, f_heat, None)
        lesion_warning = f"lesion annotation unusable: {describe_exception(exc)}"
    if within_breast and breast is not None and breast.any():
        heat = np.where(breast, heat, 0.0)
        on_preview = breast_at(rec, geom, f_prev, pheat.shape)
        if on_preview is not None:
            pheat = np.where(on_preview, pheat, 0.0)
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    hp, op = shard_path("heatmaps", rec["image_id"]), shard_path("overlays", rec["image_id"])
    heat16 = np.round(heat * 65535).astype(np.uint16)  # as written; its top-5% energy is the file's
    mio.write_bytes(mio.join(out, hp), encode_png(heat16))
    mio.write_bytes(mio.join(out, op), encode_png(overlay_image(preview, pheat, (px * f_prev / f_heat, py * f_prev / f_heat))))
    prob = float(rec["probability"])
    return {
        "image_id": rec["image_id"], "source_path": rec["source_path"], "label": int(rec["label"]),
        "probability": prob, "predicted_label": int(prob >= threshold), "threshold": float(threshold),
        "cam_peak_x": float(px / f_heat), "cam_peak_y": float(py / f_heat),
        "cam_peak_value": float(heat[py, px]), "cam_top5_energy": top_energy_fraction(heat16, 0.05),
        "orig_height": int(rec["orig_height"]), "orig_width": int(rec["orig_width"]), "heatmap_path": hp,
        "overlay_path": op, "cam_peak_in_breast": raw_peak_in_breast, **lesion,
        "warning": "; ".join(x for x in (rec["warning"], lesion_warning) if x), "node_id": rec["node_id"],
        "seconds_preprocess": float(rec["seconds_preprocess"]), "seconds_cam": float(rec["seconds_cam"]),
        "seconds_write": time.perf_counter() - t0,
    }
