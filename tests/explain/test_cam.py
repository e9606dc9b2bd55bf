"""CAMs: every method, hooks released, values in [0, 1], original geometry, and a trained small
model's CAM pointing at phantom lesions well above chance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mammo_ray.config import PreprocessSpec, TrainConfig
from mammo_ray.data.synth import render_phantom
from mammo_ray.data.transforms import map_to_original, preprocess_image
from mammo_ray.explain.cam import CAM_METHODS, cam_extractor, score_and_cam
from mammo_ray.explain.lesions import localization
from mammo_ray.models.registry import build_model
from mammo_ray.data.arrays import SplitArrays


@pytest.mark.parametrize("method", CAM_METHODS)
def test_every_method_gives_bounded_maps_and_the_same_forward_score(method):
    torch.manual_seed(0)
    model = build_model("simplecnn").eval()
    x = torch.randn(3, 1, 64, 64)
    probs, maps = score_and_cam(model, "simplecnn", x, method=method)
    assert maps.shape == (3, 64, 64) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    with torch.no_grad():
        expected = torch.sigmoid(model(x)[:, 0]).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_hooks_released_and_mode_restored_even_on_error():
    model = build_model("resnet18").train()
    before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with cam_extractor(model, "resnet18", "gradcam"):
            assert not model.training
            raise RuntimeError("boom")
    after = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert after == before and model.training


def test_unknown_method_and_layer():
    model = build_model("simplecnn")
    with pytest.raises(ValueError, match="method='gradcam3': use one of gradcam, gradcam\\+\\+, xgradcam"):
        score_and_cam(model, "simplecnn", torch.zeros(1, 1, 32, 32), method="gradcam3")
    with pytest.raises(ValueError):
        score_and_cam(model, "simplecnn", torch.zeros(1, 1, 32, 32), target_layer="features.9")


def test_localization_scores():
    cam = np.zeros((100, 80), np.float32)
    cam[40:44, 30:34] = 1.0
    hit = localization(cam, x=32, y=42, r=5)
    assert hit["pointing_hit"] and hit["energy_inside"] == pytest.approx(1.0)
    miss = localization(cam, x=70, y=90, r=5)
    assert not miss["pointing_hit"] and miss["energy_inside"] == 0.0
    assert hit["area_fraction"] == pytest.approx(np.pi * 25 / 8000, rel=0.1)


@pytest.mark.slow
def test_trained_model_cam_points_at_phantom_lesions(tmp_path):
    """simplecnn trained on phantoms: the GradCAM peak, mapped back to the source image, falls
    inside the lesion far more often than the lesion's area fraction (chance)."""
    from mammo_ray.train.loop import fit

    spec = PreprocessSpec(size=96)
    imgs, labels, lesions, geoms = [], [], [], []
    for i in range(360):
        rng = np.random.default_rng([21, i])
        img, lesion = render_phantom(rng, label=i % 2, height=256, width=208, laterality="LR"[(i // 2) % 2],
                                     view=("CC", "MLO")[(i // 4) % 2])
        out, geom = preprocess_image((img * 65535).astype(np.uint16), spec)
        imgs.append(out), labels.append(i % 2), lesions.append(lesion), geoms.append(geom)
    arr = np.stack(imgs)
    ids = [f"p{i}" for i in range(len(arr))]

    def split(sl):
        return SplitArrays(pixels=arr[sl], labels=np.array(labels[sl]), image_ids=ids[sl],
                           patient_keys=[None] * len(ids[sl]), split="x")

    train, val = split(slice(0, 260)), split(slice(260, 300))  # 300-360: the held-out images below
    cfg = TrainConfig(backbone="simplecnn", pretrained=None, freeze_ratio=0.0, epochs=12, batch_size=32,
                      optimizer="adamw", base_lr=1e-4, max_lr=3e-3,
                      step_size_epochs=2, patience=0)
    result = fit(cfg, spec, train, val, out=str(tmp_path))
    assert result.best_metrics["val_auc"] >= 0.9
    from mammo_ray.models.checkpoint import load_checkpoint, model_from_checkpoint

    from mammo_ray.models.normalization import checkpoint_normalization

    state = load_checkpoint(str(tmp_path / "best.pt"))
    model, norm = model_from_checkpoint(state), checkpoint_normalization(state)  # what training applied
    idx = [i for i in range(300, 360) if labels[i] == 1]
    x = torch.from_numpy(arr[idx]).unsqueeze(1).float().div(255).sub(norm.mean).div(norm.std)
    _, maps = score_and_cam(model, "simplecnn", x)
    scores = []
    for m, i in zip(maps, idx):
        back = map_to_original(m, geoms[i])
        assert back.shape == (256, 208) and back.min() >= 0 and back.max() <= 1
        les = lesions[i]
        scores.append(localization(back, x=les["lesion_x"], y=les["lesion_y"], r=les["lesion_r"]))
    hit_rate = np.mean([s["pointing_hit"] for s in scores])
    chance = np.mean([s["area_fraction"] for s in scores])
    print(f"pointing game {hit_rate:.2f} vs chance {chance:.3f}")
    assert hit_rate >= max(0.3, 5 * chance), (hit_rate, chance)


@pytest.mark.parametrize("backbone", ["simplecnn", "resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
def test_backward_stopped_at_target_layer_gives_the_same_maps(backbone, method):
    """The fast path (no graph before the target layer, no weight gradients) gives the maps and
    scores of pytorch-grad-cam's plain use, leaves no .grad behind and restores requires_grad."""
    torch.manual_seed(1)
    model = build_model(backbone).eval()
    x = torch.randn(2, 1, 64, 64)
    p_plain, m_plain = score_and_cam(model, backbone, x, method=method, stop_at_target=False)
    model.zero_grad(set_to_none=True)
    p_fast, m_fast = score_and_cam(model, backbone, x, method=method, stop_at_target=True)
    np.testing.assert_allclose(p_fast, p_plain, atol=1e-6)
    np.testing.assert_allclose(m_fast, m_plain, atol=1e-5)
    assert m_fast.max() > 0
    assert all(p.grad is None for p in model.parameters())  # backward never reached a weight
    assert all(p.requires_grad for p in model.parameters())


def test_top_energy_fraction():
    from mammo_ray.explain.lesions import top_energy_fraction

    flat = np.ones((20, 20), np.float32)
    assert top_energy_fraction(flat) == pytest.approx(0.05)
    spot = np.zeros((20, 20), np.float32)
    spot[3, 4] = 0.7
    assert top_energy_fraction(spot) == 1.0
    assert top_energy_fraction(np.zeros((5, 5), np.float32)) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_energy_fraction_of_a_16_bit_map_counts_what_sorting_gives(seed):
    """The written heatmap's (uint16) figure, by histogram, equals the sort-based one on the same
    values, ties at the k-th level included; flat, single-spot and empty maps as above."""
    from mammo_ray.explain.lesions import top_energy_fraction

    rng = np.random.default_rng(seed)
    smooth = np.clip(rng.normal(0.3, 0.2, (37, 53)), 0, 1)
    tied = rng.integers(0, 4, (40, 40)) * 20000  # four levels: the k-th pixel sits inside a tie
    for values in (np.round(smooth * 65535), tied):
        u16 = values.astype(np.uint16)
        assert top_energy_fraction(u16) == pytest.approx(top_energy_fraction(u16.astype(np.float64)), abs=1e-12)
        assert top_energy_fraction(u16, 0.2) == pytest.approx(top_energy_fraction(u16.astype(np.float64), 0.2),
                                                              abs=1e-12)
    assert top_energy_fraction(np.full((20, 20), 65535, np.uint16)) == pytest.approx(0.05)
    spot = np.zeros((20, 20), np.uint16)
    spot[3, 4] = 40000
    assert top_energy_fraction(spot) == 1.0 and top_energy_fraction(np.zeros((5, 5), np.uint16)) == 0.0


@pytest.mark.parametrize("backbone,layer", [("simplecnn", "features.3.1"), ("resnet18", "layer4.1.bn2")])
def test_a_target_layer_followed_by_an_in_place_op(backbone, layer):
    """simplecnn's BN is followed by ReLU(inplace=True), resnet's last bn2 by `out += identity`:
    the fast path still runs and matches pytorch-grad-cam's plain use."""
    torch.manual_seed(2)
    model = build_model(backbone).eval()
    x = torch.randn(2, 1, 64, 64)
    _, plain = score_and_cam(model, backbone, x, target_layer=layer, stop_at_target=False)
    _, fast = score_and_cam(model, backbone, x, target_layer=layer)
    np.testing.assert_allclose(fast, plain, atol=1e-5)
