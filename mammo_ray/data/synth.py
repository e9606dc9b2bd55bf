"""Synthetic mammogram phantoms for tests, demos and benchmarks.

The phantoms imitate the look of screening mammograms closely enough that the
pipeline (decoding, orientation, cropping, resizing, training, explaining) has
real work to do, while the label is carried by lesion *morphology* only:

* label 0 (benign-like): a round/oval, circumscribed mass with a smooth edge;
* label 1 (malignant-like): an irregular mass with bright spiculations.

Both classes share the radius range and the mean lesion brightness, so neither
size nor brightness gives the label away.

Orientation convention (as on a standard back-to-back hanging protocol): for
``laterality="L"`` the chest wall is the **left** image edge and the nipple
points right; for ``laterality="R"`` the chest wall is the **right** image edge
and the nipple points left. MLO views add a bright pectoral-muscle triangle in
the upper corner at the chest wall; CC views have none.

Everything is numpy + OpenCV + pydicom (no Ray, no torch) so that Ray workers,
the CLI and unit tests can import it cheaply. Rendering is scale-invariant: the
smooth anatomy is drawn at a working resolution of at most 640 px and resized
up, while the lesion, the noise and the burned-in markers are drawn at the
output resolution, so full-field 3328x2560 images take about a second.
"""
from __future__ import annotations

import csv
import logging
import math
import os

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from mammo_ray.config import LABELS

logger = logging.getLogger(__name__)

FORMATS = ("png8", "png16", "dcm", "dcm-mono1", "dcm-rle", "jpg")

#: Digital Mammography X-Ray Image Storage - For Presentation.
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"

_EXTENSIONS = {"png8": "png", "png16": "png", "jpg": "jpg", "dcm": "dcm", "dcm-mono1": "dcm", "dcm-rle": "dcm"}
_LABEL_NAMES = LABELS
_VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
_WORK_MAX = 640  # anatomy is smooth, so it is rendered at most this large and resized up
_REF_WIDTH = 416.0  # pixel sizes (spicule thickness, text) are specified at this width
_DCM_MAX = 4095  # 12-bit stored values

CSV_COLUMNS = (
    "path", "label", "patient_id", "laterality", "view",
    "lesion_x", "lesion_y", "lesion_r", "format", "height", "width",
)


