"""What a training rank is fed each epoch: batches of stored pixels, labels and ids.

Two feeds, one contract (:class:`Batch` iterators per rank), so the training loop is one:

- :class:`MemoryFeed`: the split decoded once into arrays (``data/arrays.py``). Each epoch's
  seeded permutation is dealt to the ranks a step at a time: step ``j`` takes the next
  ``world x batch_size`` images and gives rank ``r`` its ``r``-th slice, so two ranks at batch
  ``B/2`` see exactly the images one rank sees at batch ``B``, in the same steps.
- :class:`StreamFeed`: a Ray Data shard of the split (``ray.train.get_dataset_shard``), read
  from Parquet and decoded in the pipeline (``train/ingest.py``), shuffled per epoch by file
  order and a seeded local buffer. Memory is O(batch) whatever the split's size.

Every image is seen exactly once per epoch across ranks: never padded or repeated (as
``DistributedSampler`` does to even the ranks out), never dropped. A tail too short for
BatchNorm (fewer than 2 images on some rank) joins the step before it instead, and ranks
whose shards are uneven run zero-weight steps while the others finish (``train/loop.py``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mammo_ray.data.arrays import SplitArrays
from mammo_ray.train.data import epoch_order
from mammo_ray.train.ranks import Ranks

MIN_BATCH = 2  # BatchNorm cannot normalise one image in training mode


@dataclass
class Batch:
    """Stored pixels (n, H, W), labels (n,) and image ids of one rank's micro-batch."""

    pixels: np.ndarray
    labels: np.ndarray
    image_ids: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def as_arrays(self, split: str) -> SplitArrays:
        return SplitArrays(pixels=self.pixels, labels=self.labels, image_ids=list(self.image_ids),
                           patient_keys=[None] * len(self), split=split)


