"""Normalisation follows the weights (issue 27, defect 3): each backbone's weights declare their
mean/std, training applies them unless the data spec overrides them (with a warning naming
both), the checkpoint records what was applied, and every later stage applies exactly that."""
from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mammo_ray.config import PreprocessSpec, TrainConfig
from mammo_ray.data.arrays import SplitArrays
from mammo_ray.models.checkpoint import load_checkpoint, save_checkpoint
from mammo_ray.models.inference import load_for_inference, predict
from mammo_ray.models.normalization import DEFAULT, Normalization, checkpoint_normalization, resolve_normalization
from mammo_ray.models.registry import BACKBONES, IMAGENET_GRAY, LITE_GRAY, build_backbone, build_model
from mammo_ray.train.loop import fit


def test_torchvision_backbones_declare_their_weights_transforms():
    """The declared gray mean/std are the channel means of torchvision's own
    ``weights.transforms()`` for every torchvision backbone with ImageNet weights."""
    import torchvision

    checked = 0
    for spec in BACKBONES.values():
        if spec.weights_enum is None:
            continue
        t = torchvision.models.get_weight(spec.weights_enum).transforms()
        assert spec.weights_norm == pytest.approx((np.mean(t.mean), np.mean(t.std)), abs=1e-4), spec.name
        checked += 1
    assert checked == 4
    assert BACKBONES["efficientnet_lite0"].weights_norm == LITE_GRAY == (0.5, 0.5)
    assert BACKBONES["simplecnn"].weights_norm is None


@pytest.mark.parametrize("cfg,spec,want,warns", [
    # pretrained, no override: the weights' values (the issue's case: lite0 gets [-1, 1])
    (TrainConfig(backbone="efficientnet_lite0", pretrained="imagenet"), PreprocessSpec(), (0.5, 0.5, "weights"), False),
    (TrainConfig(backbone="resnet50", pretrained="imagenet"), PreprocessSpec(), (*IMAGENET_GRAY, "weights"), False),
    # a weights file of the backbone: its ImageNet normalisation
    (TrainConfig(backbone="resnet18", pretrained="none", weights="w.pt"), PreprocessSpec(), (*IMAGENET_GRAY, "weights"), False),
    # the old default std 0.25 given explicitly to lite0's weights: applied, with a warning
    (TrainConfig(backbone="efficientnet_lite0", pretrained="imagenet"), PreprocessSpec(std=0.25),
     (0.5, 0.25, "spec"), True),
    # an override equal to the weights' values is no contradiction
    (TrainConfig(backbone="efficientnet_lite0", pretrained="imagenet"), PreprocessSpec(std=0.5), (0.5, 0.5, "weights"),
     False),
    # random init: the spec's values, else the default
    (TrainConfig(backbone="simplecnn", pretrained="none"), PreprocessSpec(), (*DEFAULT, "default"), False),
    (TrainConfig(backbone="resnet18", pretrained="none"), PreprocessSpec(mean=0.4), (0.4, DEFAULT[1], "spec"), False),
])
def test_resolve_normalization(cfg, spec, want, warns, caplog):
    with caplog.at_level(logging.WARNING, logger="mammo_ray.models.normalization"):
        norm = resolve_normalization(cfg, spec)
    assert (norm.mean, norm.std) == pytest.approx(want[:2]) and norm.source == want[2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == int(warns)
    if warns:  # one line naming both values
        assert "mean 0.5, std 0.25" in warnings[0] and "(mean 0.5, std 0.5)" in warnings[0]
        assert "efficientnet_lite0" in warnings[0] and "\n" not in warnings[0]


def _arrays(n: int = 16, size: int = 32, seed: int = 0) -> SplitArrays:
    rng = np.random.default_rng(seed)
    return SplitArrays(pixels=rng.integers(0, 256, (n, size, size), dtype=np.uint8),
                       labels=np.arange(n) % 2, image_ids=[f"i{k}" for k in range(n)], patient_keys=[None] * n,
                       split="val")


def _by_hand(model: torch.nn.Module, pixels: np.ndarray, mean: float, std: float) -> np.ndarray:
    x = torch.from_numpy(np.array(pixels)).float().div(255).unsqueeze(1)
    with torch.no_grad():
        return torch.sigmoid(model.eval()((x - mean) / std).squeeze(1)).numpy()


@pytest.mark.slow  # ~7 s: a resnet18 trained for one batch on the CPU
def test_training_from_a_weights_file_records_and_inference_applies_the_weights_normalization(tmp_path):
    """resnet18 from a state dict file: training applies ImageNet's gray mean/std, best.pt records
    them, and load_for_inference + predict (evaluate's and score's path) apply them."""
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(build_backbone("resnet18").state_dict(), weights)
    cfg = TrainConfig(backbone="resnet18", pretrained="none", weights=str(weights), epochs=1, batch_size=8, max_batches=1, amp=False,
                      device="cpu")
    fit(cfg, PreprocessSpec(size=32), _arrays(), _arrays(seed=1), out=str(tmp_path / "run"))
    state = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert state["normalization"] == {"mean": IMAGENET_GRAY[0], "std": IMAGENET_GRAY[1], "source": "weights"}
    loaded = load_for_inference(str(tmp_path / "run" / "best.pt"), device="cpu")
    val = _arrays(seed=2)
    got = predict(loaded.model, val, norm=loaded.norm, device=loaded.device, amp=False, channels_last=False)
    np.testing.assert_allclose(got, _by_hand(loaded.model, val.pixels, *IMAGENET_GRAY), atol=1e-5)
    assert np.abs(got - _by_hand(loaded.model, val.pixels, *DEFAULT)).max() > 1e-4  # the check can fail


def test_pretrained_lite0_trains_with_its_own_normalization(tmp_path, caplog):
    """The issue's run: efficientnet_lite0 with ImageNet weights and a spec that sets no std
    trains with [-1, 1] (mean 0.5, std 0.5), not the old default std 0.25, and says so."""
    cfg = TrainConfig(backbone="efficientnet_lite0", pretrained="imagenet", epochs=1, batch_size=8, max_batches=1,
                      amp=False, device="cpu")
    with caplog.at_level(logging.INFO, logger="mammo_ray.models.normalization"):
        fit(cfg, PreprocessSpec(size=32), _arrays(), _arrays(seed=1), out=str(tmp_path))
    assert load_checkpoint(str(tmp_path / "best.pt"))["normalization"] == {"mean": 0.5, "std": 0.5, "source": "weights"}
    assert any("input normalisation: mean 0.5, std 0.5 (from the weights)" in r.getMessage() for r in caplog.records)


def _checkpoint(tmp_path, change=None) -> str:
    torch.manual_seed(0)
    path = tmp_path / "best.pt"
    save_checkpoint(str(path), model=build_model("simplecnn"), cfg=TrainConfig(backbone="simplecnn", pretrained="none"),
                    spec=PreprocessSpec(size=64), epoch=1, metrics={"val_threshold": 0.5},
                    norm=Normalization(0.3, 0.6, "spec"))
    if change:
        state = torch.load(path, weights_only=True)
        change(state)
        buf = io.BytesIO()
        torch.save(state, buf)
        path.write_bytes(buf.getvalue())
    return str(path)


def test_older_checkpoints_without_the_field_read_as_they_ran(tmp_path):
    def old(state):  # written before the field: the spec's mean/std were applied
        del state["normalization"]
        state["spec"].update(mean=0.5, std=0.25)

    assert checkpoint_normalization(load_checkpoint(_checkpoint(tmp_path, old))) == Normalization(0.5, 0.25, "spec")

    def bare(state):
        del state["normalization"]
        del state["spec"]["mean"], state["spec"]["std"]

    assert checkpoint_normalization(load_checkpoint(_checkpoint(tmp_path, bare))) == Normalization(*DEFAULT, "default")


@pytest.fixture
def actor_batch(tmp_path):
    from mammo_ray.config import PreprocessConfig
    from mammo_ray.data.inputs import discover
    from mammo_ray.explain.tasks import prepare_batch

    for k in range(3):
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (90, 70), dtype=np.uint8)).save(tmp_path / f"i{k}.png")
    records = discover([str(tmp_path)], labels_optional=True).records
    return prepare_batch(pd.DataFrame(records), cfg=PreprocessConfig(spec=PreprocessSpec(size=64), external=True),
                         preview_size=0)


