"""Batched prediction and its test-time augmentation (``predict(tta=...)``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mammo_ray.config import TTA_MODES
from mammo_ray.data.arrays import SplitArrays
from mammo_ray.models.inference import TTA_VIEWS, predict
from mammo_ray.models.normalization import Normalization


def _arrays(pixels: np.ndarray) -> SplitArrays:
    n = len(pixels)
    return SplitArrays(pixels=pixels, labels=np.zeros(n, np.int64), image_ids=[f"i{k}" for k in range(n)],
                       patient_keys=[None] * n, split="test")


@pytest.fixture
def model() -> torch.nn.Module:
    """A small network that is not flip-invariant (a linear layer over every position)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 12 * 10, 1))


def test_tta_is_the_mean_over_the_flipped_views(model):
    pixels = np.random.default_rng(1).integers(0, 256, (5, 12, 10), dtype=np.uint8)
    kw = dict(norm=Normalization(0.5, 0.25), device=torch.device("cpu"), batch_size=2)

    def plain(p):
        return predict(model, _arrays(np.ascontiguousarray(p)), **kw)

    none = plain(pixels)
    v, h, hv = plain(pixels[:, ::-1, :]), plain(pixels[:, :, ::-1]), plain(pixels[:, ::-1, ::-1])
    assert not np.allclose(none, v, atol=1e-4)  # the model sees the flip, so the check below can fail
    expected = {"none": none, "vflip": (none + v) / 2, "hflip": (none + h) / 2, "flips": (none + v + h + hv) / 4}
    assert set(expected) == set(TTA_MODES) == set(TTA_VIEWS)
    model.train()
    for mode, want in expected.items():
        got = predict(model, _arrays(pixels), tta=mode, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert model.training  # the caller's mode is restored


def test_unknown_tta_is_refused_in_one_line(model):
    with pytest.raises(ValueError, match=r"^tta='rot90': use one of none, vflip, hflip, flips$"):
        predict(model, _arrays(np.zeros((1, 12, 10), np.uint8)), norm=Normalization(0.5, 0.25),
                device=torch.device("cpu"), tta="rot90")
    from mammo_ray.config import EvaluateConfig

    with pytest.raises(ValueError, match="tta='rot90'.*none, vflip, hflip, flips"):
        EvaluateConfig(tta="rot90")
