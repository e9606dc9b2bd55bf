"""Selective layer freezing: which parameters freeze for a ratio, and that they stay put."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from mammo_ray.models.freezing import (
    FreezeReport,
    freeze_units,
    frozen_unit_count,
    train_mode,
    trainable_parameters,
)
from mammo_ray.models.registry import build_model, get_backbone, get_submodule

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
VGG19_CONVS = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)


def _documented_units(name: str) -> list[tuple[str, tuple[str, ...]]]:
    """The DESIGN rule, written independently of the registry: (unit, parameter-name prefixes)."""
    if name in ("resnet18", "resnet50"):
        blocks = (2, 2, 2, 2) if name == "resnet18" else (3, 4, 6, 3)
        units = [("stem", ("conv1.", "bn1."))]
        units += [(f"layer{i + 1}.{j}", (f"layer{i + 1}.{j}.",)) for i, n in enumerate(blocks) for j in range(n)]
        return units
    if name == "vgg19":
        return [(f"features.{i}", (f"features.{i}.",)) for i in VGG19_CONVS]
    if name == "efficientnet_b0":
        blocks = (1, 2, 2, 3, 3, 4, 1)  # MBConv blocks of stages features.1 .. features.7
        units = [("features.0", ("features.0.",))]
        units += [(f"features.{s}.{b}", (f"features.{s}.{b}.",))
                  for s, n in enumerate(blocks, start=1) for b in range(n)]
        return units + [("features.8", ("features.8.",))]
    assert name == "simplecnn"
    return [(f"features.{i}", (f"features.{i}.",)) for i in range(4)]


HEAD_SIDE = {"resnet50": "fc.", "resnet18": "fc.", "vgg19": "classifier.", "efficientnet_b0": "classifier.",
             "simplecnn": "head."}

# (backbone, ratio, last frozen unit, first trainable unit): the round-half-up rule by hand
TABLE = [
    ("resnet50", 0.25, "layer1.2", "layer2.0"),   # round(4.25) = 4
    ("resnet50", 0.5, "layer3.0", "layer3.1"),    # round(8.5) = 9
    ("resnet50", 0.75, "layer3.4", "layer3.5"),   # round(12.75) = 13
    ("resnet50", 1.0, "layer4.2", None),
    ("resnet18", 0.25, "layer1.0", "layer1.1"),   # round(2.25) = 2
    ("resnet18", 0.5, "layer2.1", "layer3.0"),    # round(4.5) = 5
    ("resnet18", 0.75, "layer3.1", "layer4.0"),   # round(6.75) = 7
    ("vgg19", 0.25, "features.7", "features.10"),
    ("vgg19", 0.5, "features.16", "features.19"),
    ("vgg19", 0.75, "features.25", "features.28"),
    ("vgg19", 1.0, "features.34", None),
    ("efficientnet_b0", 0.25, "features.3.0", "features.3.1"),  # round(4.5) = 5
    ("efficientnet_b0", 0.5, "features.4.2", "features.5.0"),   # 9
    ("efficientnet_b0", 0.75, "features.6.1", "features.6.2"),  # round(13.5) = 14
    ("efficientnet_b0", 1.0, "features.8", None),
    ("simplecnn", 0.25, "features.0", "features.1"),
    ("simplecnn", 0.75, "features.2", "features.3"),
]
for _name in HEAD_SIDE:
    TABLE.append((_name, 0.0, None, "stem" if _name.startswith("resnet") else "features.0"))


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """One model per backbone for the module: freeze_units resets the state on every call."""
    torch.manual_seed(0)
    return {name: build_model(name) for name in HEAD_SIDE}


@pytest.mark.parametrize(("ratio", "n", "k"), [
    (0.0, 17, 0), (0.5, 17, 9), (0.5, 9, 5), (0.25, 18, 5), (0.75, 16, 12), (0.3, 5, 2), (1.0, 17, 17),
    (0.1, 4, 0), (1, 4, 4), (0.5, 0, 0),
])
def test_frozen_unit_count(ratio, n, k):
    assert frozen_unit_count(ratio, n) == k


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan, "0.5", True])
def test_frozen_unit_count_rejects(bad):
    with pytest.raises(ValueError, match=r"use a number in \[0, 1\]"):
        frozen_unit_count(bad, 10)
    if bad == 1.5:
        with pytest.raises(ValueError) as err:
            frozen_unit_count(bad, 10)
        assert str(err.value) == "freeze_ratio=1.5: use a number in [0, 1]"


@pytest.mark.parametrize("name", sorted(HEAD_SIDE))
@pytest.mark.parametrize("ratio", RATIOS)
def test_frozen_parameters_follow_the_documented_units(models, name, ratio):
    model = models[name]
    units = _documented_units(name)
    k = math.floor(ratio * len(units) + 0.5)
    report = freeze_units(model, name, ratio)

    prefixes = tuple(p for _, ps in units[:k] for p in ps)
    all_names = [n for n, _ in model.named_parameters()]
    expected_frozen = {n for n in all_names if n.startswith(prefixes)}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == expected_frozen
    assert not any(n.startswith(HEAD_SIDE[name]) for n in frozen)  # the head always trains
    if ratio == 0.0:
        assert not frozen
    if ratio == 1.0:  # linear probe: only the head side trains
        assert {n for n in all_names if n not in frozen} == {n for n in all_names if n.startswith(HEAD_SIDE[name])}

    total = sum(p.numel() for p in model.parameters())
    assert report == FreezeReport(
        ratio=ratio, n_units=len(units), n_frozen_units=k, frozen_units=tuple(u for u, _ in units[:k]),
        frozen_params=sum(p.numel() for n, p in model.named_parameters() if n in frozen),
        trainable_params=total - report.frozen_params)
    assert report.frozen_params + report.trainable_params == total
    assert sum(p.numel() for p in trainable_parameters(model)) == report.trainable_params


@pytest.mark.parametrize(("name", "ratio", "last_frozen", "first_trainable"), TABLE)
def test_table(models, name, ratio, last_frozen, first_trainable):
    report = freeze_units(models[name], name, ratio)
    assert (report.frozen_units[-1] if report.frozen_units else None) == last_frozen
    names = [u for u, _ in _documented_units(name)]
    assert (names[report.n_frozen_units] if report.n_frozen_units < len(names) else None) == first_trainable


def test_train_mode_keeps_frozen_units_in_eval(models):
    model = models["efficientnet_b0"]
    report = freeze_units(model, "efficientnet_b0", 0.5)
    model.eval()  # e.g. after a validation pass
    assert train_mode(model, "efficientnet_b0", 0.5) is model
    frozen = set(report.frozen_units)
    for unit, module in get_backbone("efficientnet_b0").units(model):
        modes = {m.training for m in module.modules()}  # BatchNorm, StochasticDepth, ...
        assert modes == ({False} if unit in frozen else {True}), unit
    assert model.training and get_submodule(model, "classifier").training


def test_freeze_units_rejects(models):
    with pytest.raises(ValueError, match=r"freeze_ratio=1.5: use a number in \[0, 1\]"):
        freeze_units(models["simplecnn"], "simplecnn", 1.5)
    with pytest.raises(ValueError, match="backbone='resnet5': use one of"):
        freeze_units(models["simplecnn"], "resnet5", 0.5)


def test_freeze_units_logs_the_report(models, caplog):
    with caplog.at_level(logging.INFO, logger="mammo_ray.models.freezing"):
        report = freeze_units(models["resnet50"], "resnet50", 0.5)
    assert (f"frozen 9/17 units of resnet50: {report.frozen_params:,} frozen / "
            f"{report.trainable_params:,} trainable parameters") in caplog.text


def _bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in module.named_buffers()
            if n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def test_one_sgd_step_moves_only_trainable_units():
    torch.manual_seed(4)
    model = build_model("resnet18")
    report = freeze_units(model, "resnet18", 0.5)
    assert report.frozen_units == ("stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1")
    units = get_backbone("resnet18").units(model)
    frozen_units = [m for u, m in units if u in report.frozen_units]
    trainable_units = [m for u, m in units if u not in report.frozen_units]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bn_before = [(_bn_buffers(m), m) for m in frozen_units + trainable_units]

    train_mode(model, "resnet18", 0.5)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    x, y = torch.randn(4, 1, 64, 64), torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"trainable {n} did not move"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} moved"
            assert p.grad is None, f"frozen {n} got a gradient"
    for i, (buffers, module) in enumerate(bn_before):
        now = _bn_buffers(module)
        assert buffers, "every resnet unit has BatchNorm"
        for n, b in buffers.items():
            if i < len(frozen_units):
                assert torch.equal(now[n], b), f"frozen BatchNorm buffer {n} changed"
            else:
                assert not torch.equal(now[n], b), f"trainable BatchNorm buffer {n} did not update"


@pytest.mark.parametrize(("name", "ratio"), [("resnet18", 0.5), ("efficientnet_b0", 0.75), ("simplecnn", 1.0)])
def test_backward_never_enters_frozen_units(name, ratio):
    torch.manual_seed(5)
    model = build_model(name)
    report = freeze_units(model, name, ratio)
    train_mode(model, name, ratio)
    needs_grad: dict[str, bool] = {}
    hooks = []
    for unit, module in get_backbone(name).units(model):
        # the resnet stem is a ModuleList view (never called): watch its last module, bn1
        watched = module[-1] if isinstance(module, nn.ModuleList) else module
        hooks.append(watched.register_forward_hook(
            lambda m, i, out, unit=unit: needs_grad.__setitem__(unit, out.requires_grad)))
    out = model(torch.randn(2, 1, 64, 64))
    for h in hooks:
        h.remove()
    # an output that does not require grad has no autograd node: backward cannot reach it
    assert [u for u, g in needs_grad.items() if not g] == list(report.frozen_units)
    out.sum().backward()
    for unit, module in get_backbone(name).units(model):
        grads = [p.grad is None for p in module.parameters()]
        assert all(grads) if unit in report.frozen_units else not any(grads), unit


def test_refreezing_with_another_ratio_resets(models):
    model = models["resnet18"]
    freeze_units(model, "resnet18", 1.0)
    report = freeze_units(model, "resnet18", 0.25)
    assert report.frozen_units == ("stem", "layer1.0")
    assert all(p.requires_grad for p in model.layer4.parameters())