def test_score_and_cam_actors_apply_the_recorded_normalization(tmp_path, actor_batch):
    """score and explain's actors: the checkpoint's recorded (0.3, 0.6), not its spec's or the default."""
    from mammo_ray.data.arrays import pixels_from_bytes
    from mammo_ray.explain.actors import CamActor, ScoreActor

    (tmp_path / "ck").mkdir()
    path = _checkpoint(tmp_path / "ck")
    px = pixels_from_bytes(list(actor_batch["pixels"]), actor_batch["height"], actor_batch["width"],
                           actor_batch["dtype"])
    actor = ScoreActor(path, amp=False)
    want = _by_hand(actor.loaded.model, px, 0.3, 0.6)
    np.testing.assert_allclose(actor(actor_batch)["probability"].to_numpy(), want, atol=1e-5)
    assert np.abs(want - _by_hand(actor.loaded.model, px, *DEFAULT)).max() > 1e-4
    cam = CamActor(path, method="gradcam", target_layer=None, amp=False)
    out = cam(actor_batch.assign(preview=b""))
    np.testing.assert_allclose(out["probability"].to_numpy(), want, atol=1e-5)


def test_resume_with_another_normalization_is_refused(tmp_path):
    cfg = TrainConfig(backbone="simplecnn", pretrained="none", epochs=1, batch_size=8, max_batches=1, device="cpu")
    fit(cfg, PreprocessSpec(size=32), _arrays(), _arrays(seed=1), out=str(tmp_path))
    more = TrainConfig(backbone="simplecnn", pretrained="none", epochs=2, batch_size=8, max_batches=1, device="cpu")
    with pytest.raises(ValueError, match=r"was trained with normalisation mean 0\.5, std 0\.25 \(from the default\), "
                                         r"this run would apply mean 0\.5, std 0\.5 \(from the spec\)"):
        fit(more, PreprocessSpec(size=32, std=0.5), _arrays(), _arrays(seed=1), out=str(tmp_path / "b"),
            resume=str(tmp_path / "last.pt"))


def test_evaluate_spec_check_ignores_mean_and_std(tmp_path, monkeypatch):
    """The checkpoint's recorded normalisation is applied to every set, so a set whose spec
    names another mean/std is no spec mismatch; a pixel field still is."""
    from mammo_ray.evaluate import run

    monkeypatch.setattr(run, "read_spec", lambda folder: PreprocessSpec(size=64, mean=0.2, std=0.4))
    assert run._check_spec("data", PreprocessSpec(size=64), "best.pt", allow_mismatch=False) is None
    monkeypatch.setattr(run, "read_spec", lambda folder: PreprocessSpec(size=96, std=0.4))
    with pytest.raises(ValueError, match=r"another spec than checkpoint best\.pt: size \(96, 96\) \(data\) vs "
                                         r"\[64, 64\] \(checkpoint\); re-preprocess"):
        run._check_spec("data", PreprocessSpec(size=64), "best.pt", allow_mismatch=False)
