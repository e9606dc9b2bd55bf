"""Pictures of an explanation: display windowing, the CAM overlay, PNG encoding, output file
names and the contact sheet of the highest-scoring images. Pure functions (plus the sheet's
writes), called by the explain job's Ray stages."""
from __future__ import annotations

import logging
import posixpath

import cv2
import numpy as np
import pandas as pd

from mammo_ray import io as mio
from mammo_ray.config import LABELS
from mammo_ray.data.transforms import invert
from mammo_ray.explain.lesions import lesion_mask

logger = logging.getLogger(__name__)


def display_uint8(img: np.ndarray) -> np.ndarray:
    """A source image windowed for display (0.5-99.5th percentile to 0-255)."""
    f = img.astype(np.float32)
    lo, hi = np.percentile(f, (0.5, 99.5))
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((f - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)


def scale_for(h: int, w: int, side: int) -> float:
    return 1.0 if side <= 0 else min(1.0, side / max(h, w))


def make_preview(src: np.ndarray, inverted: bool, preview_size: int) -> np.ndarray:
    """The source at the preview size, windowed to uint8 for display, and shown as the model
    saw it (dark air, bright tissue) when preprocessing inverted it."""
    f = scale_for(*src.shape, preview_size)
    small = src if f == 1.0 else cv2.resize(src, (max(1, round(src.shape[1] * f)), max(1, round(src.shape[0] * f))),
                                            interpolation=cv2.INTER_AREA)
    return display_uint8(invert(small) if inverted else small)


def encode_png(img: np.ndarray) -> bytes:
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
    from pytorch_grad_cam.utils.image import show_cam_on_image  # deferred: see explain/cam.py

    rgb = np.repeat((preview.astype(np.float32) / 255.0)[:, :, None], 3, axis=2)
    vis = show_cam_on_image(rgb, heat.astype(np.float32), use_rgb=False, image_weight=0.6)
    if peak is not None:
        r = max(3, round(0.02 * max(heat.shape)))
        cv2.circle(vis, (int(peak[0]), int(peak[1])), r, (255, 255, 255), max(1, r // 3), cv2.LINE_AA)
    return vis


def contact_sheet(out: str, scores: pd.DataFrame, *, n: int = 16, cols: int = 4, tile: int = 256,
                  annotations: dict[str, list[dict]] | None = None) -> int:
    """``overview.png``: the ``n`` highest-scoring overlays, captioned with the probability, the
    label when known and the source file's name, with the annotated lesions outlined (green)."""
    names = dict(enumerate(LABELS))
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
    mio.write_bytes(mio.join(out, "overview.png"), encode_png(grid))
    return len(top)
