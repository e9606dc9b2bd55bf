"""Tests for the synthetic mammogram phantoms (mammo_ray.data.synth)."""
from __future__ import annotations

import csv
import os
import time
from collections import defaultdict

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from mammo_ray.data.synth import CSV_COLUMNS, FORMATS, MG_FOR_PRESENTATION, render_phantom, write_phantoms
from mammo_ray.outputs import MARKER

H, W = 256, 208  # small images keep the suite fast; the geometry is scale-invariant


def _render(seed: int, index: int = 0, **kwargs):
    kwargs.setdefault("height", H)
    kwargs.setdefault("width", W)
    kwargs.setdefault("markers", False)
    return render_phantom(np.random.default_rng([seed, index]), **kwargs)


def _files(root: str) -> set[str]:
    found = set()
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel not in ("labels.csv", MARKER):
                found.add(rel)
    return found


def _read_csv(root: str) -> list[dict]:
    with open(os.path.join(root, "labels.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small data set with every format, shared by the read-only tests."""
    out = str(tmp_path_factory.mktemp("synth") / "ds")
    rows = write_phantoms(out, 24, seed=5, height=H, width=W, formats=FORMATS)
    return out, rows


# --------------------------------------------------------------------------- rendering
def test_render_basic_contract():
    img, info = _render(1, label=1)
    assert img.shape == (H, W) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert set(info) == {"lesion_x", "lesion_y", "lesion_r"}
    assert 0.05 * W * 0.99 <= info["lesion_r"] <= 0.09 * W * 1.01


def test_render_is_deterministic_per_rng():
    a, ia = _render(3, 7, label=1, markers=True)
    b, ib = _render(3, 7, label=1, markers=True)
    c, _ = _render(3, 8, label=1, markers=True)
    assert np.array_equal(a, b) and ia == ib
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("laterality", ["L", "R"])
@pytest.mark.parametrize("view", ["CC", "MLO"])
def test_background_dark_and_breast_bright(laterality, view):
    for i in range(6):
        img, _ = _render(11, i, label=i % 2, laterality=laterality, view=view)
        # Nipple-side corners are background: right for L, left for R.
        cols = slice(W - 12, W) if laterality == "L" else slice(0, 12)
        assert img[:12, cols].mean() < 0.05
        assert img[-12:, cols].mean() < 0.05
        # Middle of the breast at the chest wall is tissue.
        chest = slice(0, W // 5) if laterality == "L" else slice(W - W // 5, W)
        assert img[H // 3: 2 * H // 3, chest].mean() > 0.2


def test_laterality_puts_chest_wall_on_opposite_sides():
    for i in range(6):
        left, info_l = _render(12, i, label=i % 2, laterality="L", view="CC")
        right, info_r = _render(12, i, label=i % 2, laterality="R", view="CC")
        # L: chest wall on the left edge, R: on the right edge.
        assert left[:, : W // 4].mean() > 2 * left[:, -W // 4:].mean()
        assert right[:, -W // 4:].mean() > 2 * right[:, : W // 4].mean()
        # Same random draws -> R is exactly the mirror of L, lesion included.
        assert np.array_equal(right, left[:, ::-1])
        assert info_r["lesion_x"] == pytest.approx(W - 1 - info_l["lesion_x"])
        assert info_r["lesion_y"] == pytest.approx(info_l["lesion_y"])


def test_lesion_centre_inside_breast():
    for i in range(30):
        lat = "LR"[i % 2]
        view = ("CC", "MLO")[(i // 2) % 2]
        img, info = _render(13, i, label=(i // 4) % 2, laterality=lat, view=view)
        x, y, r = info["lesion_x"], info["lesion_y"], info["lesion_r"]
        assert 0 <= x < W and 0 <= y < H
        smooth = cv2.GaussianBlur(img, (0, 0), 1.0)
        assert smooth[int(round(y)), int(round(x))] > 0.3
        # The whole lesion disc (and a margin) lies in the breast, not in the background.
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            px, py = int(round(x + 1.5 * r * dx)), int(round(y + 1.5 * r * dy))
            assert 0 <= px < W and 0 <= py < H
            assert smooth[py, px] > 0.1


def test_lesion_is_brighter_than_surroundings():
    diffs = []
    for i in range(20):
        img, info = _render(14, i, label=i % 2)
        x, y, r = int(round(info["lesion_x"])), int(round(info["lesion_y"])), info["lesion_r"]
        inner = img[y - int(r / 3): y + int(r / 3) + 1, x - int(r / 3): x + int(r / 3) + 1].mean()
        ring = np.concatenate([img[y, x + int(2.8 * r) - 2: x + int(2.8 * r) + 2],
                               img[y, x - int(2.8 * r) - 2: x - int(2.8 * r) + 2]]).mean()
        diffs.append(inner - ring)
    assert np.median(diffs) > 0.08


def test_mlo_has_bright_pectoral_corner():
    for lat in ("L", "R"):
        corner = (slice(0, H // 8), slice(0, W // 8) if lat == "L" else slice(W - W // 8, W))
        cc = np.mean([_render(15, i, label=0, laterality=lat, view="CC")[0][corner].mean() for i in range(8)])
        mlo = np.mean([_render(15, i, label=0, laterality=lat, view="MLO")[0][corner].mean() for i in range(8)])
        assert mlo > cc + 0.3
        assert mlo > 0.5


def test_radius_similar_for_both_classes():
    radii = {0: [], 1: []}
    for i in range(60):
        _, info = _render(16, i, label=i % 2)
        radii[i % 2].append(info["lesion_r"] / W)
    for lab in (0, 1):
        assert 0.05 * 0.99 <= min(radii[lab]) and max(radii[lab]) <= 0.09 * 1.01
    assert abs(np.mean(radii[0]) - np.mean(radii[1])) < 0.01


def test_spiculated_lesion_extends_beyond_the_mass():
    # Brightness on a ring at 1.6 r (outside the core) is higher for spiculated masses.
    def ring_excess(label: int) -> float:
        vals = []
        for i in range(20):
            img, info = _render(17, i, label=label, noise=0.0)
            x, y, r = info["lesion_x"], info["lesion_y"], info["lesion_r"]
            ang = np.linspace(0, 2 * np.pi, 180, endpoint=False)
            ring = [img[int(round(y + 1.6 * r * np.sin(a))), int(round(x + 1.6 * r * np.cos(a)))] for a in ang]
            far = [img[int(round(y + 2.9 * r * np.sin(a))), int(round(x + 2.9 * r * np.cos(a)))] for a in ang]
            vals.append(np.max(np.asarray(ring) - np.asarray(far)))
        return float(np.median(vals))

    assert ring_excess(1) > ring_excess(0) + 0.05


def test_contrast_and_noise_knobs():
    lo, _ = _render(18, label=1, contrast=0.5, noise=0.0)
    hi, _ = _render(18, label=1, contrast=1.5, noise=0.0)
    breast = (lo > 0.05) & (hi > 0.05)
    assert hi[breast].std() > 1.5 * lo[breast].std()

    quiet, _ = _render(18, label=1, noise=0.5)
    loud, _ = _render(18, label=1, noise=3.0)
    # Detector noise shows as pixel-to-pixel differences in the tissue.
    def roughness(img):
        d = np.diff(img[H // 3: 2 * H // 3, W // 8: W // 3], axis=1)
        return float(np.std(d))
    assert roughness(loud) > 3 * roughness(quiet)


def test_markers_sometimes_burned_in_and_independent_of_label():
    hits = {0: 0, 1: 0}
    for i in range(40):
        img, _ = _render(19, i, label=i % 2, markers=True)
        plain, _ = _render(19, i, label=i % 2, markers=False)
        if (np.abs(img - plain) > 0.3).any():
            hits[i % 2] += 1
    assert hits[0] > 3 and hits[1] > 3


def test_full_size_render():
    t0 = time.perf_counter()
    img, info = render_phantom(np.random.default_rng([0, 0]), label=1, height=3328, width=2560, view="MLO")
    elapsed = time.perf_counter() - t0
    assert img.shape == (3328, 2560) and img.dtype == np.float32
    assert img[:40, -40:].mean() < 0.05  # nipple-side corner of an L image is background
    assert 0.05 * 2560 * 0.99 <= info["lesion_r"] <= 0.09 * 2560 * 1.01
    assert elapsed < 10.0  # ~0.3 s on an idle core; loose bound for busy CI machines


def test_render_speed_small():
    rng = np.random.default_rng(0)
    render_phantom(rng, label=0)  # warm-up
    t0 = time.perf_counter()
    for i in range(10):
        render_phantom(np.random.default_rng([1, i]), label=i % 2)
    assert (time.perf_counter() - t0) / 10 < 0.2  # ~10 ms on an idle core


@pytest.mark.parametrize("kwargs", [{"label": 2}, {"label": 0, "laterality": "X"}, {"label": 0, "view": "ML"}])
def test_render_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        render_phantom(np.random.default_rng(0), **kwargs)


# --------------------------------------------------------------------------- writing
def test_write_is_deterministic_byte_for_byte(tmp_path):
    kw = dict(height=H, width=W, formats=("png8", "dcm", "png16", "dcm-rle"))
    rows_a = write_phantoms(str(tmp_path / "a"), 8, seed=2, **kw)
    rows_b = write_phantoms(str(tmp_path / "b"), 8, seed=2, **kw)
    rows_c = write_phantoms(str(tmp_path / "c"), 8, seed=3, **kw)
    assert rows_a == rows_b
    for row in rows_a:
        a = (tmp_path / "a" / row["path"]).read_bytes()
        b = (tmp_path / "b" / row["path"]).read_bytes()
        assert a == b, row["path"]
    assert (tmp_path / "a" / "labels.csv").read_bytes() == (tmp_path / "b" / "labels.csv").read_bytes()
    # A different seed gives different pixels for the same index and format (png and dcm).
    for ra, rc in zip(rows_a[:2], rows_c[:2]):
        assert ra["format"] == rc["format"]
        a = (tmp_path / "a" / ra["path"]).read_bytes()
        c = (tmp_path / "c" / rc["path"]).read_bytes()
        assert a != c


def test_labels_csv_matches_files(dataset):
    out, rows = dataset
    assert len(rows) == 24
    on_disk = _read_csv(out)
    assert [list(r) for r in on_disk][0] == list(CSV_COLUMNS)
    assert on_disk == [{k: str(v) for k, v in r.items()} for r in rows]
    assert _files(out) == {r["path"] for r in rows}
    for r in rows:
        assert os.path.isfile(os.path.join(out, r["path"]))
        assert r["path"].split("/")[0] == r["label"] and r["label"] in ("benign", "malignant")
        assert r["laterality"] in ("L", "R") and r["view"] in ("CC", "MLO")
        assert (r["height"], r["width"]) == (H, W)
        assert 0 <= r["lesion_x"] < W and 0 <= r["lesion_y"] < H and r["lesion_r"] > 0


def test_formats_round_robin_and_file_names(dataset):
    out, rows = dataset
    for i, r in enumerate(rows):
        assert r["format"] == FORMATS[i % len(FORMATS)]
        name = r["path"].split("/")[-1]
        assert name == f"005_{i:06d}." + ("png" if r["format"].startswith("png") else r["format"][:3])
        assert r["patient_id"] not in r["path"]
        assert "SYN" not in name and "P0" not in name


def test_patients_share_label_and_have_one_to_four_images(dataset):
    _, rows = dataset
    by_patient = defaultdict(list)
    for r in rows:
        by_patient[r["patient_id"]].append(r)
    assert len(by_patient) >= 24 // 4
    for pid, imgs in by_patient.items():
        assert pid.startswith("SYN005-P") and len(pid) == len("SYN005-P00000")
        assert 1 <= len(imgs) <= 4
        assert len({r["label"] for r in imgs}) == 1
        # No duplicate breast/view within a patient.
        assert len({(r["laterality"], r["view"]) for r in imgs}) == len(imgs)


def test_malignant_fraction_extremes(tmp_path):
    rows0 = write_phantoms(str(tmp_path / "z"), 6, seed=1, height=H, width=W, formats=("png8",),
                           malignant_fraction=0.0)
    rows1 = write_phantoms(str(tmp_path / "o"), 6, seed=1, height=H, width=W, formats=("png8",),
                           malignant_fraction=1.0)
    assert {r["label"] for r in rows0} == {"benign"}
    assert {r["label"] for r in rows1} == {"malignant"}


def test_unknown_format_rejected(tmp_path):
    with pytest.raises(ValueError):
        write_phantoms(str(tmp_path / "x"), 2, formats=("tiff",))


def _expected(row: dict, seed: int, index: int) -> np.ndarray:
    """Re-render the image written for ``row`` (write_phantoms uses markers=True by default)."""
    img, info = render_phantom(np.random.default_rng([seed, index]), label=int(row["label"] == "malignant"),
                               height=H, width=W, laterality=row["laterality"], view=row["view"])
    assert round(info["lesion_x"], 2) == row["lesion_x"]
    return img


def test_every_format_decodes_to_the_rendered_image(dataset):
    out, rows = dataset
    seen = set()
    for index, r in enumerate(rows):
        path = os.path.join(out, r["path"])
        img = _expected(r, 5, index)
        fmt = r["format"]
        seen.add(fmt)
        if fmt in ("png8", "png16", "jpg"):
            arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            assert arr.shape == (H, W)
            if fmt == "png8":
                assert arr.dtype == np.uint8
                assert np.array_equal(arr, np.round(img * 255).astype(np.uint8))
            elif fmt == "png16":
                assert arr.dtype == np.uint16
                assert np.array_equal(arr, np.round(img * 65535).astype(np.uint16))
            else:
                assert arr.dtype == np.uint8
                ref = np.round(img * 255).astype(np.float32)
                assert np.abs(arr.astype(np.float32) - ref).mean() < 2.0  # lossy but close
            continue

        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        assert arr.shape == (H, W) and arr.dtype == np.uint16
        assert arr.max() <= 4095
        expected = np.round(img * 4095).astype(np.uint16)
        assert ds.file_meta.MediaStorageSOPClassUID == MG_FOR_PRESENTATION
        assert ds.SOPClassUID == MG_FOR_PRESENTATION
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "MG"
        assert ds.PatientID == r["patient_id"]
        assert str(ds.PatientName) == "SYNTHETIC^PHANTOM"
        assert ds.ImageLaterality == r["laterality"] == ds.Laterality
        assert ds.ViewPosition == r["view"]
        assert (ds.Rows, ds.Columns) == (H, W)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert ds.PixelRepresentation == 0 and ds.SamplesPerPixel == 1
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
        centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
        assert centre - width / 2 <= arr.min() and arr.max() <= centre + width / 2
        if fmt == "dcm":
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert np.array_equal(arr, expected)
        elif fmt == "dcm-mono1":
            assert ds.PhotometricInterpretation == "MONOCHROME1"
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            # Stored values are the inverse of the MONOCHROME2 rendering.
            assert np.array_equal(arr, 4095 - expected)
        else:
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.file_meta.TransferSyntaxUID == RLELossless
            assert np.array_equal(arr, expected)  # lossless
    assert seen == set(FORMATS)


def test_dicom_uids_unique_and_study_shared_per_patient(dataset):
    out, rows = dataset
    sops, studies = set(), defaultdict(set)
    for r in rows:
        if r["format"].startswith("dcm"):
            ds = pydicom.dcmread(os.path.join(out, r["path"]), stop_before_pixels=True)
            sops.add(ds.SOPInstanceUID)
            studies[r["patient_id"]].add(ds.StudyInstanceUID)
    assert len(sops) == sum(r["format"].startswith("dcm") for r in rows)
    assert all(len(s) == 1 for s in studies.values())


# --------------------------------------------------------------------------- learnability
@pytest.mark.slow
def test_learnable_by_small_cnn_but_not_by_brightness():
    """A tiny CNN at 96x80 separates the classes; the image mean alone does not."""
    torch = pytest.importorskip("torch")
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from torch import nn

    torch.set_num_threads(2)
    torch.manual_seed(0)
    n_train, n_test = 300, 100
    images, labels, means = [], [], []
    for i in range(n_train + n_test):
        rng = np.random.default_rng([100, i])
        label = i % 2
        lat = "LR"[int(rng.integers(2))]
        view = ("CC", "MLO")[int(rng.integers(2))]
        img, _ = render_phantom(rng, label=label, height=256, width=208, laterality=lat, view=view)
        means.append(float(img.mean()))
        # Downsizing as the training pipeline does (area interpolation).
        images.append(cv2.resize(img, (80, 96), interpolation=cv2.INTER_AREA))
        labels.append(label)
    x = torch.tensor(np.stack(images)[:, None])
    y = torch.tensor(labels, dtype=torch.float32)
    y_test = np.asarray(labels[n_train:])

    mean_feat = np.asarray(means)[:, None]
    brightness = LogisticRegression().fit(mean_feat[:n_train], labels[:n_train])
    mean_auc = roc_auc_score(y_test, brightness.predict_proba(mean_feat[n_train:])[:, 1])
    assert mean_auc < 0.7

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 64),
                          nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 1))
    epochs, batch = 15, 32
    steps = epochs * ((n_train + batch - 1) // batch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n_train)
        for b in range(0, n_train, batch):
            idx = perm[b: b + batch]
            xb = x[idx]
            if torch.rand(1).item() < 0.5:
                xb = xb.flip(3)
            loss = nn.functional.binary_cross_entropy_with_logits(model(xb).squeeze(1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        scores = model(x[n_train:]).squeeze(1).numpy()
    auc = roc_auc_score(y_test, scores)
    print(f"CNN test AUC {auc:.3f}, mean-intensity AUC {mean_auc:.3f}, "
          f"training {time.perf_counter() - t0:.1f}s")
    assert auc >= 0.9
