"""Backbone registry: building, units, first-conv fold, ImageNet weights from the hub cache.

Downloads are tested against a loopback server in test_weights.py; here any download fails."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from mammo_ray.models import registry
from mammo_ray.models.registry import (
    BackboneSpec,
    build_model,
    expected_weights_file,
    get_backbone,
    get_submodule,
    list_backbones,
    register_backbone,
)

ALL = ["efficientnet_b0", "efficientnet_lite0", "resnet18", "resnet50", "simplecnn", "vgg19"]
# parameters outside every unit: the "head side", which always trains
HEAD_SIDE = {"resnet50": "fc", "resnet18": "fc", "vgg19": "classifier", "efficientnet_b0": "classifier",
             "efficientnet_lite0": "classifier", "simplecnn": "head"}
N_UNITS = {"resnet50": 17, "resnet18": 9, "vgg19": 16, "efficientnet_b0": 18, "efficientnet_lite0": 18, "simplecnn": 4}
TORCHVISION = {"resnet50": torchvision.models.resnet50, "resnet18": torchvision.models.resnet18,
               "vgg19": torchvision.models.vgg19, "efficientnet_b0": torchvision.models.efficientnet_b0}
WEIGHT_FILES = {"resnet50": "resnet50-11ad3fa6.pth", "resnet18": "resnet18-f37072fd.pth",
                "vgg19": "vgg19-dcbb9e9d.pth", "efficientnet_b0": "efficientnet_b0_rwightman-7f5810bc.pth"}


pytestmark = pytest.mark.usefixtures("no_downloads")


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """One random-init 1-channel model per backbone, built once for the module."""
    torch.manual_seed(0)
    return {name: build_model(name) for name in ALL}


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_list_backbones():
    assert list_backbones() == ALL


def test_unknown_backbone_names_the_allowed_ones():
    with pytest.raises(ValueError) as err:
        get_backbone("resnet5")
    assert str(err.value) == ("backbone='resnet5': use one of efficientnet_b0, efficientnet_lite0, resnet18, resnet50, "
                              "simplecnn, vgg19")
    with pytest.raises(ValueError, match="resnet5"):
        build_model("resnet5")


def test_duplicate_registration_raises(monkeypatch):
    import mammo_ray.config.training as stages
    from mammo_ray.config import TrainConfig

    monkeypatch.setattr(registry, "BACKBONES", dict(registry.BACKBONES))
    monkeypatch.setattr(stages, "_REGISTERED_BACKBONES", set(stages._REGISTERED_BACKBONES))
    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        register_backbone(get_backbone("resnet18"))
    spec = BackboneSpec(name="tiny", builder=registry.simplecnn, weights_enum=None, head="head",
                        cam_layer="features.3", units=get_backbone("simplecnn").units, first_conv="features.0.0")
    assert register_backbone(spec) is spec
    assert "tiny" in list_backbones() and get_backbone("tiny") is spec
    assert TrainConfig(backbone="tiny").backbone == "tiny"  # a registered backbone is a valid config
    with pytest.raises(ValueError, match="'tiny' is already registered"):
        register_backbone(spec)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_single_channel(models, name):
    model = models[name]
    spec = get_backbone(name)
    assert model.training
    cam_out = []
    handle = get_submodule(model, spec.cam_layer).register_forward_hook(lambda m, i, o: cam_out.append(o))
    try:
        out = model(torch.randn(2, 1, 64, 64))
    finally:
        handle.remove()
    assert out.shape == (2, 1)
    assert cam_out[0].ndim == 4  # a spatial map Grad-CAM can weight
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    model.zero_grad(set_to_none=True)

    conv = get_submodule(model, spec.first_conv)
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 1
    head = get_submodule(model, spec.head)
    assert isinstance(head, nn.Linear) and head.out_features == 1


@pytest.mark.parametrize("name", ALL)
def test_units_are_disjoint_and_cover_everything_but_the_head(models, name):
    model = models[name]
    units = get_backbone(name).units(model)
    assert len(units) == N_UNITS[name]
    assert len({u for u, _ in units}) == len(units)
    owner: dict[int, str] = {}
    for unit, module in units:
        for p in module.parameters():
            assert id(p) not in owner, f"{name}: a parameter is in both {owner[id(p)]} and {unit}"
            owner[id(p)] = unit
    outside = {n for n, p in model.named_parameters() if id(p) not in owner}
    head_side = {n for n, _ in model.named_parameters() if n.startswith(HEAD_SIDE[name] + ".")}
    assert outside == head_side and head_side
    head = get_backbone(name).head
    assert {f"{head}.weight", f"{head}.bias"} <= head_side


def test_unit_names():
    names = {n: [u for u, _ in get_backbone(n).units(build_model(n))] for n in ("resnet18", "simplecnn")}
    assert names["resnet18"] == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                                 "layer4.0", "layer4.1"]
    assert names["simplecnn"] == ["features.0", "features.1", "features.2", "features.3"]


def test_unit_names_big(models):
    vgg = [u for u, _ in get_backbone("vgg19").units(models["vgg19"])]
    assert vgg == [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)]
    eff = [u for u, _ in get_backbone("efficientnet_b0").units(models["efficientnet_b0"])]
    assert eff[:4] == ["features.0", "features.1.0", "features.2.0", "features.2.1"]
    assert eff[-2:] == ["features.7.0", "features.8"]
    r50 = [u for u, _ in get_backbone("resnet50").units(models["resnet50"])]
    assert r50[0] == "stem" and r50[-1] == "layer4.2" and r50.count("layer3.5") == 1


def test_options():
    model = build_model("simplecnn", in_chans=3, num_outputs=2)
    assert model.features[0][0].in_channels == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(ValueError, match="in_chans=2: use 1 or 3"):
        build_model("simplecnn", in_chans=2)
    with pytest.raises(ValueError, match="num_outputs=0"):
        build_model("simplecnn", num_outputs=0)


def test_get_submodule():
    model = build_model("simplecnn")
    assert get_submodule(model, "features.3") is model.features[3]
    assert get_submodule(model, "") is model
    with pytest.raises(ValueError, match=r"'features\.9'.*use one of 0, 1, 2, 3"):
        get_submodule(model, "features.9")


# ---------------------------------------------------------------------------------------
# first-conv fold


def test_fold_matches_gray_repeated_to_rgb():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=True)
    folded = registry.fold_conv_to_single_channel(conv)
    assert (folded.in_channels, folded.out_channels, folded.kernel_size, folded.stride, folded.padding) == \
        (1, 8, (7, 7), (2, 2), (3, 3))
    gray = torch.randn(2, 1, 33, 31)
    torch.testing.assert_close(folded(gray), conv(gray.repeat(1, 3, 1, 1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "efficientnet_lite0", "simplecnn"])
def test_folded_model_matches_rgb_model(name):
    torch.manual_seed(2)
    rgb = build_model(name, in_chans=3).eval()
    gray_model = copy.deepcopy(rgb)
    spec = get_backbone(name)
    registry._set_submodule(gray_model, spec.first_conv,
                            registry.fold_conv_to_single_channel(get_submodule(rgb, spec.first_conv)))
    gray = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        first_rgb = get_submodule(rgb, spec.first_conv)(gray.repeat(1, 3, 1, 1))
        first_gray = get_submodule(gray_model, spec.first_conv)(gray)
        torch.testing.assert_close(first_gray, first_rgb, atol=1e-5, rtol=0)
        torch.testing.assert_close(gray_model(gray), rgb(gray.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# weights: hub cache (downloads: test_weights.py), or an explicit file


@pytest.mark.parametrize("name", sorted(WEIGHT_FILES))
def test_expected_weights_file(hub_dir, name):
    assert expected_weights_file(name) == hub_dir / "checkpoints" / WEIGHT_FILES[name]


def test_expected_weights_file_follows_torch_home(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert expected_weights_file("resnet18") == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"


def _random_torchvision_state(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return TORCHVISION[name](weights=None).state_dict()


def _check_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert model.fc.weight.shape == (1, 512) and model.training


def test_pretrained_imagenet_loads_from_hub_cache(hub_dir):
    state = _random_torchvision_state("resnet18")
    path = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    _check_loaded(build_model("resnet18", pretrained="imagenet"), state)


@pytest.mark.parametrize("how", ["keyword", "env"])
def test_pretrained_imagenet_missing_file_offline(hub_dir, monkeypatch, how):
    expected = hub_dir / "checkpoints" / "resnet50-11ad3fa6.pth"
    if how == "env":
        monkeypatch.setenv("MAMMO_RAY_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        build_model("resnet50", pretrained="imagenet", offline=how == "keyword")
    msg = str(err.value)
    assert expected.name in msg and str(expected.parent) in msg and "\n" not in msg and "--weights PATH" in msg
    assert msg.startswith("ImageNet weights for resnet50 not found: expected resnet50-11ad3fa6.pth in ")
    assert ("--offline" if how == "keyword" else "MAMMO_RAY_OFFLINE=1") in msg


def test_weights_path(tmp_path):
    state = _random_torchvision_state("resnet18")
    path = tmp_path / "my-resnet18.pth"
    torch.save(state, path)
    _check_loaded(build_model("resnet18", weights_path=str(path)), state)
    _check_loaded(build_model("resnet18", weights_path=path), state)


def test_weights_path_errors(tmp_path, hub_dir):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("resnet18", weights_path=str(tmp_path / "nope.pth"))
    path = tmp_path / "r18.pth"
    torch.save(_random_torchvision_state("resnet18"), path)
    with pytest.raises(ValueError, match="give one of them"):
        build_model("resnet18", pretrained="imagenet", weights_path=str(path))
    with pytest.raises(ValueError, match="do not fit the 3-channel, 1000-class resnet50: first mismatch: "):
        build_model("resnet50", weights_path=str(path))


def test_bad_pretrained_values(hub_dir):
    with pytest.raises(ValueError, match="pretrained='imagenet21k': use one of None, imagenet"):
        build_model("resnet18", pretrained="imagenet21k")
    with pytest.raises(ValueError) as err:
        build_model("simplecnn", pretrained="imagenet")
    assert str(err.value) == ("backbone='simplecnn' has no ImageNet weights; use pretrained=None or one of "
                              "efficientnet_b0, efficientnet_lite0, resnet18, resnet50, vgg19")
    with pytest.raises(ValueError, match="no pretrained weights"):
        registry.simplecnn(weights="IMAGENET1K_V1")
