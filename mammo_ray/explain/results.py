"""The explain job's results folder: the Parquet schemas of scores and errors, the committed
parts and their reading, de-duplication after a resume, and the run's identity file that
``--resume`` checks."""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mammo_ray import io as mio
from mammo_ray.config import ExplainConfig, tta_mode
from mammo_ray.data.parquet import write_table
from mammo_ray.outputs import OutputInUseError, claim_out

logger = logging.getLogger(__name__)

SCORES = "scores.parquet"
ERROR_PARTS = "_errors"
#: explain --cam-for positive|top:N: the CAM pass's rows (merged into scores.parquet at the end)
#: and its failures (an image that scored but could not be explained keeps its score row)
CAMS = "_cams"
CAM_ERROR_PARTS = "_cam_errors"
#: a score run's meta parts: each image's pseudonymised patient and exam keys, laterality, view
META = "_meta"
IDENTITY_FILE = "explain.yaml"
SCORE_IDENTITY_FILE = "score.yaml"
IDENTITY_KEYS = ("checkpoint_sha256", "backbone", "method", "target_layer", "threshold", "preview_size",
                 "heatmap_max_side", "inputs", "annotations_sha256", "amp", "cam_within_breast", "cam_for", "tta")
SCORE_IDENTITY_KEYS = ("checkpoint_sha256", "backbone", "threshold", "inputs", "amp", "tta")
SCORE_COLUMNS = ("image_id", "source_path", "label", "probability", "predicted_label", "threshold",
                 "cam_peak_x", "cam_peak_y", "cam_peak_value", "cam_top5_energy", "orig_height", "orig_width",
                 "heatmap_path", "overlay_path", "pointing_hit", "energy_inside", "lesion_area_fraction",
                 "cam_peak_in_breast", "pointing_hit_in_breast", "lesion_area_fraction_in_breast",
                 "warning", "node_id", "seconds_preprocess", "seconds_cam", "seconds_write")


def _schemas():
    score = pa.schema([
        ("image_id", pa.string()), ("source_path", pa.string()), ("label", pa.int8()),
        ("probability", pa.float32()), ("predicted_label", pa.int8()), ("threshold", pa.float32()),
        ("cam_peak_x", pa.float32()), ("cam_peak_y", pa.float32()), ("cam_peak_value", pa.float32()),
        ("cam_top5_energy", pa.float32()), ("orig_height", pa.int32()), ("orig_width", pa.int32()),
        ("heatmap_path", pa.string()), ("overlay_path", pa.string()),
        ("pointing_hit", pa.bool_()), ("energy_inside", pa.float32()), ("lesion_area_fraction", pa.float32()),
        ("cam_peak_in_breast", pa.bool_()), ("pointing_hit_in_breast", pa.bool_()),
        ("lesion_area_fraction_in_breast", pa.float32()),
        ("warning", pa.string()), ("node_id", pa.string()),
        ("seconds_preprocess", pa.float32()), ("seconds_cam", pa.float32()), ("seconds_write", pa.float32()),
    ])
    errors = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("reason", pa.string())])
    meta = pa.schema([("image_id", pa.string()), ("patient_key", pa.string()), ("exam_key", pa.string()),
                      ("laterality", pa.string()), ("view", pa.string())])
    return score, errors, meta


SCORE_SCHEMA, ERROR_SCHEMA, META_SCHEMA = _schemas()


def write_parts(out: str, image_ids: list[str], rows: list[dict], errors: list[dict], *, scores: str = SCORES,
                errors_folder: str = ERROR_PARTS) -> None:
    """A batch's error part, then its scores part, named by a hash of the batch's image ids (a
    retried task rewrites its own parts). The scores part is written last: it commits the batch."""
    digest = hashlib.sha1("\n".join(sorted(image_ids)).encode()).hexdigest()[:20]
    if errors:
        write_table(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA), mio.join(out, errors_folder, f"part-{digest}.parquet"))
    if rows:
        write_table(pa.Table.from_pylist(rows, schema=SCORE_SCHEMA), mio.join(out, scores, f"part-{digest}.parquet"))


