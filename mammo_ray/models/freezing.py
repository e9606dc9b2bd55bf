"""Selective layer freezing by ratio.

A backbone is cut into ordered units (:attr:`BackboneSpec.units`: ResNet: stem and each
residual block; VGG19: each conv layer; EfficientNet-B0 and EfficientNet-Lite0: stem, each
MBConv block and the 1x1 head conv; simplecnn: its 4 blocks). A freezing ratio ``r`` in [0, 1] freezes the first
``round(r * n_units)`` units (round half up): their parameters get ``requires_grad=False``
and the whole unit runs in eval mode (BatchNorm uses and keeps its running statistics,
Dropout/StochasticDepth are off). Parameters outside every unit (the classifier head) always
train; ``r = 1.0`` is a linear probe (plus VGG19's whole 3-layer classifier).

The frozen units are always a *prefix* of the network. When the input does not require
grad, no tensor produced inside the prefix requires grad either, so autograd records
nothing there: the backward pass stops at the first trainable unit and never runs through
the frozen layers (and their parameters' ``.grad`` stays None).
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

from torch import nn

from mammo_ray.models.registry import get_backbone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreezeReport:
    """What :func:`freeze_units` did.

    Attributes:
        ratio: the freezing ratio asked for.
        n_units: units of the backbone.
        n_frozen_units: ``round(ratio * n_units)``, half up.
        frozen_units: names of the frozen units, in order.
        frozen_params: scalar parameters (numel) of the frozen units.
        trainable_params: scalar parameters left trainable (``frozen + trainable = total``).
    """

    ratio: float
    n_units: int
    n_frozen_units: int
    frozen_units: tuple[str, ...]
    frozen_params: int
    trainable_params: int


def frozen_unit_count(ratio: float, n_units: int) -> int:
    """Number of frozen units: ``floor(ratio * n_units + 0.5)`` (round half up).

    Half up rather than Python's banker's ``round`` so that e.g. r=0.5 of 17 units freezes 9
    and r=0.5 of 9 freezes 5, monotonically in ``n_units``.

    Raises:
        ValueError: ``ratio`` is not a number in [0, 1] or ``n_units`` is negative.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"freeze_ratio={ratio!r}: use a number in [0, 1]")
    if n_units < 0:
        raise ValueError(f"n_units={n_units!r}: use an integer >= 0")
    # the 1e-9 keeps decimal ratios like 0.3 * 5 = 1.4999999... on the intended side of .5
    return min(n_units, int(math.floor(ratio * n_units + 0.5 + 1e-9)))


def _frozen_prefix(model: nn.Module, backbone: str, ratio: float) -> tuple[list[tuple[str, nn.Module]], int]:
    units = get_backbone(backbone).units(model)
    return units[:frozen_unit_count(ratio, len(units))], len(units)


def freeze_units(model: nn.Module, backbone: str, ratio: float) -> FreezeReport:
    """Freeze the first ``round(ratio * n_units)`` units of ``model``; everything else trains.

    Idempotent and re-entrant: every parameter is first made trainable, so calling it again
    with another ratio gives exactly that ratio's state. Frozen units are put in eval mode;
    call :func:`train_mode` at the start of each epoch (``model.train()`` alone would put
    their BatchNorm layers back in training mode).

    Args:
        model: a model built by :func:`mammo_ray.models.registry.build_model` for ``backbone``.
        backbone: its registry name.
        ratio: freezing ratio in [0, 1].

    Returns:
        The :class:`FreezeReport`.

    Raises:
        ValueError: unknown backbone or ratio outside [0, 1].
    """
    frozen, n_units = _frozen_prefix(model, backbone, ratio)
    for p in model.parameters():
        p.requires_grad_(True)
    frozen_params = 0
    for _, unit in frozen:
        for p in unit.parameters():
            p.requires_grad_(False)
            frozen_params += p.numel()
        unit.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = FreezeReport(ratio=float(ratio), n_units=n_units, n_frozen_units=len(frozen),
                          frozen_units=tuple(name for name, _ in frozen), frozen_params=frozen_params,
                          trainable_params=trainable)
    logger.info("frozen %d/%d units of %s: %s frozen / %s trainable parameters",
                report.n_frozen_units, n_units, backbone, f"{frozen_params:,}", f"{trainable:,}")
    return report


def train_mode(model: nn.Module, backbone: str, ratio: float) -> nn.Module:
    """``model.train()``, except that the frozen units stay in eval mode.

    Call at the start of every training epoch (after a validation pass's ``model.eval()``):
    frozen BatchNorm layers then neither normalise with batch statistics nor update their
    running mean/var, and Dropout/StochasticDepth inside frozen units stay off.

    Returns:
        ``model``.

    Raises:
        ValueError: unknown backbone or ratio outside [0, 1].
    """
    frozen, _ = _frozen_prefix(model, backbone, ratio)
    model.train()
    for _, unit in frozen:
        unit.eval()
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (what goes into the optimizer), in model order."""
    return [p for p in model.parameters() if p.requires_grad]
