"""A contact sheet of preprocessed rows: what the model will see, to look at."""
from __future__ import annotations

import cv2
import numpy as np

from mammo_ray import io as mio
from mammo_ray.config import LABELS
from mammo_ray.data.arrays import pixels_of
from mammo_ray.data.parquet import read_split

LABEL_NAMES = {-1: "?", **dict(enumerate(LABELS))}


def contact_sheet(data_dir: str, out_path: str, *, split: str = "train", n: int = 24, cols: int = 8,
                  tile: int = 128) -> int:
    """Write a PNG grid of the first ``n`` rows (by image_id) of a split, captioned with labels.

    Returns:
        The number of tiles drawn.
    """
    table = read_split(data_dir, split, columns=["image_id", "label", "pixels", "height", "width", "dtype"])
    rows = table.slice(0, n).to_pylist()
    if not rows:
        raise ValueError(f"{data_dir}/{split}: no rows to preview")
    tiles = []
    for r in rows:
        px = pixels_of(r).astype(np.float32)
        top = 1.0 if r["dtype"] == "float32" else float(np.iinfo(np.dtype(r["dtype"])).max)
        img = cv2.resize(np.clip(px / top * 255, 0, 255).astype(np.uint8), (tile, tile), interpolation=cv2.INTER_AREA)
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        colour = (60, 60, 230) if r["label"] == 1 else (80, 200, 80)
        cv2.putText(img, LABEL_NAMES.get(int(r["label"]), "?"), (4, tile - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1,
                    cv2.LINE_AA)
        tiles.append(img)
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])
    ok, buf = cv2.imencode(".png", grid)
    mio.write_bytes(out_path, buf.tobytes())
    return len(rows)