def part_paths(out: str, folder: str) -> list[str]:
    """The committed parts of one of the folder's Parquet datasets, in name order."""
    base = mio.join(out, folder)
    if not mio.exists(base):
        return []
    return sorted(p for p, _ in mio.list_files(base) if p.endswith(".parquet"))


def read_parts(out: str, folder: str, columns: list[str]) -> pd.DataFrame:
    """The rows of every committed part of ``scores.parquet`` or the error parts."""
    schema = ERROR_SCHEMA if folder in (ERROR_PARTS, CAM_ERROR_PARTS) else META_SCHEMA if folder == META else SCORE_SCHEMA
    tables = []
    for p in part_paths(out, folder):
        fs, inner = mio.resolve(p)
        tables.append(pq.read_table(inner, filesystem=fs, columns=columns))
    if not tables:
        return pa.schema([schema.field(c) for c in columns]).empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()


def dedupe_parts(out: str, folders: tuple[str, ...] = (SCORES, ERROR_PARTS)) -> int:
    """Remove rows of images that were done twice, keeping their first row (parts in name order,
    score rows before error rows). This happens only when a killed run's last tasks were still
    writing while a ``--resume`` started: the work was repeated, not lost. Returns rows removed.
    """
    seen: set[str] = set()
    removed = 0
    for folder in folders:
        for p in part_paths(out, folder):
            fs, inner = mio.resolve(p)
            table = pq.read_table(inner, filesystem=fs)
            ids = table.column("image_id").to_pylist()
            keep = [i not in seen for i in ids]
            seen.update(ids)
            if all(keep):
                continue
            removed += keep.count(False)
            logger.warning("%s: %d row(s) of images already in another part removed", p, keep.count(False))
            kept = table.filter(pa.array(keep))
            if kept.num_rows:
                write_table(kept, p)
            else:
                fs.delete_file(inner)
    return removed


def drop_left(out: str, listed: set[str], folders: tuple[str, ...] = (SCORES, ERROR_PARTS, META)) -> list[dict]:
    """A resume after inputs left (deleted, moved): the committed rows, error lines and meta rows
    of images the listing no longer has are removed from their parts, with the heatmap and
    overlay PNGs they name, so the results describe the inputs as they are and the accounting
    still balances. Returns one ``{"image_id", "path"}`` per image that left, sorted by path."""
    left: dict[str, str] = {}
    for folder in folders:
        for p in part_paths(out, folder):
            fs, inner = mio.resolve(p)
            table = pq.read_table(inner, filesystem=fs)
            ids = table.column("image_id").to_pylist()
            keep = [i in listed for i in ids]
            if all(keep):
                continue
            gone = table.filter(pa.array([not k for k in keep])).to_pylist()
            for row in gone:
                left.setdefault(row["image_id"], row.get("source_path") or row.get("path") or "")
                for col in ("heatmap_path", "overlay_path"):
                    if row.get(col) and mio.exists(mio.join(out, row[col])):
                        png_fs, png = mio.resolve(mio.join(out, row[col]))
                        png_fs.delete_file(png)
            kept = table.filter(pa.array(keep))
            if kept.num_rows:
                write_table(kept, p)
            else:
                fs.delete_file(inner)
    for image_id, path in left.items():
        if not path:  # only a meta row was left (its image's row had gone): the id is all there is
            left[image_id] = image_id
    return sorted(({"image_id": i, "path": p} for i, p in left.items()), key=lambda r: r["path"])


def identity(checkpoint: str, checkpoint_sha256: str, state: dict, opts: ExplainConfig, layer: str, threshold: float,
             inputs: list[str]) -> dict[str, Any]:
    """What produced a folder's results (``explain.yaml``); ``--resume`` needs the same."""
    return {"checkpoint": checkpoint, "checkpoint_sha256": checkpoint_sha256, "backbone": state["backbone"],
            "method": opts.method, "target_layer": layer, "threshold": float(threshold),
            "preview_size": int(opts.preview_size), "heatmap_max_side": int(opts.heatmap_max_side),
            "inputs": list(inputs), "annotations": opts.annotations,
            "annotations_sha256": hashlib.sha256(mio.read_bytes(opts.annotations)).hexdigest() if opts.annotations else None,
            "amp": bool(opts.amp), "cam_within_breast": bool(opts.cam_within_breast), "cam_for": opts.cam_for,
            "tta": opts.tta, "scores_from": opts.scores_from, "spec": state["spec"],
            "labels": opts.labels.as_dict(), "unlabeled": bool(opts.unlabeled)}


