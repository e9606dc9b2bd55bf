"""The ranks of a data-parallel trial, and the few collectives the training loop needs.

One process (``train --workers 1`` in-process, or any test) is :data:`SINGLE`: world size 1,
no ``torch.distributed`` group, every collective a no-op. Under Ray Train's ``TorchTrainer``
each worker has joined a gloo process group before the loop starts (the loop's own small
collectives run on the CPU), and :func:`current` reads rank and world size from it, so the loop
never asks Ray which rank it is and runs the same under ``torch.multiprocessing`` in the
equivalence tests. On GPUs, DDP's gradient all-reduce gets an nccl group of its own
(:func:`gradient_group`).
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

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of a short vector over all ranks (every rank gets it).

        On the CPU, through the default (gloo) group: a few numbers a micro-batch, whatever
        device the model is on (nccl would need them on the GPU and a sync with it)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (small objects: scores, ids)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


SINGLE = Ranks()


def current() -> Ranks:
    """The ranks of the process group this process has joined, or :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(rank=dist.get_rank(), world=dist.get_world_size())
    return SINGLE


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (what is frozen, saved and scored)."""
    return model.module if isinstance(model, DDP) else model


def gradient_group(ranks: Ranks, device: torch.device) -> Any:
    """The process group DDP all-reduces gradients in: a new nccl group on CUDA, else the
    default (gloo) one (None).

    Why not nccl as ``TorchTrainer``'s backend, as Ray chooses when GPUs are requested: nccl
    cannot even be constructed in a process without CUDA, and a worker given a GPU whose CUDA
    does not work (or a logical GPU, as the scheduling tests use) falls back to the CPU
    (``models.inference.resolve_device``); the default group stays gloo, and the gradients take
    nccl exactly where the model is on a GPU. Every rank calls this (a collective).
    """
    if not ranks.distributed or device.type != "cuda":
        return None
    return dist.new_group(backend="nccl")
