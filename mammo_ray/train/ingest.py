"""How a run's splits reach its workers: in memory, or streamed by Ray Data.

``memory`` decodes each split once into arrays (``data/arrays.py``); a data-parallel run puts
them in Ray's object store once and every worker maps them without a copy. ``stream`` reads
the split's Parquet shards with Ray Data, decodes the pixels in the pipeline (Ray Data's
tasks, not the training worker) and hands each worker its shard through Ray Train
(``datasets=`` and ``get_dataset_shard``): a worker holds a few batches, whatever the split's
size. ``auto`` keeps the in-memory path while the splits fit the memory budget.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mammo_ray import io as mio
from mammo_ray import resources
from mammo_ray.config import TRAIN, VAL, PreprocessSpec, TrainConfig
from mammo_ray.data.arrays import pixels_from_bytes
from mammo_ray.data.parquet import read_spec, split_files

logger = logging.getLogger(__name__)

#: the share of the memory available that ``auto`` lets in-memory splits take: the object
#: store, the workers' models and batches, and Ray itself need the rest
MEMORY_BUDGET_SHARE = 0.25
COLUMNS = ["image_id", "label", "pixels", "height", "width", "dtype"]


@dataclass(frozen=True)
class SplitTotals:
    """A split's rows and (benign, malignant) counts, read from Parquet footers and one column."""

    rows: int
    class_counts: tuple[int, int]


def split_totals(data_dir: str, split: str) -> SplitTotals:
    """Rows and class counts of a split without reading its pixels (the label column only)."""
    rows, counts = 0, np.zeros(2, np.int64)
    for f in split_files(data_dir, split):
        fs, inner = mio.resolve(f)
        with fs.open_input_file(inner) as fh:
            table = pq.ParquetFile(fh).read(columns=["label"])
        labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
        rows += len(labels)
        counts += np.bincount(labels[labels >= 0], minlength=2)[:2]
    return SplitTotals(rows=rows, class_counts=(int(counts[0]), int(counts[1])))


def memory_need(spec: PreprocessSpec, totals: dict[str, SplitTotals]) -> int:
    """Bytes the in-memory ingest holds: every split's pixels, read then joined (two copies)."""
    return 2 * sum(resources.split_bytes(t.rows, spec.size, spec.dtype) for t in totals.values())


def choose_ingest(cfg: TrainConfig, data_dir: str, spec: PreprocessSpec, totals: dict[str, SplitTotals], *,
                  available: int | None = None) -> str:
    """``memory`` or ``stream`` for ``cfg.ingest``.

    ``auto``: memory where the splits take at most :data:`MEMORY_BUDGET_SHARE` of the memory
    available, stream otherwise. ``memory`` is refused up front when the splits would not fit.

    Raises:
        MemoryBoundError: ``ingest=memory`` on splits larger than the memory available (one
            line with the computed need).
    """
    have = resources.available_memory() if available is None else available
    need = memory_need(spec, totals)
    rows = sum(t.rows for t in totals.values())
    if cfg.ingest == "memory":
        resources.check_fits(need, have, what=f"--ingest memory: {data_dir}: {rows} images of {spec.size[0]}x"
                             f"{spec.size[1]} {spec.dtype} held in memory",
                             hint="use --ingest stream (Ray Data streams the split, O(batch) memory) or auto")
        return "memory"
    if cfg.ingest == "stream":
        return "stream"
    chosen = "memory" if need <= MEMORY_BUDGET_SHARE * have else "stream"
    # DEBUG: the run's own line says which ingest it uses (train's "train on Ray Train", the sweep's)
    logger.debug("ingest auto: %s (the splits need %s in memory; budget %s)", chosen, resources.fmt_bytes(need),
                resources.fmt_bytes(MEMORY_BUDGET_SHARE * have))
    return chosen


def decode_batch(batch: pa.Table) -> dict[str, Any]:
    """Parquet rows -> (n, H, W) pixel arrays, in Ray Data's tasks (the worker gets arrays)."""
    pixels = pixels_from_bytes(batch.column("pixels").to_pylist(), batch.column("height").to_pylist(),
                               batch.column("width").to_pylist(), batch.column("dtype").to_pylist())
    return {"image_id": np.asarray(batch.column("image_id").to_pylist(), dtype=object),
            "label": np.asarray(batch.column("label").to_pylist(), dtype=np.int64),
            "pixels": pixels}


def split_dataset(data_dir: str, split: str, *, seed: int, shuffle: str = "local", block_rows: int = 32) -> Any:
    """A Ray Dataset of one split: Parquet read (file order shuffled per epoch for ``train``,
    seeded), pixels decoded in the pipeline, and for ``shuffle='full'`` a global random shuffle.

    Blocks of ``block_rows`` rows (a training batch): Ray Train's split hands whole blocks to
    workers, so a split read as one block (a few small files are read by one task) would
    reach one worker only.
    """
    import ray
    from ray.data import FileShuffleConfig

    files = split_files(data_dir, split)
    fs, _ = mio.resolve(files[0])
    spec = read_spec(data_dir)
    # FileShuffleConfig reseeds after each execution by default: a new file order every epoch,
    # the same sequence of orders for the same seed
    order = FileShuffleConfig(seed=seed) if split == TRAIN else None
    ds = ray.data.read_parquet([mio.resolve(f)[1] for f in files], filesystem=fs, columns=COLUMNS, shuffle=order)
    ds.context.target_max_block_size = max(1, block_rows) * resources.image_bytes(spec.size, spec.dtype)
    ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=max(1, block_rows), zero_copy_batch=True)
    if split == TRAIN and shuffle == "full":
        ds = ds.random_shuffle()
    return ds


def read_totals(data_dir: str) -> tuple[PreprocessSpec, dict[str, SplitTotals]]:
    """The spec and the train/val totals of a preprocessed folder (footers and labels only).

    Raises:
        ValueError: no ``train/`` or ``val/`` split (the message ``load_training_data`` gives).
    """
    for split in (TRAIN, VAL):
        if not split_files(data_dir, split):
            raise ValueError(f"{data_dir}: no {split}/ split with Parquet files (run `mammo-ray preprocess` without "
                             "--external)")
    return read_spec(data_dir), {s: split_totals(data_dir, s) for s in (TRAIN, VAL)}


def probe_rows(launch: Any, rows: int = 96) -> Any:
    """Training rows for a plan's probe: the in-memory split, or (streamed) the first ``rows``
    of the split's first file, so a split too large for memory is not read to time two steps."""
    import ray

    from mammo_ray.data.arrays import SplitArrays

    if launch.arrays is not None:
        return ray.get(launch.arrays)[0]
    fs, inner = mio.resolve(split_files(launch.data_dir, TRAIN)[0])
    with fs.open_input_file(inner) as fh:
        table = pq.ParquetFile(fh).read_row_group(0, columns=COLUMNS).slice(0, rows)
    batch = decode_batch(table)
    return SplitArrays(pixels=batch["pixels"], labels=batch["label"], image_ids=list(batch["image_id"]),
                       patient_keys=[None] * table.num_rows, split=TRAIN)
