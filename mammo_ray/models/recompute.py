"""Activation checkpointing: a unit's activations recomputed in the backward pass, not kept.

At high resolution the activations, not the weights, fill a GPU: resnet50 at 1024 px keeps
about 1.9 GB of activations per image for the backward pass. Checkpointing every trainable
unit (a ResNet block, a VGG conv layer, an MBConv block: :attr:`BackboneSpec.units`) keeps only
each unit's input and recomputes the rest when its gradient is needed: about half the memory
for about a third more compute (docs/benchmarks.md), so a batch that would not fit does.

``torch.utils.checkpoint`` runs a unit's forward twice; BatchNorm in training mode would then
update its running statistics (and count the batch) twice per step. The recomputation runs
with every BatchNorm's momentum at 0 and its batch count restored (``context_fn``), so the
statistics move once, as without checkpointing, and the weights after a step are the same.

Frozen units (the prefix a freezing ratio freezes) record no graph and are left alone.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from mammo_ray.models.registry import get_backbone

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def _still_statistics(unit: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``unit`` normalise as usual but leave their running statistics."""
    norms = [m for m in unit.modules() if isinstance(m, _BATCHNORMS) and m.momentum is not None]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:  # the recomputation counted the batch a second time
                m.num_batches_tracked.copy_(tracked)


def _checkpointed(unit: nn.Module, forward, *args, **kwargs):
    if not unit.training or not any(p.requires_grad for p in unit.parameters()):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _still_statistics(unit)), **kwargs)


def checkpoint_units(model: nn.Module, backbone: str) -> int:
    """Checkpoint the activations of every unit of ``model`` (its ``forward`` wrapped in place;
    parameter names and the state dict are unchanged). Units without trainable parameters,
    and any unit in eval mode, run as before. Returns the number of units wrapped."""
    units = get_backbone(backbone).units(model)
    for _, unit in units:
        if not getattr(unit, "_mammo_ray_checkpointed", False):
            unit.forward = functools.partial(_checkpointed, unit, unit.forward)
            unit._mammo_ray_checkpointed = True
    return len(units)
