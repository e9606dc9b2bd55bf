"""The ranks of a data-parallel trial, and the few collectives the training loop needs.

One process (``train --workers 1`` in-process, or any test) is :data:`SINGLE`: world size 1,
no ``torch.distributed`` group, every collective a no-op. Under Ray Train's ``TorchTrainer``
each worker has joined a process group (gloo on CPU, nccl on GPU) before the loop starts, and
:func:`current` reads rank and world size from it, so the loop never asks Ray which rank it is
and runs the same under ``torch.multiprocessing`` in the equivalence tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class Ranks:
    """This process's place in the trial: ``rank`` of ``world`` (rank 0 writes the outputs)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, history and logs each epoch."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """The element-wise sum of a short vector over all ranks (every rank gets it)."""
        if not self.distributed:
            return [float(v) for v in values]
        # nccl reduces CUDA tensors only; gloo CPU ones: the tensor lives where the model does
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (small objects: scores, ids)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank (an early stop, a refusal)."""
        return self.sum([1.0 if flag else 0.0], device)[0] > 0


SINGLE = Ranks()


def current() -> Ranks:
    """The ranks of the process group this process has joined, or :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(rank=dist.get_rank(), world=dist.get_world_size())
    return SINGLE


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (what is frozen, saved and scored)."""
    return model.module if isinstance(model, DDP) else model
