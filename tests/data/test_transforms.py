"""Transforms: crop, orientation, resize modes, equalization, dtype, inversion, geometry."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from mammo_ray.config import PreprocessSpec
from mammo_ray.data.transforms import (
    bounding_box, breast_mask, cast, equalize, invert, is_inverted, map_to_original,
    needs_flip, preprocess_image, resize,
)


def breast(h=400, w=300, side="left", dtype=np.uint16, marker=True):
    """A half-disc 'breast' on one side, textured, plus a small bright marker far from it."""
    top = np.iinfo(dtype).max
    yy, xx = np.mgrid[0:h, 0:w]
    cx = 0 if side == "left" else w - 1
    inside = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - cx) / (0.7 * w)) ** 2 <= 1
    rng = np.random.default_rng(0)
    img = np.zeros((h, w), np.float64)
    img[inside] = 0.4 + 0.3 * rng.random(inside.sum())
    if marker:
        mx = w - 12 if side == "left" else 4
        img[4:10, mx:mx + 6] = 1.0
    return (img * top).astype(dtype), inside


def test_constant_image_survives_every_step():
    for value in (0, 1234):
        img = np.full((300, 200), value, np.uint16)
        out, geom = preprocess_image(img, PreprocessSpec(size=64))
        assert out.shape == (64, 64) and out.dtype == np.uint8
        assert np.isfinite(out.astype(float)).all()
        assert geom["flipped"] is False and geom["inverted"] is False


def test_mask_keeps_breast_and_drops_marker():
    img, inside = breast()
    mask = breast_mask(img)
    assert (mask & inside).sum() / inside.sum() > 0.95
    assert not mask[4:10, -12:-6].any()  # the clip marker is another component


@pytest.mark.parametrize("side,orientation,flip", [("left", "left", False), ("right", "left", True),
                                                   ("left", "right", True), ("right", "none", False)])
def test_orientation(side, orientation, flip):
    img, _ = breast(side=side)
    assert needs_flip(breast_mask(img), orientation) is flip


def test_both_sides_end_up_identical_after_preprocessing():
    left, _ = breast(side="left", marker=False)
    right = left[:, ::-1].copy()
    spec = PreprocessSpec(size=96, equalize="none")
    a, ga = preprocess_image(left, spec)
    b, gb = preprocess_image(right, spec)
    assert ga["flipped"] is False and gb["flipped"] is True
    # the breast mask is found on a thumbnail, so crop boxes may differ by a source pixel
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3


def test_crop_removes_background():
    img, inside = breast(marker=False)
    y0, x0, y1, x1 = bounding_box(breast_mask(img), margin=0)
    ys, xs = np.nonzero(inside)
    assert abs(y0 - ys.min()) <= 3 and abs(y1 - 1 - ys.max()) <= 3
    assert x0 == 0 and abs(x1 - 1 - xs.max()) <= 3


@pytest.mark.parametrize("shape,size", [((400, 300), (224, 224)), ((300, 600), (128, 96)), ((50, 40), (64, 64))])
def test_pad_keeps_aspect_and_stretch_fills(shape, size):
    img = np.full(shape, 200, np.uint8)
    small, sy, sx, (pt, pl, pb, pr) = resize(img, size, "pad")
    assert small.shape[0] + pt + pb == size[0] and small.shape[1] + pl + pr == size[1]
    assert abs(sy - sx) / sx < 0.03  # same scale on both axes
    assert pl == 0  # padding goes away from the chest wall
    small, sy, sx, pad = resize(img, size, "stretch")
    assert small.shape == size and pad == (0, 0, 0, 0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("mode", ["clahe", "global", "none"])
def test_equalize_keeps_dtype_and_spreads_a_narrow_histogram(mode, dtype):
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(1)
    img = (top * (0.45 + 0.1 * rng.random((128, 128)))).astype(dtype)
    out = equalize(img, mode)
    assert out.dtype == dtype and out.shape == img.shape
    spread_in, spread_out = np.ptp(img.astype(float)), np.ptp(out.astype(float))
    if mode == "none":
        np.testing.assert_array_equal(out, img)
    else:
        assert spread_out > 2 * spread_in


def test_global_equalization_ignores_zero_background_and_uses_full_16_bit_range():
    img = np.zeros((100, 100), np.uint16)
    img[20:80, 20:80] = np.linspace(30000, 31000, 3600).reshape(60, 60).astype(np.uint16)
    out = equalize(img, "global")
    assert (out[img == 0] == 0).all()
    assert out[img > 0].max() == 65535 and out[img > 0].min() < 2000


def test_equalize_unknown_mode_names_allowed_ones():
    with pytest.raises(ValueError, match="use one of clahe, global, none"):
        equalize(np.zeros((8, 8), np.uint8), "hist")


@pytest.mark.parametrize("dtype,expect", [("uint8", np.uint8), ("uint16", np.uint16), ("float32", np.float32)])
def test_cast(dtype, expect):
    img = np.array([[0, 65535]], np.uint16)
    out = cast(img, dtype)
    assert out.dtype == expect
    assert out[0, 0] == 0 and float(out[0, 1]) == (1.0 if dtype == "float32" else np.iinfo(expect).max)


def test_inverted_image_detected_and_fixed():
    img, _ = breast(dtype=np.uint8, marker=False)
    assert not is_inverted(img)
    assert is_inverted(invert(img))
    a, ga = preprocess_image(img, PreprocessSpec(size=64, equalize="none"))
    b, gb = preprocess_image(invert(img), PreprocessSpec(size=64, equalize="none"))
    assert not ga["inverted"] and gb["inverted"]
    np.testing.assert_array_equal(a, b)


def test_invert_never_keeps_bright_background():
    img, _ = breast(dtype=np.uint8, marker=False)
    _, geom = preprocess_image(invert(img), PreprocessSpec(size=64, invert="never"))
    assert geom["inverted"] is False


def test_16_bit_source_to_16_bit_output_keeps_depth():
    img, _ = breast(marker=False)
    out, _ = preprocess_image(img, PreprocessSpec(size=128, dtype="uint16", equalize="none"))
    assert out.dtype == np.uint16 and len(np.unique(out)) > 1000


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_map_to_original_puts_a_point_back_where_it_was(side, mode):
    img, _ = breast(side=side, marker=False)
    py, px = 200, (60 if side == "left" else 240)
    spec = PreprocessSpec(size=(96, 80), resize_mode=mode, equalize="none")
    _, geom = preprocess_image(img, spec)
    # the model-space location of the source point
    x_or = (img.shape[1] - 1 - px) if geom["flipped"] else px
    my = round((py - geom["crop_y0"]) * geom["scale_y"]) + geom["pad_top"]
    mx = round((x_or - geom["crop_x0"]) * geom["scale_x"]) + geom["pad_left"]
    heat = np.zeros(spec.size, np.float32)
    heat[my, mx] = 1.0
    back = map_to_original(heat, geom)
    assert back.shape == img.shape
    by, bx = np.unravel_index(np.argmax(back), back.shape)
    assert abs(by - py) <= 4 and abs(bx - px) <= 4
    assert back.min() >= 0 and back.max() <= 1


@pytest.mark.parametrize("side", ["left", "right"])
def test_map_to_original_at_a_preview_scale(side):
    """A scaled geometry maps straight onto a preview of the source: the same map as mapping to
    full size and then shrinking, and the point lands at the scaled place."""
    from mammo_ray.data.transforms import scale_geometry

    img, _ = breast(side=side, marker=False)
    py, px = 200, (60 if side == "left" else 240)
    spec = PreprocessSpec(size=(96, 80), equalize="none")
    _, geom = preprocess_image(img, spec)
    x_or = (img.shape[1] - 1 - px) if geom["flipped"] else px
    heat = np.zeros(spec.size, np.float32)
    heat[round((py - geom["crop_y0"]) * geom["scale_y"]) + geom["pad_top"],
         round((x_or - geom["crop_x0"]) * geom["scale_x"]) + geom["pad_left"]] = 1.0
    heat = cv2.GaussianBlur(heat, (9, 9), 2)
    f = 0.25
    small = map_to_original(heat, scale_geometry(geom, f))
    assert small.shape == (round(img.shape[0] * f), round(img.shape[1] * f))
    by, bx = np.unravel_index(np.argmax(small), small.shape)
    assert abs(by - py * f) <= 2 and abs(bx - px * f) <= 2
    full = cv2.resize(map_to_original(heat, geom), small.shape[::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(full - small).max() < 0.25 * heat.max()
    assert scale_geometry(geom, 1.0) == geom


def test_clahe_on_16_bit_matches_8_bit_and_does_not_amplify_noise():
    rng = np.random.default_rng(2)
    smooth = np.tile(np.linspace(0.3, 0.6, 128), (128, 1))
    img16 = ((smooth + rng.normal(0, 0.002, smooth.shape)) * 65535).astype(np.uint16)
    img8 = (img16 // 257).astype(np.uint8)
    out16, out8 = equalize(img16, "clahe"), equalize(img8, "clahe")
    assert np.abs(out16 / 257.0 - out8).max() <= 1
    # pixel-to-pixel noise stays small relative to the full range (unclipped AHE makes it ~0.3)
    noise = np.abs(np.diff(out16.astype(float) / 65535, axis=1)).mean()
    assert noise < 0.02, noise


def test_crop_keeps_every_phantom_lesion_including_mlo_with_pectoral_muscle():
    """Otsu alone splits 'pectoral + dense' from 'fat + air' on MLO views and crops the breast
    away; the crop must keep every lesion (the label's evidence) inside the box."""
    from mammo_ray.data.synth import render_phantom

    spec = PreprocessSpec(size=64, equalize="none")
    for i in range(40):
        rng = np.random.default_rng([5, i])
        img, lesion = render_phantom(rng, label=i % 2, height=256, width=208,
                                     laterality="LR"[i % 2], view=("MLO", "CC")[(i // 2) % 2])
        _, g = preprocess_image((img * 65535).astype(np.uint16), spec)
        x = (img.shape[1] - 1 - lesion["lesion_x"]) if g["flipped"] else lesion["lesion_x"]
        y, r = lesion["lesion_y"], lesion["lesion_r"]
        assert g["crop_y0"] <= y - r and y + r <= g["crop_y1"], (i, g, lesion)
        assert g["crop_x0"] <= x - r and x + r <= g["crop_x1"], (i, g, lesion)
