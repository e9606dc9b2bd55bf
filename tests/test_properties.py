"""Property-based tests (Hypothesis, fixed example budgets so CI time is bounded).

1. Decode and listing: for any bytes under any file name, the file is exactly one of a
   record, an error line, an ignored non-image or a counted hidden entry at listing; and a
   record's processing gives exactly one row or one one-line error, never an exception.
2. Numeric config fields: any float is either accepted and in range, or refused with a
   one-line ValueError.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mammo_ray.config import PreprocessConfig, PreprocessSpec, SweepConfig, TrainConfig
from mammo_ray.data.inputs import IMAGE_EXTENSIONS, discover
from mammo_ray.data.pipeline import process_record

CFG = PreprocessConfig.load(size=32, min_side=8)
_PNG = cv2.imencode(".png", (np.arange(40 * 40).reshape(40, 40) % 251).astype(np.uint8))[1].tobytes()
_HEADERS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x00" * 128 + b"DICM", b"P5\n", b"II*\x00", b"MM\x00*",
            b"\x08\x00\x05\x00CS"]

contents = st.one_of(
    st.binary(max_size=600),
    st.tuples(st.sampled_from(_HEADERS), st.binary(max_size=400)).map(lambda t: t[0] + t[1]),
    st.integers(min_value=0, max_value=len(_PNG)).map(lambda n: _PNG[:n]),  # truncated real image
    st.just(_PNG),
)
# file names as raw bytes: anything a POSIX file system allows, including invalid UTF-8
names = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\x00" not in b and b not in (b".", b".."))
extensions = st.sampled_from([b".png", b".dcm", b".jpg", b".tif", b"", b".txt", b".PGM"])


LAYOUTS = ["flat", "benign", "unknown-class", "top-of-class-tree"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=contents, name=names, ext=extensions, layout=st.sampled_from(LAYOUTS))
def test_any_bytes_under_any_name_is_one_row_or_one_error(content, name, ext, layout):
    with tempfile.TemporaryDirectory() as root:
        broot = os.fsencode(root)
        folder = {"flat": b"", "benign": b"benign", "unknown-class": b"normal", "top-of-class-tree": b""}[layout]
        os.makedirs(os.path.join(broot, folder), exist_ok=True)
        written = 1
        if layout in ("unknown-class", "top-of-class-tree"):  # a class tree: one good image beside it
            os.makedirs(os.path.join(broot, b"benign"), exist_ok=True)
            with open(os.path.join(broot, b"benign", b"ok.png"), "wb") as f:
                f.write(_PNG)
            written = 2
        with open(os.path.join(broot, folder, name + ext), "wb") as f:
            f.write(content)
        listing = discover([root])
        accounted = (len(listing.records) + len(listing.errors) + sum(listing.ignored.values())
                     + sum(listing.skipped.values()))
        assert accounted == written, (listing, name, ext, layout)
        if name.startswith(b"."):
            assert listing.skipped == {"hidden file": 1}
        for rec in listing.records:
            rec = {**rec, "split": "external"}
            row, status = process_record(rec, CFG)
            assert (row is None) == (status["status"] == "error")
            if row is None:
                assert status["reason"] and "\n" not in status["reason"] and len(status["reason"]) < 400
            else:
                assert row["pixels"] and row["height"] == 32
            status["path"].encode("utf-8", "surrogateescape")
        for err in listing.errors:
            err["path"].encode("utf-8")  # always valid text for errors.csv
            assert "\n" not in err["reason"]


@pytest.mark.parametrize("yaml_text,key", [
    ("ratios: [nan, 0.5, 0.5]\n", "ratios"), ("spec:\n  mean: nan\n", "mean"), ("spec:\n  clahe_clip: .inf\n", "clahe_clip"),
    ("spec:\n  std: abc\n", "std"), ("max_pixels: .nan\n", "max_pixels"),
])
def test_yaml_strings_and_specials_refused_in_one_line(yaml_text, key, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ValueError) as info:
        PreprocessConfig.load(str(f))
    assert len(str(info.value).splitlines()) == 1 and key in str(info.value)


FLOAT_FIELDS = [
    (TrainConfig, "freeze_ratio", lambda v: 0 <= v <= 1),
    # the other bound at its default: base_lr < max_lr is required
    (TrainConfig, "base_lr", lambda v: 0 < v < TrainConfig().max_lr),
    (TrainConfig, "max_lr", lambda v: v > TrainConfig().base_lr),
    (TrainConfig, "clr_gamma", lambda v: math.isfinite(v)),
    (TrainConfig, "step_size_epochs", lambda v: v > 0),
    (TrainConfig, "momentum", lambda v: math.isfinite(v)),
    (TrainConfig, "weight_decay", lambda v: math.isfinite(v)),
    (SweepConfig, "cpus_per_trial", lambda v: v > 0),
    (SweepConfig, "gpus_per_trial", lambda v: v >= 0),
    (PreprocessSpec, "clahe_clip", lambda v: v > 0),
    (PreprocessSpec, "mean", lambda v: 0 <= v <= 1),
    (PreprocessSpec, "std", lambda v: 0.01 <= v <= 1),
]


@pytest.mark.parametrize("cls,name,in_range", FLOAT_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in FLOAT_FIELDS])
@settings(max_examples=60, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_is_accepted_in_range_or_refused_in_one_line(cls, name, in_range, value):
    assert name in {f.name for f in dataclasses.fields(cls)}
    try:
        cfg = cls(**{name: value})
    except ValueError as exc:
        msg = str(exc)
        assert len(msg.splitlines()) == 1 and name in msg
        return
    got = getattr(cfg, name)
    assert math.isfinite(got) and in_range(got), (name, value)


@settings(max_examples=60, deadline=None)
@given(ratios=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=3, max_size=3))
def test_split_ratios_any_floats(ratios):
    try:
        cfg = PreprocessConfig(ratios=tuple(ratios))
    except ValueError as exc:
        assert len(str(exc).splitlines()) == 1 and "ratios" in str(exc)
        return
    assert all(math.isfinite(r) and r >= 0 for r in cfg.ratios) and abs(sum(cfg.ratios) - 1) < 1e-6


def test_image_extensions_cover_the_strategy():
    assert {".png", ".dcm", ".jpg", ".tif", ""} <= set(IMAGE_EXTENSIONS)
