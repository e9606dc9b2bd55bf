"""Memory bounds: what a job's pieces need, checked against what the machine or cluster has
before any work starts.

An unbounded size used to reach Ray's memory monitor instead: ``--size 100000`` had workers
OOM-killed and retried forever while the host sat at 95% memory. Sizes now have hard caps
in the configs, and the memory a task or a loaded split needs is estimated here and refused
with the computed figure when no node can hold it. No Ray import at module level.
"""
from __future__ import annotations

import logging
import os

import numpy as np

logger = logging.getLogger(__name__)

#: Peak bytes per *source* pixel while one image is read, decoded, cropped, resized and
#: equalized: 13 B/px measured on a 4432x2864 RLE DICOM (file bytes, uint16 pixels, LUT
#: output, mask, resize buffers), rounded up.
BYTES_PER_SOURCE_PIXEL = 16
#: Copies of a batch's output pixels alive at once in a preprocessing task (rows, the Arrow
#: table, the Parquet buffer).
OUTPUT_COPIES = 3
#: Interpreter, numpy/OpenCV/pyarrow and Ray's worker overhead per task.
TASK_OVERHEAD = 256 * 2**20
#: Source pixels a preprocessing task reserves with Ray: the largest mammography detectors
#: (5928x4728, 28 Mpx). A larger source only has to fit a node (checked against max_pixels).
RESERVED_SOURCE_PIXELS = 30_000_000
#: A task that fails (a worker killed for memory included) is retried this often, then its
#: images become errors.csv lines: never an endless retry loop.
TASK_RETRIES = 3


class MemoryBoundError(ValueError):
    """The job, as configured, cannot fit the memory there is."""


def fmt_bytes(n: float) -> str:
    """``1.5 GB`` style (binary units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def available_memory() -> int:
    """Memory available to new allocations on this machine (``MemAvailable``), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def largest_node_memory() -> int:
    """The largest ``memory`` resource of any alive Ray node (what Ray lets one node's tasks
    use); this machine's available memory when Ray is not running."""
    import ray

    if not ray.is_initialized():
        return available_memory()
    sizes = [int(n.get("Resources", {}).get("memory", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(sizes) if sizes and max(sizes) > 0 else available_memory()


def image_bytes(size: tuple[int, int], dtype: str) -> int:
    """Bytes of one stored output image."""
    return int(size[0]) * int(size[1]) * np.dtype(dtype).itemsize


def preprocess_task_bytes(*, size: tuple[int, int], dtype: str, batch_size: int, max_pixels: int,
                          keep_sources: bool = False) -> int:
    """Peak memory of one preprocessing task: one source image being worked on, plus the
    batch's outputs (and, for explain, the batch's source images kept for previews)."""
    batch = batch_size * image_bytes(size, dtype) * OUTPUT_COPIES
    sources = batch_size * max_pixels * 2 if keep_sources else 0
    return TASK_OVERHEAD + BYTES_PER_SOURCE_PIXEL * max_pixels + batch + sources


def check_fits(need: int, have: int, *, what: str, hint: str) -> None:
    """Refuse ``what`` when it needs more than 90% of ``have``.

    Raises:
        MemoryBoundError: one line with the computed need, what there is, and the way out.
    """
    if need > 0.9 * have:
        raise MemoryBoundError(f"{what} needs about {fmt_bytes(need)} but {fmt_bytes(have)} is available: {hint}")


def split_bytes(rows: int, size: tuple[int, int], dtype: str) -> int:
    """Memory of a split held in memory for training (stored pixels; batches are converted
    to float one at a time)."""
    return rows * image_bytes(size, dtype)
