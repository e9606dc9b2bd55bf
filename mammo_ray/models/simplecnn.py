"""SimpleCNN: a toy backbone for fast CPU tests and demos (no pretrained weights)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SimpleCNN(nn.Module):
    """Four conv3x3-BN-ReLU-maxpool blocks (16/32/64/128 channels), global average pool, Linear.

    ~100k parameters: fast enough for CPU tests and demos, not a serious classifier.
    """

    def __init__(self, *, in_chans: int = 3, num_classes: int = 1000,
                 channels: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        prev = in_chans
        for ch in channels:
            blocks.append(nn.Sequential(nn.Conv2d(prev, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch),
                                        nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            prev = ch
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def simplecnn(*, weights: Any = None, **kwargs: Any) -> SimpleCNN:
    """torchvision-style builder of :class:`SimpleCNN` (3 channels, 1000 classes by default).

    Raises:
        ValueError: ``weights`` is not None (there are no pretrained weights).
    """
    if weights is not None:
        raise ValueError(f"simplecnn weights={weights!r}: simplecnn has no pretrained weights; use None")
    return SimpleCNN(**kwargs)