# --------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Unit-variance smooth random field with correlation length ~``cell`` pixels.

    Args:
        rng: Random generator.
        shape: (height, width) of the output.
        cell: Correlation length in output pixels.

    Returns:
        float32 array of ``shape``.
    """
    h, w = shape
    # Draw white noise on a coarse grid and interpolate: much cheaper than a
    # large Gaussian blur at full resolution, and the cost is independent of ``cell``.
    gh, gw = max(3, int(round(h / cell)) + 3), max(3, int(round(w / cell)) + 3)
    coarse = rng.standard_normal((gh, gw), dtype=np.float32)
    coarse = cv2.GaussianBlur(coarse, (0, 0), 0.7)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


def _anatomy(rng: np.random.Generator, h: int, w: int, view: str, contrast: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Breast tissue in canonical orientation (chest wall at x=0).

    Args:
        rng: Random generator.
        h: Working height.
        w: Working width.
        view: "CC" or "MLO".
        contrast: Scales the fibroglandular texture amplitude.

    Returns:
        (tissue intensity, breast mask in [0,1], lesion-free mask as uint8) at (h, w).
    """
    if view == "MLO":
        # The MLO breast reaches the top edge at the chest wall (axilla side).
        cy = h * rng.uniform(0.42, 0.50)
        b = h * rng.uniform(0.50, 0.57)
        a = w * rng.uniform(0.62, 0.80)
    else:
        cy = h * rng.uniform(0.46, 0.54)
        b = h * rng.uniform(0.37, 0.44)
        a = w * rng.uniform(0.64, 0.84)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    xs += 0.5
    ys += 0.5
    u = xs / a
    v = (ys - cy) / b
    theta = np.arctan2(v, u)
    # A gently wobbling skin line so the outline is not a perfect ellipse.
    wobble = 1.0
    for k in (3, 5, 7):
        wobble = wobble + rng.uniform(0.005, 0.025) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    rho = np.sqrt(u * u + v * v) / wobble
    inside = np.clip(1.0 - rho * rho, 0.0, 1.0)
    # Compressed thickness falls off towards the skin line, so does the intensity.
    profile = inside ** 0.35
    # Anti-aliased mask edge ~1 working pixel wide.
    edge = max(a, b) / 1.5
    mask = np.clip((1.0 - rho) * edge + 0.5, 0.0, 1.0)

    # Fibroglandular tissue: multi-scale smooth noise, denser near the centre/behind the nipple.
    tex = (0.55 * _smooth_noise(rng, (h, w), w / 9.0)
           + 0.30 * _smooth_noise(rng, (h, w), w / 25.0)
           + 0.15 * _smooth_noise(rng, (h, w), w / 70.0))
    density = rng.uniform(-0.4, 0.4)
    glands = np.clip(0.45 * tex + density + 0.6 * (1.0 - rho) - 0.2, 0.0, 1.0)
    fat = 0.30
    tissue = profile * (fat + contrast * 0.32 * glands)

    free = mask > 0.5
    if view == "MLO":
        # Pectoral muscle: bright triangle in the upper chest-wall corner, soft edge.
        pw = w * rng.uniform(0.25, 0.40)
        ph = h * rng.uniform(0.38, 0.55)
        lin = 1.0 - xs / pw - ys / ph  # > 0 inside the triangle
        pect = np.clip(lin * min(pw, ph) / 2.0 + 0.5, 0.0, 1.0)
        level = 0.30 + contrast * rng.uniform(0.40, 0.50)
        muscle = level * (1.0 + 0.04 * tex)
        tissue = tissue * (1.0 - pect) + muscle * pect
        mask = np.maximum(mask, pect)
        free &= pect < 0.5
    tissue *= mask
    return tissue.astype(np.float32), mask.astype(np.float32), free.astype(np.uint8)


def _lesion_map(rng: np.random.Generator, label: int, r: float, scale: float,
                fx: float, fy: float) -> tuple[np.ndarray, int]:
    """Lesion intensity map in [0,1] on a square patch centred on the lesion.

    Args:
        rng: Random generator.
        label: 0 benign-like, 1 malignant-like.
        r: Lesion radius in output pixels.
        scale: Output width / reference width (sets spicule thickness).
        fx: Sub-pixel x offset of the centre within its pixel.
        fy: Sub-pixel y offset of the centre within its pixel.

    Returns:
        (patch, half size) where the centre pixel is at index ``half``.
    """
    half = int(math.ceil(3.0 * r)) + 4
    size = 2 * half + 1
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    dx = xs - half - fx
    dy = ys - half - fy
    dist = np.sqrt(dx * dx + dy * dy)
    # Internal density: a flat dome, same for both classes.
    if label == 0:
        ecc = rng.uniform(0.70, 1.0)
        phi = rng.uniform(0, np.pi)
        c, s = math.cos(phi), math.sin(phi)
        u = (c * dx + s * dy) / r
        v = (-s * dx + c * dy) / (r * ecc)
        dn = np.sqrt(u * u + v * v)
        sharp = r / 1.2  # circumscribed: edge ~1 px wide
        core = np.clip((1.0 - dn) * sharp + 0.5, 0.0, 1.0)
        dome = np.clip(1.0 - dn * dn, 0.0, 1.0) ** 0.25
        lesion = core * (0.55 + 0.45 * dome)
        return lesion.astype(np.float32), half

    # Malignant-like: lobulated, ill-defined core ...
    theta = np.arctan2(dy, dx)
    radial = np.ones_like(theta)
    for k in range(3, 8):
        radial += rng.uniform(0.03, 0.08) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    rc = 0.75 * r
    dn = dist / (rc * radial)
    core = np.clip((1.0 - dn) * rc / 2.5 + 0.5, 0.0, 1.0)
    dome = np.clip(1.0 - dn * dn, 0.0, 1.0) ** 0.25
    lesion = core * (0.55 + 0.45 * dome)

    # ... with bright spicules radiating out. They are drawn as tapered wedges on a
    # 4x sub-pixel grid (cv2 ``shift``) so that thin ones are still anti-aliased.
    spic = np.zeros((size, size), np.uint8)
    n = int(rng.integers(8, 15))
    start = rng.uniform(0, 2 * np.pi)
    shift = 4
    mul = 1 << shift
    for i in range(n):
        ang = start + 2 * np.pi * (i + rng.uniform(-0.3, 0.3)) / n
        length = r * rng.uniform(1.2, 2.2)
        thick = scale * rng.uniform(3.0, 6.0)
        ca, sa = math.cos(ang), math.sin(ang)
        r0 = 0.4 * r
        r1 = r0 + length
        # Base half-width ``thick/2`` tapering to a quarter of it at the tip.
        pts = []
        for rad, hw in ((r0, thick / 2), (r1, thick / 8)):
            px, py = half + fx + 0.5 + rad * ca, half + fy + 0.5 + rad * sa
            pts.append((px - hw * sa, py + hw * ca))
            pts.append((px + hw * sa, py - hw * ca))
        poly = np.array([pts[0], pts[2], pts[3], pts[1]], np.float64) - 0.5
        poly = np.round(poly * mul).astype(np.int32)
        level = int(rng.integers(200, 256))
        cv2.fillConvexPoly(spic, poly, level, lineType=cv2.LINE_AA, shift=shift)
    spicf = spic.astype(np.float32) / 255.0
    spicf = cv2.GaussianBlur(spicf, (0, 0), max(0.5, 0.35 * scale))
    # Spicules fade with distance from the centre, like real desmoplastic strands.
    fade = np.clip(1.15 - 0.3 * dist / r, 0.4, 1.0)
    lesion = np.maximum(lesion, spicf * fade)
    return lesion.astype(np.float32), half