def score_identity(checkpoint: str, checkpoint_sha256: str, state: dict, opts, threshold: float,
                   inputs: list[str]) -> dict[str, Any]:
    """What produced a score folder's results (``score.yaml``); ``--resume`` needs the same."""
    return {"checkpoint": checkpoint, "checkpoint_sha256": checkpoint_sha256, "backbone": state["backbone"],
            "threshold": float(threshold), "inputs": list(inputs), "amp": bool(opts.amp), "tta": opts.tta,
            "spec": state["spec"], "labels": opts.labels.as_dict(), "unlabeled": bool(opts.unlabeled)}


def _with_tta_mode(made: dict[str, Any]) -> dict[str, Any]:
    """An identity file as today's runs write it: one from before ``tta`` took a mode holds a
    boolean (score) or nothing (explain), which meant ``hflip`` / ``none``."""
    return {**made, "tta": tta_mode(made.get("tta"))}


def check_output(out: str, identity: dict, resume: bool, *, file: str = IDENTITY_FILE,
                 keys: tuple[str, ...] = IDENTITY_KEYS, overwrite: bool = False) -> bool:
    """The output rule (:func:`mammo_ray.outputs.claim_out`), then on ``--resume`` the earlier
    run's identity file must match this run's.

    Returns:
        True when resuming previous results.

    Raises:
        OutputInUseError: ``out`` holds another run, or this stage's without --resume or
            --overwrite, or --resume of a run made differently (naming the fields that differ).
    """
    claim_out(out, file.split(".")[0], overwrite=overwrite, resume=resume)
    path = mio.join(out, file)
    if not resume or not mio.exists(path):
        return False
    previous = _with_tta_mode(yaml.safe_load(mio.read_bytes(path)) or {})
    differ = [k for k in keys if previous.get(k) != identity.get(k)]
    if differ:
        raise OutputInUseError(f"--out {out}: --resume needs the same run, but {', '.join(differ)} differ from its "
                               f"{file}: use another folder")
    return True


def import_scores(source: str, out: str, explain_identity: dict, *, dry_run: bool = False) -> int:
    """``explain --scores-from``: a finished ``mammo-ray score`` folder's committed parts (rows,
    errors, meta) copied into ``out`` so only the CAM pass is left. Refused unless it was made
    with the same checkpoint, threshold and inputs and finished. Returns the files copied."""
    path = mio.join(source, SCORE_IDENTITY_FILE)
    if not mio.exists(path):
        raise ValueError(f"--scores-from {source}: no {SCORE_IDENTITY_FILE} there; give the --out folder of a "
                         "finished mammo-ray score run")
    made = _with_tta_mode(yaml.safe_load(mio.read_bytes(path)) or {})
    theirs, ours = str(made.get("checkpoint_sha256")), explain_identity["checkpoint_sha256"]
    if theirs != ours:
        raise ValueError(f"--scores-from {source} was scored with another checkpoint (sha256 {theirs[:12]}), this "
                         f"explain run uses sha256 {ours[:12]}: score again with this checkpoint")
    for key, what in (("threshold", "--threshold"), ("inputs", "inputs"), ("tta", "--tta")):
        if made.get(key) != explain_identity[key]:
            raise ValueError(f"--scores-from {source}: its {what} ({made.get(key)!r}) differ from this run's "
                             f"({explain_identity[key]!r}): give the same, or score again")
    if not mio.exists(mio.join(source, "summary.json")):
        raise ValueError(f"--scores-from {source}: the score run has not finished (no summary.json): resume it first")
    copied = 0
    for folder in (SCORES, ERROR_PARTS, META):
        for p in part_paths(source, folder):
            dest = mio.join(out, folder, p.rsplit("/", 1)[-1])
            if not dry_run and not mio.exists(dest):
                mio.write_bytes(dest, mio.read_bytes(p))
                copied += 1
    return copied
