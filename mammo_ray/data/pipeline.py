"""The preprocessing job: inputs -> Ray Data (decode + transform, sharded over the cluster's
CPUs) -> Parquet shards per split, ``preprocess.yaml``, ``errors.csv``, ``summary.json``.

Each Ray task writes its own Parquet file(s) and returns one small status row per input.
That is done by hand rather than with ``Dataset.write_parquet`` because one pass has to
route rows to per-split folders, stamp the spec into the schema metadata and send failed
inputs to ``errors.csv`` instead of the data; file names are a hash of the batch's image
ids, so a retried task overwrites its own file instead of duplicating rows.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
import warnings
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mammo_ray import io as mio
from mammo_ray.config import PreprocessConfig, to_dict
from mammo_ray.data.accounting import Tally, check_listed, finish_job, tally
from mammo_ray.data.decode import (MG_MODALITY, DecodeError, decode_bytes, describe_exception, dicom_meta,
                                   read_dicom_header)
from mammo_ray.data.inputs import CLASS_NAMES, Listing, discover, needs_header_probe
from mammo_ray.data.parquet import SPLIT_DIRS, read_split, rows_to_table, split_files, write_table
from mammo_ray.data.split import assign_splits
from mammo_ray.data.transforms import INVERSION_WARN_MARGIN, preprocess_image
from mammo_ray.outputs import (OutputInUseError, check_inputs_vs_out, claim_out, clear_owned, is_project_parquet,
                               list_relative, write_marker)
from mammo_ray.privacy import PatientSecret, load_patient_secret, patient_key
from mammo_ray.console import Progress
from mammo_ray.ray_utils import init_ray, node_id, remote_args
from mammo_ray.resources import (RESERVED_SOURCE_PIXELS, TASK_RETRIES, check_fits, largest_node_memory,
                                 preprocess_task_bytes)

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ("image_id", "path", "split", "label", "status", "reason", "warning", "inverted",
                  "inversion_uncertain", "node_id", "seconds")


OutputExistsError = OutputInUseError  # the name this module's callers knew


# ----------------------------------------------------------------------------- worker side
def process_record(rec: dict, cfg: PreprocessConfig, *, keep_source: bool = False,
                   refine_mask: bool = False) -> tuple[dict | None, dict]:
    """Read, decode and transform one input. Returns (Parquet row or None, status row).

    ``keep_source``: the row also carries the decoded source image as ``source_pixels`` (an
    array, not a Parquet column) for overlays drawn at the source geometry. ``refine_mask``:
    the row's ``breast_mask`` edge is redrawn at full resolution (``preprocess_image``).
    """
    status = {"image_id": rec["image_id"], "path": rec["path"], "split": rec["split"],
              "label": int(rec["label"]), "status": "error", "reason": "", "warning": "", "inverted": False,
              "inversion_uncertain": False}
    t0 = time.perf_counter()
    try:
        data = mio.read_input(rec["path"], cfg.max_file_mb * mio.MB)
    except mio.InputRefused as exc:  # not a regular file, or over the bound: never read
        status["reason"] = str(exc)
        return None, status
    except Exception as exc:  # OSError, ArrowIOError...: the file is the problem, not the job
        status["reason"] = f"unreadable: {describe_exception(exc)}"
        return None, status
    try:
        dec = decode_bytes(data, min_side=cfg.min_side, max_pixels=cfg.max_pixels)
    except DecodeError as exc:
        status["reason"] = str(exc)
        return None, status
    except Exception as exc:  # a decoder bug on one file must not stop a million-image job
        logger.warning("decoder failed on %s", rec["path"], exc_info=True)
        status["reason"] = f"decode failed: {describe_exception(exc)}"
        return None, status
    # the header's grouping fields, raw: the archive jobs' driver pseudonymises them (the status
    # row never reaches a file; preprocess's status frame keeps only RESULT_COLUMNS)
    status.update(patient_id=dec.patient_id, exam_id=dec.study_uid, laterality=dec.laterality, view=dec.view)
    if dec.source_format == "dicom" and dec.modality != MG_MODALITY and cfg.other_modality == "refuse":
        status["reason"] = f"modality {dec.modality_shown} is not MG (other_modality=refuse)"
        return None, status
    try:
        pixels, geom = preprocess_image(dec.pixels, cfg.spec, refine_mask=refine_mask)
    except Exception as exc:
        logger.warning("preprocessing failed on %s", rec["path"], exc_info=True)
        status["reason"] = f"preprocessing failed: {describe_exception(exc)}"
        return None, status
    notes = list(dec.warnings)
    uncertain = geom["inversion_margin"] is not None and abs(geom["inversion_margin"]) < INVERSION_WARN_MARGIN
    if uncertain:
        notes.append(f"inversion uncertain (margin {geom['inversion_margin']:+.2f}; "
                     f"{'inverted' if geom['inverted'] else 'kept'}): check the image, or set invert: never")
    warning = "; ".join(notes)
    row = {
        "image_id": rec["image_id"], "source_path": rec["path"], "label": int(rec["label"]),
        "split": rec["split"], "patient_key": rec.get("patient_key"),
        "laterality": rec.get("laterality") or dec.laterality, "view": rec.get("view") or dec.view,
        "source_format": dec.source_format, "modality": dec.modality, "warning": warning,
        "stored_bits": dec.stored_bits, "pixels": pixels.tobytes(), "height": pixels.shape[0], "width": pixels.shape[1],
        "dtype": str(pixels.dtype), **geom,
    }
    if keep_source:
        row["source_pixels"] = dec.pixels
    status.update(status="ok", warning=warning, inverted=geom["inverted"], inversion_uncertain=uncertain,
                  seconds=time.perf_counter() - t0)
    return row, status


def process_batch(batch: pd.DataFrame, *, cfg: PreprocessConfig, out: str) -> pd.DataFrame:
    """Ray Data ``map_batches`` body: process a batch, write its rows, return status rows."""
    import cv2

    # One image per core: Ray already runs a task per CPU, so OpenCV's own thread pool would
    # only oversubscribe the cores (and makes the single-process baseline use several).
    cv2.setNumThreads(1)
    node = node_id()
    rows_by_split: dict[str, list[dict]] = defaultdict(list)
    statuses = []
    for rec in batch.to_dict("records"):
        rec = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
        row, status = process_record(rec, cfg)
        status["node_id"] = node
        statuses.append(status)
        if row is not None:
            rows_by_split[row["split"]].append(row)
    for split, rows in rows_by_split.items():
        digest = hashlib.sha1("\n".join(sorted(r["image_id"] for r in rows)).encode()).hexdigest()[:20]
        try:
            write_table(rows_to_table(rows, cfg.spec), mio.join(out, split, f"part-{digest}.parquet"))
        except OSError as exc:
            # --out full or unwritable: the batch's images become error lines (one reason, no
            # worker traceback retried TASK_RETRIES times on the console), and the job goes on
            _mark_unwritten(statuses, {r["image_id"] for r in rows}, f"writing {split}/ failed: {exc.strerror or exc}")
    frame = pd.DataFrame(statuses, columns=list(RESULT_COLUMNS))
    frame["seconds"] = frame["seconds"].astype(float)
    return frame


def _mark_unwritten(statuses: list[dict], ids: set[str], reason: str) -> None:
    """Turn the statuses of rows that could not be written into errors carrying ``reason``."""
    for status in statuses:
        if status["image_id"] in ids and status["status"] == "ok":
            status.update(status="error", reason=reason)


def probe_batch(batch: pd.DataFrame) -> pd.DataFrame:
    """Read DICOM headers only (patient id, exam id, laterality, view) to group before splitting."""
    out = []
    for path in batch["path"]:
        meta = {"patient_id": None, "exam_id": None, "laterality": None, "view": None}
        try:
            # regular files only: a FIFO would block the probe (the processing pass reports it)
            head = mio.read_input(path, 0, head=1 << 20)
            header = dicom_meta(read_dicom_header(head))
            header["exam_id"] = header.pop("study_uid", None)
            meta.update({k: v for k, v in header.items() if k in meta})
        except Exception:  # not a DICOM or unreadable: the processing pass reports it
            pass
        out.append({"path": path, **{k: (v or "") for k, v in meta.items()}})
    return pd.DataFrame(out, columns=["path", "patient_id", "exam_id", "laterality", "view"])


# ----------------------------------------------------------------------------- driver side
PREPROCESS_OUTPUTS = ("summary.json", "preprocess.yaml", "errors.csv", *SPLIT_DIRS)


def _check_output(out: str, overwrite: bool) -> None:
    """The output rule (:func:`claim_out`); then only an earlier run's files are removed, and
    output-like names without a marker (a user's data set) refuse the run."""
    claim_out(out, "preprocess", overwrite=overwrite)
    if any(mio.exists(mio.join(out, p)) for p in PREPROCESS_OUTPUTS):
        clear_owned(out, "preprocess", PREPROCESS_OUTPUTS, owned=_written_by_preprocess)


def _written_by_preprocess(rel: str, path: str) -> bool:
    """For a run that died before listing its files: the job's own top-level files, and Parquet
    parts (directly in a split folder) whose metadata carries the spec (the folder's marker
    already says it is a run's)."""
    if "/" not in rel:
        return rel in ("summary.json", "preprocess.yaml", "errors.csv")
    top, _, name = rel.partition("/")
    return top in SPLIT_DIRS and "/" not in name and is_project_parquet(path)


def _probe_patients(records: list[dict], cfg: PreprocessConfig) -> None:
    import ray

    todo = [r for r in records if needs_header_probe(r)]
    if not todo:
        return
    env = remote_args([r["path"] for r in todo[:1]] + first_uri(todo))
    ds = ray.data.from_items([{"path": r["path"]} for r in todo],
                             override_num_blocks=max(1, min(len(todo), math.ceil(len(todo) / 256))))
    found = {}
    for batch in ds.map_batches(probe_batch, batch_format="pandas", batch_size=256, **env).iter_batches(batch_format="pandas"):
        for row in batch.to_dict("records"):
            found[row["path"]] = row
    for r in todo:
        meta = found.get(r["path"], {})
        for k in ("patient_id", "laterality", "view"):
            if not r.get(k) and meta.get(k):
                r[k] = meta[k]


def _assign(records: list[dict], cfg: PreprocessConfig, secret: PatientSecret) -> None:
    for r in records:
        r["patient_key"] = patient_key(r.pop("patient_id", None), secret)
    if cfg.external:
        for r in records:
            r["split"] = "external"
        return
    todo = [r for r in records if not r.get("split")]
    splits = assign_splits([r["label"] for r in todo], [r["patient_key"] or r["image_id"] for r in todo],
                           ratios=cfg.ratios, seed=cfg.seed)
    for r, s in zip(todo, splits, strict=True):
        r["split"] = s


def _summarize(listing: Listing, statuses: pd.DataFrame, cfg: PreprocessConfig, seconds: float,
               t: Tally) -> dict[str, Any]:
    ok = statuses[statuses["status"] == "ok"]
    counts: dict[str, dict[str, int]] = {}
    names = {-1: "unlabeled", 0: CLASS_NAMES[0], 1: CLASS_NAMES[1]}
    for (split, label), n in Counter(zip(ok["split"], ok["label"], strict=True)).items():
        counts.setdefault(split, {})[names[int(label)]] = int(n)
    return {
        "inputs": t.inputs, "rows": t.rows, "errors": t.errors, "balanced": t.balanced,
        "splits": counts, "ignored_non_image_files": dict(sorted(listing.ignored.items())),
        "skipped_while_listing": dict(sorted(listing.skipped.items())),
        "warnings": int((ok["warning"].fillna("") != "").sum()),
        "inverted_fixed": int(ok["inverted"].astype(bool).sum()),
        "inversion_warnings": int(ok["inversion_uncertain"].fillna(False).astype(bool).sum()),
        "nodes": {k: int(v) for k, v in Counter(statuses["node_id"]).items()},
        "seconds": round(seconds, 3), "images_per_second": round(len(statuses) / seconds, 2) if seconds > 0 else None,
        "external": cfg.external, "labels": cfg.labels.as_dict(),
    }


def _account_lost(records: list[dict], statuses: pd.DataFrame, out: str) -> pd.DataFrame:
    """Status rows for inputs whose task never reported (it failed every retry): a row when
    its Parquet part reached the disk before the task died, otherwise an error naming why.

    Raises:
        RuntimeError: duplicated results, or an "ok" image missing from the Parquet files (a bug).
    """
    if statuses["image_id"].duplicated().any():
        raise RuntimeError("an image was reported twice: work was duplicated")
    on_disk: set[str] = set()
    for split in SPLIT_DIRS:
        if split_files(out, split):
            on_disk.update(read_split(out, split, columns=["image_id"]).column("image_id").to_pylist())
    ok = set(statuses.loc[statuses["status"] == "ok", "image_id"])
    if not ok <= on_disk:
        raise RuntimeError(f"{len(ok - on_disk)} image(s) reported done have no row in the Parquet files")
    reported = set(statuses["image_id"])
    lost = []
    for rec in records:
        if rec["image_id"] in reported:
            continue
        row = {"image_id": rec["image_id"], "path": rec["path"], "split": rec["split"], "label": int(rec["label"]),
               "status": "ok", "reason": "", "warning": "", "inverted": False, "inversion_uncertain": False,
               "node_id": "lost", "seconds": np.nan}
        if rec["image_id"] not in on_disk:
            row.update(status="error", reason=f"its Ray task failed (a dying worker, e.g. killed for memory, is retried "
                                              f"{TASK_RETRIES} times; an error in the task is in the Ray logs): "
                                              "rerun with a smaller --batch-size")
        lost.append(row)
    if lost:
        logger.warning("%d input(s) had no result from their task; %d of them reached the disk", len(lost),
                       sum(r["status"] == "ok" for r in lost))
        statuses = pd.concat([statuses, pd.DataFrame(lost, columns=list(RESULT_COLUMNS))], ignore_index=True)
    return statuses


def write_errors(out: str, rows: list[dict]) -> None:
    """``errors.csv``: one line per input that gave no row (path, image_id, reason), sorted by path."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "image_id", "reason"], lineterminator="\n")
    writer.writeheader()
    for r in sorted(rows, key=lambda r: r["path"]):
        writer.writerow({k: r[k] for k in ("path", "image_id", "reason")})
    mio.write_bytes(mio.join(out, "errors.csv"), buf.getvalue().encode())


def run_preprocess(inputs: list[str], out: str, cfg: PreprocessConfig, *, overwrite: bool = False,
                   address: str | None = None) -> dict[str, Any]:
    """Preprocess ``inputs`` into ``out`` with Ray Data.

    Returns:
        The summary (also written to ``out/summary.json``).

    Raises:
        ValueError: bad inputs or an output folder already used (before any work starts).
        RuntimeError: if the accounting ``inputs == rows + errors`` fails.
        NoRowsError: every input was refused (after the outputs are written; the top reasons are logged).
    """
    t0 = time.perf_counter()
    listing = discover(list(inputs), unlabeled=cfg.unlabeled, labels=cfg.labels)
    check_inputs_vs_out(list(inputs), [r["path"] for r in listing.records], out, extra_folders=listing.linked_folders)
    check_listed(listing.inputs, list(inputs), listing.ignored)
    secret = load_patient_secret(cfg.patient_key_file, forbidden=(out,))
    init_ray(address)
    check_fits(preprocess_task_bytes(size=cfg.spec.size, dtype=cfg.spec.dtype, batch_size=cfg.batch_size,
                                     max_pixels=cfg.max_pixels), largest_node_memory(),
               what=f"preprocess: one task (batch_size {cfg.batch_size} x {cfg.spec.size[0]}x{cfg.spec.size[1]} "
                    f"{cfg.spec.dtype}, sources up to max_pixels={cfg.max_pixels})",
               hint="lower --batch-size, --size or max_pixels")
    # every refusal is above this line: only now may a previous run's files be removed
    _check_output(out, overwrite)
    mio.makedirs(out)
    write_marker(out, "preprocess")  # the folder is ours from here: a later --overwrite may clear it
    # patient ids group the split and drive patient-level bootstrap (external sets too)
    _probe_patients(listing.records, cfg)
    _assign(listing.records, cfg, secret)
    logger.info("%d inputs: %d to process, %d refused while listing", listing.inputs, len(listing.records), len(listing.errors))
    statuses = _run_tasks(listing.records, inputs, out, cfg)
    statuses = _account_lost(listing.records, statuses, out)
    failed = statuses[statuses["status"] != "ok"][["path", "image_id", "reason"]].to_dict("records")
    write_errors(out, listing.errors + failed)
    t = tally(listing.inputs, [r["image_id"] for r in listing.records],
              statuses.loc[statuses["status"] == "ok", "image_id"], [f["image_id"] for f in failed],
              listing_errors=len(listing.errors))
    summary = {**_summarize(listing, statuses, cfg, time.perf_counter() - t0, t),
               # which key made the pseudonyms (a fingerprint, not the key): sets made with the same key link
               "patient_key_id": secret.key_id}
    config_out = to_dict(cfg)
    config_out["spec"] = to_dict(cfg.spec)
    mio.write_bytes(mio.join(out, "preprocess.yaml"), yaml.safe_dump(config_out, sort_keys=False).encode())
    mio.write_bytes(mio.join(out, "summary.json"), json.dumps(summary, indent=2).encode())
    write_marker(out, "preprocess", files=list_relative(out, PREPROCESS_OUTPUTS))
    if listing.records and (statuses["node_id"] == "lost").all():
        # no task came back at all: the job itself failed (an unwritable --out, workers killed
        # every time), not some images; the accounting above is written, and the run fails
        raise RuntimeError(f"every task of the job failed ({t.line}; errors.csv lists every input): "
                           "see the Ray logs above (--out not writable? out of memory?)")
    finish_job(t, [e["reason"] for e in listing.errors + failed], logger, where=mio.join(out, "errors.csv"))
    return summary


def first_uri(records: list[dict]) -> list[str]:
    """The first record path that is a URI, if any: a local manifest may list ``s3://`` rows,
    whose tasks need the store's credentials (``remote_args``)."""
    return next(([r["path"]] for r in records if mio.is_uri(r["path"])), [])


def _run_tasks(records: list[dict], inputs: list[str], out: str, cfg: PreprocessConfig) -> pd.DataFrame:
    """The Ray Data map over every record; one status row per record whose task reported."""
    import ray  # deferred: the module's pure functions (process_record) run without Ray

    frames = []
    if records:
        # Ray reserves this much per task, so a node runs only as many tasks as fit; sized for the
        # largest real mammograms, not the max_pixels ceiling (which only has to fit one node)
        task_bytes = preprocess_task_bytes(size=cfg.spec.size, dtype=cfg.spec.dtype, batch_size=cfg.batch_size,
                                           max_pixels=min(cfg.max_pixels, RESERVED_SOURCE_PIXELS))
        # The job is a single CPU-bound map. Ray Data's per-operator reservation would hold
        # back part of the CPUs for the (CPU-free) input and output operators: on a 2-CPU
        # node that idled a core (10.4 vs 14.0 img/s on full-size DICOM, benchmarks/).
        ray.data.DataContext.get_current().op_resource_reservation_enabled = False
        ds = ray.data.from_items(records, override_num_blocks=max(1, math.ceil(len(records) / cfg.batch_size)))
        # A batch whose task keeps failing (its worker killed for memory, a crash) is dropped
        # after TASK_RETRIES retries instead of failing the job; its images become errors below.
        # Set on this dataset's own context, not the process-wide one.
        ds.context.max_errored_blocks = -1
        with warnings.catch_warnings():
            # max_retries has no named parameter in Ray 2.60 (only the deprecated **ray_remote_args)
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(process_batch, batch_format="pandas", batch_size=cfg.batch_size,
                                fn_kwargs={"cfg": cfg, "out": out}, num_cpus=1, memory=task_bytes,
                                max_retries=TASK_RETRIES, **remote_args([*inputs, out, *first_uri(records)]))
        frames, progress = [], Progress("preprocess", len(records))
        for frame in ds.iter_batches(batch_format="pandas", batch_size=None):
            frames.append(frame)
            progress.update(len(frame), int((frame["status"] != "ok").sum()))
        progress.close()
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(RESULT_COLUMNS))
