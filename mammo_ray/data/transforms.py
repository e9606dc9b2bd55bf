"""Preprocessing transforms: plain numpy/OpenCV functions of one image (no Ray, no torch).

``preprocess_image`` runs them in the spec's order and returns the pixels plus the
*geometry* (how output pixels came from the source) that explanations use to map
heatmaps back onto the original image (``map_to_original``).
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from mammo_ray.config import PreprocessSpec

GEOMETRY_FIELDS = (
    "orig_height", "orig_width", "inverted", "flipped",
    "crop_y0", "crop_x0", "crop_y1", "crop_x1",
    "scale_y", "scale_x", "pad_top", "pad_left", "pad_bottom", "pad_right",
)


def full_scale(img: np.ndarray) -> float:
    """The value that means 'white' for this array's dtype (1.0 for floats)."""
    return float(np.iinfo(img.dtype).max) if img.dtype.kind in "ui" else 1.0


def _thumbnail(img: np.ndarray, long_side: int = 256) -> tuple[np.ndarray, float]:
    h, w = img.shape
    f = min(1.0, long_side / max(h, w))
    if f < 1.0:
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return img, f


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    return np.clip(img.astype(np.float32) * (255.0 / full_scale(img)), 0, 255).astype(np.uint8)


#: shares of the intensity range counted as "at the dark end" / "at the bright end"
INVERSION_TOLERANCES = (0.02, 0.05, 0.08, 0.10)
#: below this |margin| the inversion decision is reported as uncertain
INVERSION_WARN_MARGIN = 0.3


def inversion_margin(img: np.ndarray) -> float:
    """Evidence for the background's polarity, in [-1, 1]: > 0 dark background (as displayed),
    < 0 bright background (an inverted export or an un-handled MONOCHROME1).

    The background around a breast (air, or the film outside the exposure) is one large
    region at an end of the intensity range, while tissue spreads over the middle. So the
    share of pixels near the dark end is weighed against the share near the bright end,
    ``(dark - bright) / (dark + bright)``, averaged over a few tolerances. Unlike the old
    median of the image border, bright film edges, scanner strips and a breast that fills
    the frame do not decide it: on the shared digital set (3,383 images, 550 with a bright
    background) and mini-MIAS (160 films) it makes no mistake, the smallest margin is 0.04,
    and 4 images fall below :data:`INVERSION_WARN_MARGIN`.
    """
    thumb, _ = _thumbnail(img, 128)
    t = thumb.astype(np.float32)
    lo, hi = float(t.min()), float(t.max())
    if hi - lo < 1e-6:
        return 0.0
    u = (t - lo) / (hi - lo)
    margins = []
    for tol in INVERSION_TOLERANCES:
        dark, bright = float((u <= tol).mean()), float((u >= 1 - tol).mean())
        margins.append((dark - bright) / (dark + bright) if dark + bright > 0 else 0.0)
    return float(np.mean(margins))


def is_inverted(img: np.ndarray) -> bool:
    """True when the background is bright (see :func:`inversion_margin`)."""
    return inversion_margin(img) < 0


def invert(img: np.ndarray) -> np.ndarray:
    """Invert intensities within the dtype's range."""
    if img.dtype.kind in "ui":
        return (np.iinfo(img.dtype).max - img).astype(img.dtype)
    return 1.0 - img


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    # background = what a flood fill from outside the image reaches; the rest is the breast
    # with its darker (fatty) inner regions, which a threshold alone leaves out
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(padded, flood, (0, 0), 2)
    return (padded[1:-1, 1:-1] != 2)


