"""The Parquet contract between preprocessing and later stages.

One row per image: ids, label, split, the pixels as raw bytes (``height x width`` of
``dtype``, C order) and the geometry fields. The preprocessing spec travels in the schema
metadata under ``mammo_ray.spec`` (JSON) so a reader never needs it re-declared.
"""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mammo_ray import io as mio
from mammo_ray.config import SPLITS, PreprocessSpec, from_mapping

SPEC_KEY = b"mammo_ray.spec"
SPLIT_DIRS = SPLITS

SCHEMA = pa.schema([
    ("image_id", pa.string()), ("source_path", pa.string()), ("label", pa.int8()),
    ("split", pa.string()), ("patient_key", pa.string()), ("laterality", pa.string()),
    ("view", pa.string()), ("source_format", pa.string()), ("modality", pa.string()),
    ("warning", pa.string()), ("stored_bits", pa.int8()), ("inversion_margin", pa.float32()),
    ("masked_bright_fraction", pa.float32()),
    ("pixels", pa.binary()), ("height", pa.int32()), ("width", pa.int32()), ("dtype", pa.string()),
    ("orig_height", pa.int32()), ("orig_width", pa.int32()), ("inverted", pa.bool_()),
    ("flipped", pa.bool_()), ("crop_y0", pa.int32()), ("crop_x0", pa.int32()),
    ("crop_y1", pa.int32()), ("crop_x1", pa.int32()), ("scale_y", pa.float64()),
    ("scale_x", pa.float64()), ("pad_top", pa.int32()), ("pad_left", pa.int32()),
    ("pad_bottom", pa.int32()), ("pad_right", pa.int32()),
])


def schema_with_spec(spec: PreprocessSpec) -> pa.Schema:
    from mammo_ray.config import to_dict

    return SCHEMA.with_metadata({SPEC_KEY: json.dumps(to_dict(spec), sort_keys=True).encode()})


def rows_to_table(rows: list[dict[str, Any]], spec: PreprocessSpec) -> pa.Table:
    schema = schema_with_spec(spec)
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def write_table(table: pa.Table, path: str) -> None:
    """Write one Parquet file through :func:`mammo_ray.io.write_bytes` (local: a hidden temp
    name then renamed, so a retried or killed task never leaves a half-written part that
    dataset readers would pick up)."""
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf)
    mio.write_bytes(path, buf.getvalue())


def split_files(data_dir: str, split: str) -> list[str]:
    """Parquet files of one split folder, sorted (empty list when the split is absent)."""
    folder = mio.join(data_dir, split)
    if not mio.exists(folder):
        return []
    return [p for p, _ in mio.list_files(folder) if p.endswith(".parquet")]


def read_spec(data_dir: str) -> PreprocessSpec:
    """The spec a preprocessed folder was made with, from its Parquet metadata.

    Raises:
        ValueError: the folder has no Parquet files, they carry no spec, or a stored value is
            out of range (one line naming the file and the field).
    """
    for split in SPLIT_DIRS:
        files = split_files(data_dir, split)
        if files:
            fs, inner = mio.resolve(files[0])
            meta = pq.read_schema(inner, filesystem=fs).metadata or {}
            if SPEC_KEY not in meta:
                raise ValueError(f"{files[0]}: no {SPEC_KEY.decode()} in the Parquet metadata: not a mammo_ray output")
            # the stored spec is checked as a flag is (finite, in range), and a refusal names
            # the file it came from
            try:
                stored = json.loads(meta[SPEC_KEY])
                if not isinstance(stored, dict):
                    raise ValueError(f"expected a mapping, found {type(stored).__name__}")
                return from_mapping(PreprocessSpec, stored)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{files[0]}: the spec in its Parquet metadata: {str(err).splitlines()[0]}") from None
    raise ValueError(f"{data_dir}: no Parquet files under any of {', '.join(SPLIT_DIRS)}")


def read_split(data_dir: str, split: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of one split as one Arrow table (ordered by image_id for determinism)."""
    files = split_files(data_dir, split)
    if not files:
        raise ValueError(f"{data_dir}: no {split}/ split with Parquet files")
    fs, _ = mio.resolve(files[0])
    table = pq.ParquetDataset([mio.resolve(f)[1] for f in files], filesystem=fs).read(columns=columns)
    return table.sort_by("image_id") if "image_id" in table.column_names else table
