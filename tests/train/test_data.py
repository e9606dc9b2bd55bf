"""Training data: loading checks, seeded augmentation, balanced sampling."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mammo_ray.train.data import augment_batch, augment_params, epoch_order, load_training_data


def test_load_training_data(train_data_dir):
    spec, train, val = load_training_data(str(train_data_dir))
    assert spec.size == (96, 96)
    assert train.pixels.shape[1:] == (96, 96) and train.pixels.dtype == np.uint8
    assert set(train.class_counts()) == {0, 1} and len(val) > 0
    assert len(set(train.image_ids) & set(val.image_ids)) == 0


def test_missing_train_split_and_one_class_are_refused(train_data_dir, tmp_path):
    with pytest.raises(ValueError, match="no train/ split"):
        load_training_data(str(tmp_path))
    one = tmp_path / "one"
    shutil.copytree(train_data_dir, one)
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for f in (one / "train").glob("*.parquet"):
        t = pq.read_table(f)
        pq.write_table(t.filter(pc.equal(t["label"], 0)), f)
    with pytest.raises(ValueError, match=r"one class only \(\d+ benign\)"):
        load_training_data(str(one))


def test_augmentation_is_seeded_per_image_and_epoch():
    ids = [f"img{i}" for i in range(6)]
    a = augment_params(ids, seed=1, epoch=3)
    np.testing.assert_array_equal(a, augment_params(ids, seed=1, epoch=3))
    # an image's draw does not depend on its batch-mates or position
    np.testing.assert_array_equal(a[2], augment_params(["other", ids[2]], seed=1, epoch=3)[1])
    assert not np.array_equal(a, augment_params(ids, seed=1, epoch=4))
    assert not a[:, 5].any()  # no horizontal flips unless asked (orientation is normalized)


def test_augment_batch_identity_and_flip():
    x = torch.rand(2, 1, 32, 32)
    ident = np.array([[0, 1, 0, 0, 0, 0, 0, 1]] * 2, np.float32)
    torch.testing.assert_close(augment_batch(x.clone(), ident), x, atol=1e-5, rtol=0)
    vflip = ident.copy()
    vflip[:, 4] = 1
    torch.testing.assert_close(augment_batch(x.clone(), vflip), x.flip(2), atol=1e-5, rtol=0)
    out = augment_batch(x.clone(), augment_params(["a", "b"], seed=0, epoch=1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_balanced_sampler_evens_classes():
    labels = np.array([0] * 900 + [1] * 100)
    order = epoch_order(labels, seed=0, epoch=1, balanced=True)
    frac = labels[order].mean()
    assert 0.45 < frac < 0.55
    plain = epoch_order(labels, seed=0, epoch=1, balanced=False)
    assert sorted(plain) == list(range(1000))