def _place_lesion(rng: np.random.Generator, free: np.ndarray, margin: float
                  ) -> tuple[float, float, float]:
    """Random lesion centre at least ``margin`` from skin, pectoral muscle and image edges.

    Args:
        rng: Random generator.
        free: uint8 mask (working resolution) of breast tissue that may hold the lesion.
        margin: Required distance in working pixels.

    Returns:
        (x, y, shrink): centre in working pixels and a factor <= 1 by which the lesion
        must shrink when the breast is too small for ``margin`` (normally 1).
    """
    padded = cv2.copyMakeBorder(free, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    shrink = 1.0
    dmax = float(dist.max())
    if dmax < margin:
        # Only for unusually small/odd breasts: shrink the lesion rather than fail.
        shrink = max(dmax, 1.0) / margin
        margin = dmax
    cand = np.flatnonzero(dist >= margin)
    idx = int(cand[rng.integers(cand.size)])
    y, x = divmod(idx, free.shape[1])
    return x + rng.uniform(0.0, 1.0), y + rng.uniform(0.0, 1.0), shrink


def _burn_markers(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, *,
                  laterality: str, view: str, lesion: tuple[float, float, float], scale: float) -> None:
    """Burn in a text label over the background and/or a clip marker, in place.

    Drawn independently of the class label, so they are nuisance features only.
    """
    h, w = img.shape
    if rng.random() < 0.5:
        text = f"{laterality} {view}"
        font = cv2.FONT_HERSHEY_SIMPLEX
        fscale = 0.5 * scale
        thick = max(1, int(round(1.2 * scale)))
        (tw, th), base = cv2.getTextSize(text, font, fscale, thick)
        pad = max(2, int(round(6 * scale)))
        # Nipple side is away from the chest wall: right for L, left for R.
        x0 = w - tw - pad if laterality == "L" else pad
        corners = [pad + th, h - pad - base]
        if rng.random() < 0.5:
            corners.reverse()
        for y0 in corners:
            y_top, y_bot = max(0, y0 - th - 1), min(h, y0 + base + 1)
            if x0 >= 0 and mask[y_top:y_bot, max(0, x0):x0 + tw].max(initial=0.0) < 0.05:
                # OpenCV 5 draws text on 8-bit images only: render a stencil, then burn it in.
                stencil = np.zeros((y_bot - y_top, tw + 2), np.uint8)
                cv2.putText(stencil, text, (1, y0 - y_top), font, fscale, 255, thick, cv2.LINE_AA)
                level = float(rng.uniform(0.8, 1.0))
                region = img[y_top:y_bot, x0 - 1:x0 + tw + 1] if x0 >= 1 else img[y_top:y_bot, 0:tw + 2]
                np.maximum(region, stencil[:, : region.shape[1]].astype(np.float32) * (level / 255.0), out=region)
                break
    if rng.random() < 0.3:
        # Skin/clip marker: small bright square inside the breast, away from the lesion.
        side = max(2, int(round(6 * scale)))
        lx, ly, lr = lesion
        ys, xs = np.nonzero(mask[::4, ::4] > 0.99)
        if xs.size:
            for _ in range(10):
                k = int(rng.integers(xs.size))
                cx, cy = 4 * int(xs[k]), 4 * int(ys[k])
                if math.hypot(cx - lx, cy - ly) > 3.5 * lr + side:
                    img[max(0, cy - side // 2):cy + side // 2 + 1, max(0, cx - side // 2):cx + side // 2 + 1] = 0.97
                    break


def render_phantom(rng: np.random.Generator, *, label: int, height: int = 512, width: int = 416,
                   laterality: str = "L", view: str = "CC", contrast: float = 1.0, noise: float = 1.0,
                   markers: bool = True) -> tuple[np.ndarray, dict]:
    """Render one synthetic mammogram.

    Args:
        rng: Random generator (use ``np.random.default_rng([seed, index])`` for reproducibility).
        label: 0 benign-like (circumscribed oval mass), 1 malignant-like (spiculated mass).
        height: Output height in pixels.
        width: Output width in pixels.
        laterality: "L" (chest wall on the left edge) or "R" (chest wall on the right edge).
        view: "CC" or "MLO" (MLO adds a pectoral muscle in the upper chest-wall corner).
        contrast: Scales all attenuation differences above fat (glandular texture, pectoral
            muscle and lesion), like a different acquisition technique.
        noise: Scales the additive quantum-like noise.
        markers: Sometimes burn in a text label and a clip marker (independent of the label).

    Returns:
        (image, info): float32 HxW image in [0, 1] with background ~0, and
        ``{"lesion_x", "lesion_y", "lesion_r"}`` in pixel coordinates of the returned image.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    if laterality not in ("L", "R"):
        raise ValueError(f"laterality must be 'L' or 'R', got {laterality!r}")
    if view not in ("CC", "MLO"):
        raise ValueError(f"view must be 'CC' or 'MLO', got {view!r}")
    if height < 32 or width < 32:
        raise ValueError(f"image too small: {height}x{width}")

    s = min(1.0, _WORK_MAX / max(height, width))
    hw, ww = max(32, int(round(height * s))), max(32, int(round(width * s)))
    tissue, mask, free = _anatomy(rng, hw, ww, view, contrast)

    # Lesion size and a margin that keeps the spicules inside the breast, same for both
    # classes so that the position does not leak the label either.
    r = width * rng.uniform(0.05, 0.09)
    sx, sy = width / ww, height / hw
    px, py, shrink = _place_lesion(rng, free, 2.9 * r / sx)
    r *= shrink
    lx, ly = px * sx - 0.5, py * sy - 0.5

    if (hw, ww) != (height, width):
        tissue = cv2.resize(tissue, (width, height), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)
    img = tissue

    scale = width / _REF_WIDTH
    ix, iy = int(math.floor(lx)), int(math.floor(ly))
    patch, half = _lesion_map(rng, label, r, scale, lx - ix, ly - iy)
    amp = contrast * rng.uniform(0.17, 0.25)
    y0, x0 = iy - half, ix - half
    # Clip the patch to the image (only the empty tails of long spicules can fall outside).
    py0, px0 = max(0, -y0), max(0, -x0)
    py1 = patch.shape[0] - max(0, y0 + patch.shape[0] - height)
    px1 = patch.shape[1] - max(0, x0 + patch.shape[1] - width)
    img[y0 + py0:y0 + py1, x0 + px0:x0 + px1] += amp * patch[py0:py1, px0:px1] * mask[
        y0 + py0:y0 + py1, x0 + px0:x0 + px1]

    # Detector noise: white plus a little correlated (structured) component.
    if noise > 0:
        sigma = 0.012 * noise
        img += sigma * rng.standard_normal(img.shape, dtype=np.float32)
        img += 0.5 * sigma * _smooth_noise(rng, img.shape, max(2.0, 3.0 * scale))
    np.clip(img, 0.0, 1.0, out=img)

    if laterality == "R":
        # Mirror so the chest wall is on the right edge; copy keeps the array contiguous for cv2.
        img = np.ascontiguousarray(img[:, ::-1])
        mask = np.ascontiguousarray(mask[:, ::-1])
        lx = width - 1 - lx
    info = {"lesion_x": float(lx), "lesion_y": float(ly), "lesion_r": float(r)}
    if markers:
        _burn_markers(rng, img, mask, laterality=laterality, view=view, lesion=(lx, ly, r), scale=scale)
    return img.astype(np.float32, copy=False), info


# --------------------------------------------------------------------------- writing
def _uid(seed: int, *parts: object) -> str:
    """Deterministic DICOM UID from the seed and a few identifying parts."""
    return str(generate_uid(entropy_srcs=[str(seed), *(str(p) for p in parts)]))


def _write_dicom(path: str, img: np.ndarray, fmt: str, *, seed: int, index: int, patient_id: str,
                 laterality: str, view: str) -> None:
    """Write ``img`` (float in [0,1]) as a 12-bit MG For Presentation DICOM file."""
    values = np.round(img * _DCM_MAX).astype(np.uint16)
    photometric = "MONOCHROME2"
    if fmt == "dcm-mono1":
        # MONOCHROME1: low values display white, so store the inverted values.
        values = (_DCM_MAX - values).astype(np.uint16)
        photometric = "MONOCHROME1"
    sop_uid = _uid(seed, index, "sop")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MAMMO_RAY_SYN"

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(seed, patient_id, "study")
    ds.SeriesInstanceUID = _uid(seed, index, "series")
    ds.FrameOfReferenceUID = _uid(seed, patient_id, laterality, "frame")
    # Fixed dates keep the files byte-identical across runs.
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20200101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.Modality = "MG"
    ds.Manufacturer = "mammo_ray synthetic"
    ds.PatientID = patient_id
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientSex = "F"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.BodyPartExamined = "BREAST"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = laterality
    ds.Laterality = laterality
    ds.ViewPosition = view
    # Row/column directions for our convention (nipple right for L, left for R), as in the
    # standard's examples: LCC A\R, RCC P\L, LMLO A\FR, RMLO P\FL.
    ds.PatientOrientation = [
        "A" if laterality == "L" else "P",
        ("" if view == "CC" else "F") + ("R" if laterality == "L" else "L"),
    ]
    ds.Rows, ds.Columns = int(values.shape[0]), int(values.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    lo, hi = int(values.min()), int(values.max())
    ds.WindowCenter = (lo + hi) / 2.0
    ds.WindowWidth = max(1, hi - lo + 1)
    ds.PixelData = values.tobytes()
    if fmt == "dcm-rle":
        # generate_instance_uid=False: a random new UID would break byte-identical output.
        ds.compress(RLELossless, values, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def _write_image(path: str, img: np.ndarray, fmt: str, **dicom_kwargs: object) -> None:
    """Encode ``img`` (float32 in [0,1]) to ``path`` in format ``fmt``."""
    if fmt == "png8":
        ok = cv2.imwrite(path, np.round(img * 255.0).astype(np.uint8))
    elif fmt == "png16":
        ok = cv2.imwrite(path, np.round(img * 65535.0).astype(np.uint16))
    elif fmt == "jpg":
        ok = cv2.imwrite(path, np.round(img * 255.0).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
    elif fmt in ("dcm", "dcm-mono1", "dcm-rle"):
        _write_dicom(path, img, fmt, **dicom_kwargs)  # type: ignore[arg-type]
        ok = True
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not ok:
        raise OSError(f"cv2.imwrite failed for {path}")


def _plan_patients(seed: int, n: int, malignant_fraction: float) -> list[tuple[str, int, str, str]]:
    """(patient_id, label, laterality, view) for each of ``n`` images, grouped into patients."""
    # A 3-word seed cannot collide with the per-image [seed, index] streams.
    rng = np.random.default_rng([seed, 0xFFFFFFFF, 7])
    plan: list[tuple[str, int, str, str]] = []
    k = 0
    while len(plan) < n:
        pid = f"SYN{seed:03d}-P{k:05d}"
        label = int(rng.random() < malignant_fraction)
        count = int(rng.integers(1, 5))
        views = sorted(rng.choice(len(_VIEWS), size=count, replace=False).tolist())
        for v in views[: n - len(plan)]:
            plan.append((pid, label, *_VIEWS[v]))
        k += 1
    return plan


def write_phantoms(out: str, n: int, *, seed: int = 0, height: int = 512, width: int = 416,
                   formats: tuple[str, ...] = ("png8", "png16", "dcm", "dcm-mono1"),
                   contrast: float = 1.0, noise: float = 1.0, markers: bool = True,
                   malignant_fraction: float = 0.5, overwrite: bool = False) -> list[dict]:
    """Write a synthetic data set of ``n`` images in class folders plus ``labels.csv``.

    Files go to ``out/benign/`` and ``out/malignant/`` named ``{seed:03d}_{index:06d}.{ext}``
    (no patient id in the name); formats are assigned round-robin by index.

    Args:
        out: Local output folder (created).
        n: Number of images.
        seed: Data set seed; the same seed gives byte-identical files.
        height: Image height in pixels.
        width: Image width in pixels.
        formats: Formats to cycle through, from ``FORMATS``.
        contrast: Lesion/tissue contrast scale (see ``render_phantom``).
        noise: Noise scale (see ``render_phantom``).
        markers: Allow burned-in text and clip markers.
        malignant_fraction: Probability that a patient is malignant.

    Returns:
        The rows of ``labels.csv`` as dicts (columns ``CSV_COLUMNS``).
    """
    if not formats:
        raise ValueError("formats must not be empty")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown formats {bad}; expected a subset of {FORMATS}")
    from mammo_ray.outputs import all_files, check_out_location, finish_out, read_marker, start_out

    check_out_location(out)
    # a rerun with --overwrite replaces its own phantoms; a folder of someone's images is
    # never written into, since same-named files would be overwritten
    if all_files(out) and (read_marker(out) or {}).get("stage") != "synth":
        raise ValueError(f"--out {out} is not empty and holds no phantoms written by mammo-ray synth: use a new folder")
    start_out(out, "synth", overwrite=overwrite)
    for name in _LABEL_NAMES:
        os.makedirs(os.path.join(out, name), exist_ok=True)

    rows: list[dict] = []
    for index, (pid, label, laterality, view) in enumerate(_plan_patients(seed, n, malignant_fraction)):
        fmt = formats[index % len(formats)]
        rng = np.random.default_rng([seed, index])
        img, info = render_phantom(rng, label=label, height=height, width=width, laterality=laterality,
                                   view=view, contrast=contrast, noise=noise, markers=markers)
        rel = f"{_LABEL_NAMES[label]}/{seed:03d}_{index:06d}.{_EXTENSIONS[fmt]}"
        _write_image(os.path.join(out, *rel.split("/")), img, fmt, seed=seed, index=index,
                     patient_id=pid, laterality=laterality, view=view)
        rows.append({
            "path": rel, "label": _LABEL_NAMES[label], "patient_id": pid,
            "laterality": laterality, "view": view,
            "lesion_x": round(info["lesion_x"], 2), "lesion_y": round(info["lesion_y"], 2),
            "lesion_r": round(info["lesion_r"], 2), "format": fmt, "height": height, "width": width,
        })
    with open(os.path.join(out, "labels.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    finish_out(out, "synth")
    logger.info("wrote %d synthetic phantoms (%d patients) to %s", len(rows),
                len({r["patient_id"] for r in rows}), out)
    return rows
