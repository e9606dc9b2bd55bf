"""Preprocessed pixels as arrays: the one place Parquet pixel bytes become numpy images.

A split's rows are small 8/16-bit images, so tens of thousands fit in memory and are decoded
once; training, evaluation and the archive jobs all read pixels through ``pixels_from_bytes``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from mammo_ray import io as mio
from mammo_ray import (
    resources,  # by module: tests stand in a small machine's available_memory
)
from mammo_ray.data.parquet import read_spec, read_split, split_files


def pixel_scale(dtype: np.dtype | str) -> float:
    """The stored value that means white: 255, 65535, or 1.0 for float pixels."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


def pixels_from_bytes(values: Sequence[bytes], heights: Sequence[int], widths: Sequence[int],
                      dtypes: Sequence[str]) -> np.ndarray:
    """(N, H, W) pixels from N rows' ``pixels``/``height``/``width``/``dtype`` columns.

    Raises:
        ValueError: rows of different shapes or dtypes (one array cannot hold them).
    """
    shapes = {(int(h), int(w)) for h, w in zip(heights, widths, strict=True)}
    kinds = {str(d) for d in dtypes}
    if len(shapes) > 1 or len(kinds) > 1:
        raise ValueError(f"mixed pixel dtypes {sorted(kinds)} or shapes {sorted(shapes)}")
    if not values:
        return np.zeros((0, 0, 0), np.uint8)
    (h, w), dtype = shapes.pop(), np.dtype(kinds.pop())
    return np.frombuffer(b"".join(values), dtype=dtype).reshape(len(values), h, w)


def pixels_of(row: dict) -> np.ndarray:
    """The 2-D pixel array of one row."""
    return pixels_from_bytes([row["pixels"]], [row["height"]], [row["width"]], [row["dtype"]])[0]


@dataclass
class SplitArrays:
    """One split in memory: pixels (N, H, W) as stored, labels (N,), ids."""

    pixels: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    patient_keys: list[str | None]
    split: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def scale(self) -> float:
        """The stored value that means white (255, 65535 or 1.0)."""
        return pixel_scale(self.pixels.dtype)

    def class_counts(self) -> dict[int, int]:
        values, counts = np.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def load_split(data_dir: str, split: str) -> SplitArrays:
    """Read a split's rows into arrays (ordered by image_id).

    Raises:
        ValueError: an empty split or mixed shapes; MemoryBoundError (a ValueError) when the
            split cannot fit this machine's memory (checked from the Parquet metadata first).
    """
    check_split_fits(data_dir, split)
    table = read_split(data_dir, split, columns=["image_id", "label", "patient_key", "pixels", "height", "width", "dtype"])
    if table.num_rows == 0:
        raise ValueError(f"{data_dir}/{split}: the split has no rows")
    try:
        pixels = pixels_from_bytes(table.column("pixels").to_pylist(), table.column("height").to_pylist(),
                                   table.column("width").to_pylist(), table.column("dtype").to_pylist())
    except ValueError as exc:
        raise ValueError(f"{data_dir}/{split}: {exc}") from None
    return SplitArrays(pixels=pixels, labels=np.asarray(table.column("label").to_pylist(), dtype=np.int64),
                       image_ids=table.column("image_id").to_pylist(),
                       patient_keys=table.column("patient_key").to_pylist(), split=split)


def check_split_fits(data_dir: str, split: str) -> None:
    """Refuse a split whose pixels (read, then joined: two copies) exceed the memory available."""
    spec = read_spec(data_dir)
    rows = 0
    for f in split_files(data_dir, split):
        fs, inner = mio.resolve(f)
        with fs.open_input_file(inner) as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
    need = 2 * resources.split_bytes(rows, spec.size, spec.dtype)
    resources.check_fits(need, resources.available_memory(), what=f"{data_dir}/{split}: {rows} images of {spec.size[0]}x{spec.size[1]} "
               f"{spec.dtype} held in memory", hint="train on a machine with more memory or preprocess at a smaller --size")