def _thumbnail_mask(img: np.ndarray) -> tuple[np.ndarray, float, float | None]:
    """The breast on a 256-px thumbnail, the share of the thumbnail that is bright but not
    breast (labels, letters, markers, film edges), and the air/breast level in the source's
    units (None when nothing separates them)."""
    thumb, _ = _thumbnail(img, 256)
    t8 = _to_uint8(thumb)
    if int(t8.max()) == int(t8.min()):
        return np.ones(thumb.shape, bool), 0.0, None
    t8 = cv2.GaussianBlur(t8, (5, 5), 0)
    otsu, _ = cv2.threshold(t8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Otsu separates the two largest intensity modes; with a bright pectoral muscle or
    # dense tissue those can be "bright tissue" vs "fat + air", and the crop would cut
    # fatty breast away. The threshold is capped just above the air level instead.
    h, w = t8.shape
    b = max(1, min(h, w) // 16)
    frame = np.concatenate([t8[:b].ravel(), t8[-b:].ravel(), t8[:, :b].ravel(), t8[:, -b:].ravel()])
    air, top = float(np.percentile(frame, 25)), float(np.percentile(t8, 99))
    level = min(otsu, air + 0.15 * (top - air))
    binary = (t8 > level).astype(np.uint8)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return np.ones(thumb.shape, bool), 0.0, None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = _fill_holes(labels == largest)
    source_level = level * full_scale(img) / 255.0  # back through _to_uint8
    return mask, float(((t8 > level) & ~mask).mean()), source_level


#: source pixels kept beyond the full-resolution breast edge (the skin line's faint last pixels)
SKIN_MARGIN = 2


def _refine_edge(full: np.ndarray, img: np.ndarray, inner: np.ndarray, level: float | None) -> np.ndarray:
    """The upscaled thumbnail mask with its edge redrawn at full resolution.

    The thumbnail mask, upscaled and grown by a thumbnail pixel so the crop and the masking
    never cut the skin line, reaches several source pixels into the air beyond the breast
    (about 8 at a 1024-px film's straight chest-wall cut). A CAM that fires on that sharp edge
    then had its peak counted, and drawn, "inside the breast" on black film. Within the band
    between the eroded thumbnail mask (``inner``) and ``full``, only pixels above the air level
    (a 3x3 opening removes lone noise pixels; it keeps a straight edge where it is, where a
    blur would smear it outwards) and SKIN_MARGIN pixels around them stay. Binary morphology
    on uint8: about 20 ms on a 13-Mpx DICOM, all steps together (a median filter instead cost
    30 ms more). The pixels the model sees are not changed by this, only the mask that
    explanations are judged against.
    """
    if level is None:
        return full
    above = cv2.morphologyEx((img > level).view(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    k = 2 * SKIN_MARGIN + 1
    above = cv2.dilate(above, np.ones((k, k), np.uint8)) > 0
    return full & (inner | above)


def breast_mask(img: np.ndarray) -> np.ndarray:
    """Boolean mask of the breast: Otsu threshold on a thumbnail, largest connected component.

    Labels, markers and burned-in text are separate components and fall away; dark
    regions inside the breast (holes of the thresholded component) are kept.
    Returns an all-True mask for a constant image (nothing to separate).
    """
    small = _thumbnail_mask(img)[0].astype(np.uint8)
    return cv2.resize(small, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def _scale_box(box: tuple[int, int, int, int], small: tuple[int, int], full: tuple[int, int]) -> tuple[int, int, int, int]:
    """A thumbnail box in full-resolution pixels, rounded outwards (never cuts breast)."""
    fy, fx = full[0] / small[0], full[1] / small[1]
    y0, x0, y1, x1 = box
    return (max(0, int(np.floor(y0 * fy))), max(0, int(np.floor(x0 * fx))),
            min(full[0], int(np.ceil(y1 * fy))), min(full[1], int(np.ceil(x1 * fx))))


def needs_flip(mask: np.ndarray, orientation: str) -> bool:
    """Whether a horizontal flip puts the chest wall (the breast's heavier side) on ``orientation``."""
    if orientation == "none":
        return False
    w = mask.shape[1]
    left = int(mask[:, : w // 2].sum())
    right = int(mask[:, w - w // 2:].sum())
    on_left = left >= right
    return on_left != (orientation == "left")


def bounding_box(mask: np.ndarray, *, margin: float = 0.02) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the mask with a small margin, clipped to the image; full image if empty."""
    h, w = mask.shape
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return 0, 0, h, w
    my, mx = round(margin * h), round(margin * w)
    return (max(0, int(ys[0]) - my), max(0, int(xs[0]) - mx),
            min(h, int(ys[-1]) + 1 + my), min(w, int(xs[-1]) + 1 + mx))


def resize(img: np.ndarray, size: tuple[int, int], mode: str) -> tuple[np.ndarray, float, float, tuple[int, int, int, int]]:
    """Resize to ``size``; ``pad`` keeps aspect ratio. Returns (resized unpadded image,
    scale_y, scale_x, (pad_top, pad_left, pad_bottom, pad_right))."""
    th, tw = size
    h, w = img.shape
    if mode == "stretch":
        nh, nw = th, tw
    elif mode == "pad":
        f = min(th / h, tw / w)
        nh, nw = max(1, min(th, round(h * f))), max(1, min(tw, round(w * f)))
    else:
        raise ValueError(f"resize_mode={mode!r}: use one of pad, stretch")
    interp = cv2.INTER_AREA if nh < h or nw < w else cv2.INTER_LINEAR
    out = cv2.resize(img, (nw, nh), interpolation=interp)
    top, left = (th - nh) // 2, 0
    # Pad on the side away from the chest wall: after orientation the breast hugs the left.
    pad = (top, left, th - nh - top, tw - nw - left)
    return out, nh / h, nw / w, pad


def equalize(img: np.ndarray, mode: str, *, clip: float = 2.0, grid: int = 8) -> np.ndarray:
    """Histogram equalization: ``clahe`` (local, OpenCV), ``global`` or ``none``; dtype kept.

    ``global`` on 16-bit data uses a numpy CDF lookup because ``cv2.equalizeHist`` only
    takes 8-bit images, and it ignores the zero background so air does not eat the range.
    """
    if mode == "none":
        return img
    if mode == "clahe":
        if img.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"CLAHE needs uint8 or uint16 pixels, got {img.dtype}")
        clahe = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(int(grid), int(grid)))
        if img.dtype == np.uint8:
            return clahe.apply(img)
        # OpenCV's 16-bit CLAHE uses 65,536 bins and clips at max(clip * tile_px / 65536, 1)
        # counts, i.e. it does not clip at all for realistic tiles: unclipped AHE, which
        # blows detector noise up into texture. The 256-bin histogram the clip limit is
        # defined for (and that mammography pipelines use) is kept by equalizing at 8 bits.
        return clahe.apply(_to_uint8(img)).astype(np.uint16) * np.uint16(257)
    if mode == "global":
        top = int(full_scale(img))
        fg = img[img > 0]
        if fg.size == 0 or int(fg.min()) == int(fg.max()):
            return img
        hist = np.bincount(fg.ravel(), minlength=top + 1).astype(np.float64)
        cdf = np.cumsum(hist)
        cdf_min = cdf[cdf > 0][0]
        lut = np.clip(np.round((cdf - cdf_min) / (cdf[-1] - cdf_min) * (top - 1)) + 1, 1, top)
        lut[0] = 0
        return lut.astype(img.dtype)[img]
    raise ValueError(f"equalize={mode!r}: use one of clahe, global, none")


def cast(img: np.ndarray, dtype: str) -> np.ndarray:
    """Convert to the stored dtype: ``uint8``/``uint16`` full range, ``float32`` in [0, 1]."""
    unit = img.astype(np.float32) / full_scale(img)
    if dtype == "float32":
        return unit
    if dtype == "uint8":
        return img if img.dtype == np.uint8 else np.round(unit * 255).astype(np.uint8)
    if dtype == "uint16":
        return img if img.dtype == np.uint16 else np.round(unit * 65535).astype(np.uint16)
    raise ValueError(f"dtype={dtype!r}: use one of uint8, uint16, float32")


def _mask_outside(img: np.ndarray, mask: np.ndarray, shape: tuple[int, int], box: tuple[int, int, int, int],
                  level: float | None, *, refine: bool) -> tuple[np.ndarray, np.ndarray]:
    """The cropped image with every pixel outside the (upscaled thumbnail) breast mask set to 0,
    and the mask in the crop's pixels: redrawn at full resolution at its edge with ``refine``."""
    (h, w), (y0, x0, y1, x1) = shape, box
    # one thumbnail pixel of margin (dilation) so the upscaled mask never cuts the skin line
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8))
    full = cv2.resize(grown, (w, h), interpolation=cv2.INTER_NEAREST)[y0:y1, x0:x1].astype(bool)
    img = np.where(full, img, np.zeros((), img.dtype))
    if not refine:
        return img, full
    # two thumbnail pixels in from the edge: the nearest-neighbour upscale errs by less
    shrunk = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8))
    inner = cv2.resize(shrunk, (w, h), interpolation=cv2.INTER_NEAREST)[y0:y1, x0:x1].astype(bool)
    return img, _refine_edge(full, img, inner, level)


def preprocess_image(img: np.ndarray, spec: PreprocessSpec, *, refine_mask: bool = False
                     ) -> tuple[np.ndarray, dict[str, Any]]:
    """Source pixels -> model pixels per the spec, in this order:
    re-invert (auto) -> orient -> crop to breast -> mask outside the breast -> resize ->
    equalize -> pad -> dtype.

    Equalization runs after the resize (cheap at output size, as in the paper) and before
    padding, so padding does not enter the histogram.

    Returns:
        (pixels of shape ``spec.size`` and ``spec.dtype``, a dict of the ``GEOMETRY_FIELDS`` plus
        ``inversion_margin`` (None unless ``invert: auto``), ``masked_bright_fraction`` (the
        share of the source's pixels that were bright but outside the breast and set to 0) and
        ``breast_mask`` (bool array of ``spec.size``: the breast in model space; padding and
        masked pixels False; with ``refine_mask`` its edge is redrawn at full resolution, see
        ``_refine_edge``: the explain job's CAM stage asks for it, preprocessing does not pay it))
    """
    if img.ndim != 2:
        raise ValueError(f"preprocess_image needs a 2-D grayscale array, got shape {img.shape}")
    h, w = img.shape
    margin = inversion_margin(img) if spec.invert == "auto" else None
    inverted = margin is not None and margin < 0
    if inverted:
        img = invert(img)
    # the mask is found at thumbnail resolution: flip side and box scale up exactly
    use_mask = spec.mask
    mask, bright_removed, level = (_thumbnail_mask(img) if (spec.crop or use_mask or spec.orientation != "none")
                                   else (None, 0.0, None))
    flipped = mask is not None and needs_flip(mask, spec.orientation)
    if flipped:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if spec.crop and mask is not None:
        y0, x0, y1, x1 = _scale_box(bounding_box(mask), mask.shape, (h, w))
    else:
        y0, x0, y1, x1 = 0, 0, h, w
    img = np.ascontiguousarray(img[y0:y1, x0:x1])
    if use_mask and mask is not None:
        img, edge = _mask_outside(img, mask, (h, w), (y0, x0, y1, x1), level, refine=refine_mask)
    else:
        bright_removed, edge = 0.0, None
    small, sy, sx, (pt, pl, pb, pr) = resize(img, spec.size, spec.resize_mode)
    model_mask = _model_mask(edge, small.shape, spec.size, pt, pl)
    small = equalize(small, spec.equalize, clip=spec.clahe_clip, grid=spec.clahe_grid)
    out = cv2.copyMakeBorder(small, pt, pb, pl, pr, cv2.BORDER_CONSTANT, value=0)
    out = cast(out, spec.dtype)
    geometry = {
        "orig_height": h, "orig_width": w, "inverted": bool(inverted), "flipped": bool(flipped),
        "crop_y0": y0, "crop_x0": x0, "crop_y1": y1, "crop_x1": x1,
        "scale_y": float(sy), "scale_x": float(sx),
        "pad_top": pt, "pad_left": pl, "pad_bottom": pb, "pad_right": pr,
        # evidence, not geometry: kept per row (see inversion_margin, _thumbnail_mask)
        "inversion_margin": margin, "masked_bright_fraction": float(bright_removed),
        "breast_mask": model_mask,
    }
    return out, geometry


def _model_mask(full: np.ndarray | None, shape: tuple[int, int], size: tuple[int, int], top: int,
                left: int) -> np.ndarray:
    """The breast mask in model space (padding False; all of the image without masking):
    explanations score CAMs within it and flag peaks outside it."""
    model_mask = np.zeros(size, bool)
    inner = (np.ones(shape, bool) if full is None else
             cv2.resize(full.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0)
    model_mask[top:top + shape[0], left:left + shape[1]] = inner
    return model_mask


def map_to_original(arr: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """Map a model-space map (e.g. a heatmap of the output size) back onto the source
    image's geometry: remove padding, undo resize, place into the crop box, undo the flip.
    Outside the crop box the result is 0.
    """
    g = geometry
    th, tw = arr.shape[:2]
    inner = arr[g["pad_top"]: th - g["pad_bottom"], g["pad_left"]: tw - g["pad_right"]]
    ch, cw = g["crop_y1"] - g["crop_y0"], g["crop_x1"] - g["crop_x0"]
    inner = cv2.resize(np.ascontiguousarray(inner, dtype=np.float32), (cw, ch), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((g["orig_height"], g["orig_width"]), np.float32)
    out[g["crop_y0"]: g["crop_y1"], g["crop_x0"]: g["crop_x1"]] = inner
    if g["flipped"]:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def scale_geometry(geometry: dict[str, Any], factor: float) -> dict[str, Any]:
    """The geometry of the source image scaled by ``factor`` (a preview of it): with it,
    :func:`map_to_original` maps straight onto the preview instead of the full-size source."""
    g = dict(geometry)
    if factor == 1.0:
        return g
    h, w = max(1, round(g["orig_height"] * factor)), max(1, round(g["orig_width"] * factor))
    y0, y1 = round(g["crop_y0"] * factor), round(g["crop_y1"] * factor)
    x0, x1 = round(g["crop_x0"] * factor), round(g["crop_x1"] * factor)
    g.update(orig_height=h, orig_width=w, crop_y0=min(y0, h - 1), crop_x0=min(x0, w - 1),
             crop_y1=min(max(y1, y0 + 1), h), crop_x1=min(max(x1, x0 + 1), w))
    return g