def seed_of(*parts: Any) -> int:
    """A 32-bit seed from its parts (a seed, an epoch, a rank): stable across runs and hosts."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=4).digest(), "little")


def micro_steps(rows: int, batch_size: int, world: int) -> int:
    """Micro-batches per rank per epoch: full steps of ``world x batch_size`` images, a short
    tail joining the last step when it would leave a rank fewer than 2 images."""
    full, tail = divmod(rows, batch_size * world)
    if full == 0:
        return 1
    return full + (1 if tail >= MIN_BATCH * world else 0)


def optimizer_steps(rows: int, batch_size: int, world: int, accumulate: int, max_batches: int = 0) -> int:
    """Optimizer steps per epoch (what the cyclic LR counts): ``ceil(micro_steps / accumulate)``,
    capped by ``max_batches`` when set."""
    steps = -(-micro_steps(rows, batch_size, world) // accumulate)
    return min(steps, max_batches) if max_batches else steps


def deal(order: np.ndarray, batch_size: int, ranks: Ranks) -> list[np.ndarray]:
    """This rank's micro-batches (index arrays) from one epoch's global ``order``.

    Step ``j`` holds ``order[j*W*b:(j+1)*W*b]`` split as evenly as possible across the ``W``
    ranks (``np.array_split``: sizes differ by at most one); a tail that would give a rank fewer
    than 2 images joins the previous step. Every index lands on exactly one rank, once.
    """
    step = batch_size * ranks.world
    n = micro_steps(len(order), batch_size, ranks.world)
    bounds = [j * step for j in range(n)] + [len(order)]
    return [np.array_split(order[bounds[j]:bounds[j + 1]], ranks.world)[ranks.rank] for j in range(n)]


def with_lookahead(batches: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
    """``(batch, more_follow)`` pairs; a last batch under 2 images is merged into the one before
    (a stream's shard ends where it ends: its tail may be one image)."""
    it = iter(batches)
    cur = next(it, None)
    if cur is None:
        return
    nxt = next(it, None)
    while nxt is not None:
        after = next(it, None)
        if after is None and len(nxt) < MIN_BATCH:  # nxt is the last, too short: fold it into cur
            cur = Batch(np.concatenate([cur.pixels, nxt.pixels]), np.concatenate([cur.labels, nxt.labels]),
                        [*cur.image_ids, *nxt.image_ids])
            break
        yield cur, True
        cur, nxt = nxt, after
    yield cur, False


class MemoryFeed:
    """A split held in memory, dealt to ranks by a seeded permutation per epoch."""

    kind = "memory"

    def __init__(self, arrays: SplitArrays) -> None:
        self.arrays = arrays
        self.rows = len(arrays)
        self.class_counts = np.bincount(arrays.labels[arrays.labels >= 0], minlength=2)

    def train_batches(self, *, epoch: int, seed: int, batch_size: int, ranks: Ranks,
                      balanced: bool = False) -> Iterator[Batch]:
        order = epoch_order(self.arrays.labels, seed=seed, epoch=epoch, balanced=balanced)
        for idx in deal(order, batch_size, ranks):
            yield self._take(idx)

    def val_batches(self, *, batch_size: int, ranks: Ranks) -> Iterator[Batch]:
        """This rank's contiguous share of the split (``np.array_split``), in row order."""
        idx = np.array_split(np.arange(self.rows), ranks.world)[ranks.rank]
        for i in range(0, len(idx), batch_size):
            yield self._take(idx[i:i + batch_size])

    def _take(self, idx: np.ndarray) -> Batch:
        a = self.arrays
        return Batch(a.pixels[idx], a.labels[idx], [a.image_ids[i] for i in idx])


class StreamFeed:
    """One rank's Ray Data shard of a split (a ``DataIterator``), with the split's totals.

    ``rows`` and ``class_counts`` are the whole split's (read from the Parquet footers and the
    label column on the driver): the cyclic LR's step count and the loss's class weight must
    agree on every rank, whatever its shard holds.
    """

    kind = "stream"

    def __init__(self, shard: Any, *, rows: int, class_counts: list[int] | np.ndarray,
                 shuffle_buffer: int = 0) -> None:
        self.shard = shard
        self.rows = int(rows)
        self.class_counts = np.asarray(class_counts, dtype=np.int64)
        self.shuffle_buffer = int(shuffle_buffer)

    def train_batches(self, *, epoch: int, seed: int, batch_size: int, ranks: Ranks,
                      balanced: bool = False) -> Iterator[Batch]:
        if balanced:  # refused by TrainConfig before a trial starts; a guard for library callers
            raise ValueError("imbalance='balanced_sampler' draws with replacement from an in-memory split: "
                             "use --ingest memory, or imbalance=weighted_loss with --ingest stream")
        buffer = self.shuffle_buffer or None
        yield from self._batches(batch_size, local_shuffle_buffer_size=buffer,
                                 local_shuffle_seed=seed_of(seed, epoch, ranks.rank) if buffer else None)

    def val_batches(self, *, batch_size: int, ranks: Ranks) -> Iterator[Batch]:
        yield from self._batches(batch_size)

    def _batches(self, batch_size: int, **shuffle: Any) -> Iterator[Batch]:
        for b in self.shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False,
                                         prefetch_batches=1, **shuffle):
            yield Batch(np.asarray(b["pixels"]), np.asarray(b["label"], dtype=np.int64),
                        [str(i) for i in b["image_id"]])


def as_feed(data: SplitArrays | MemoryFeed | StreamFeed) -> MemoryFeed | StreamFeed:
    """A split in memory as a :class:`MemoryFeed`; a feed as it is."""
    return MemoryFeed(data) if isinstance(data, SplitArrays) else data


def check_ranks(train: Any, val: Any, ranks: Ranks) -> None:
    """Refuse a worker count the split cannot feed: every rank trains on at least 2 images (one
    BatchNorm batch) and scores at least one validation image. ``train``/``val``: anything with
    ``rows`` (a feed, or the driver's ``ingest.SplitTotals`` before any worker starts).

    Raises:
        ValueError: one line naming the rows, the workers, and the most workers that fit.
    """
    if train.rows < MIN_BATCH * ranks.world:
        raise ValueError(f"workers={ranks.world}: the train split has {train.rows} images, fewer than "
                         f"{MIN_BATCH} per worker; use --workers {max(1, train.rows // MIN_BATCH)} or fewer")
    if val.rows < ranks.world:
        raise ValueError(f"workers={ranks.world}: the val split has {val.rows} images, which leaves a worker with no "
                         f"validation rows; use --workers {max(1, val.rows)} or fewer")
