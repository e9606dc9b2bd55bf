"""The explain batch job: score and Grad-CAM every image of an archive with Ray Data.

    list -> read + decode + preprocess with the checkpoint's spec (CPU tasks)
         -> score + CAM in an actor pool (the model loaded once per actor; GPU when there is one)
         -> map the CAM back to the source geometry, write heatmap + overlay PNGs and one
            Parquet part per batch (CPU tasks)

Output folder::

    explain.yaml            what produced the results (checkpoint sha256, method, layer, inputs...)
    scores.parquet/         a Parquet dataset, one part per batch (``pd.read_parquet`` reads it)
    heatmaps/ab/<id>.png    16-bit CAM in [0, 1] at the source image's geometry
    overlays/ab/<id>.png    CAM over the source image at the preview size
    overview.png            the highest-scoring overlays on one sheet
    errors.csv, summary.json, localization.json (when annotations are given)

Nothing is lost and nothing is done twice: a batch's Parquet part is written last and is its
commit; ``--resume`` skips every image that already has a row (in ``scores.parquet`` or in
the error parts), a retried task rewrites its own part (named by a hash of its image ids),
and the job ends by checking that every input has exactly one row or one error.
File names are image ids (a hash of the source path), never patient identifiers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mammo_ray import io as mio
from mammo_ray.config import ExplainConfig, PreprocessConfig
from mammo_ray.data.accounting import LOST_REASON, Tally, check_nothing_lost, tally
from mammo_ray.data.arrays import pixels_from_bytes
from mammo_ray.data.decode import describe_exception
from mammo_ray.data.inputs import Listing, discover
from mammo_ray.data.pipeline import process_record, write_errors
from mammo_ray.data.transforms import GEOMETRY_FIELDS
from mammo_ray.explain.cam import check_target_layer, resolve_target_layer, score_and_cam
from mammo_ray.explain.lesions import load_annotations, localization_summary
from mammo_ray.explain.maps import explain_record
from mammo_ray.explain.render import contact_sheet, make_preview
from mammo_ray.explain.results import (ERROR_PARTS, IDENTITY_FILE, SCORES, check_output, dedupe_parts, identity,
                                       read_parts, write_parts)
from mammo_ray.models.checkpoint import load_checkpoint, read_checkpoint_bytes
from mammo_ray.models.inference import load_for_inference, to_model_input
from mammo_ray.outputs import check_inputs_vs_out
from mammo_ray.ray_utils import init_ray, node_id, remote_args
from mammo_ray.resources import TASK_RETRIES, check_fits, largest_node_memory, preprocess_task_bytes

logger = logging.getLogger(__name__)

STATUS_COLUMNS = ["image_id", "path", "status", "reason", "node_id", "prep_node_id", "cam_worker"]
SUMMARY_SCORE_COLUMNS = ["image_id", "source_path", "label", "orig_height", "probability", "predicted", "overlay_path",
                         "pointing_hit", "energy_inside", "lesion_area_fraction", "cam_peak_in_breast",
                         "pointing_hit_in_breast", "lesion_area_fraction_in_breast"]
# typed placeholders for failed rows, so every batch column converts to one Arrow type
_EMPTY_GEOMETRY = {k: (False if k in ("inverted", "flipped") else 0.0 if k.startswith("scale") else 0)
                   for k in GEOMETRY_FIELDS}


# ----------------------------------------------------------------------------- the Ray stages
def prepare_batch(batch: pd.DataFrame, *, cfg: PreprocessConfig, preview_size: int) -> pd.DataFrame:
    """CPU task: decode and preprocess each input with the checkpoint's spec, plus a display
    preview of the source at the preview size. Failed inputs stay in the batch as errors."""
    import cv2  # deferred: configured per worker process below

    cv2.setNumThreads(1)  # a task per core already; OpenCV's pool would oversubscribe
    rows = []
    for rec in batch.to_dict("records"):
        rec = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
        rec.setdefault("split", "external")
        t0 = time.perf_counter()
        row, status = process_record(rec, cfg, keep_source=True)
        out = {"image_id": rec["image_id"], "source_path": rec["path"], "label": int(rec["label"]),
               "status": status["status"], "reason": status["reason"], "warning": status["warning"] or "",
               "pixels": b"", "height": 0, "width": 0, "dtype": "", "preview": b"", "preview_height": 0,
               "preview_width": 0, "breast_mask": b"", **_EMPTY_GEOMETRY}
        if row is not None:
            prev = make_preview(row.pop("source_pixels"), bool(row["inverted"]), preview_size)
            out.update({k: row[k] for k in ("pixels", "height", "width", "dtype", *GEOMETRY_FIELDS)})
            out["breast_mask"] = np.packbits(row["breast_mask"]).tobytes()  # model space, 1 bit per pixel
            out.update(preview=prev.tobytes(), preview_height=prev.shape[0], preview_width=prev.shape[1])
        out["seconds_preprocess"] = time.perf_counter() - t0
        out["prep_node_id"] = node_id()
        rows.append(out)
    return pd.DataFrame(rows)


class CamActor:
    """Ray Data callable class: loads the checkpoint once, then scores and CAMs batches."""

    def __init__(self, checkpoint: str, method: str, target_layer: str | None, amp: bool = True) -> None:
        self.loaded = load_for_inference(checkpoint)
        self.method, self.target_layer, self.amp = method, target_layer, amp
        # where this actor runs: its process, the GPUs Ray gave it (CUDA_VISIBLE_DEVICES holds the
        # same ids) and the device it chose; summary.json's cam_workers lists them
        self.worker = (f"{node_id()[:12]}/{os.getpid()}/gpus={os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
                       f"/{self.loaded.device.type}")

    def _run(self, batch: pd.DataFrame, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, rows = self.loaded, batch.iloc[idx]
        px = pixels_from_bytes(list(rows["pixels"]), rows["height"], rows["width"], rows["dtype"])
        return score_and_cam(m.model, m.backbone, to_model_input(px, m.spec, m.device), method=self.method,
                             target_layer=self.target_layer, amp=self.amp)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        t0 = time.perf_counter()
        status, reason = batch["status"].to_numpy().copy(), batch["reason"].to_numpy().copy()
        n = len(batch)
        probs, cams = np.full(n, np.nan, np.float32), [b""] * n
        cam_h, cam_w = np.zeros(n, np.int64), np.zeros(n, np.int64)
        ok = np.flatnonzero(status == "ok")
        # the batch at once; if that fails, image by image, so one image the model cannot take
        # does not fail its batch-mates
        groups = [ok] if len(ok) else []
        for attempt, group in enumerate(groups):
            try:
                p, maps = self._run(batch, group)
            except Exception as exc:
                if attempt == 0 and len(group) > 1:
                    logger.warning("CAM failed on a batch; retrying its images one by one", exc_info=True)
                    groups.extend(np.array([i]) for i in group)
                else:
                    status[group], reason[group] = "error", f"scoring/CAM failed: {describe_exception(exc)}"
                continue
            for j, i in enumerate(group):
                probs[i], cams[i] = p[j], maps[j].astype(np.float32).tobytes()
                cam_h[i], cam_w[i] = maps[j].shape
        per_image = (time.perf_counter() - t0) / max(int((status == "ok").sum()), 1)
        return batch.drop(columns=["pixels"]).assign(
            status=status, reason=reason, probability=probs, cam=cams, cam_height=cam_h, cam_width=cam_w,
            seconds_cam=np.where(status == "ok", per_image, 0.0), node_id=node_id(), cam_worker=self.worker)


def write_batch(batch: pd.DataFrame, *, out: str, threshold: float, preview_size: int, heatmap_max_side: int,
                annotations: dict[str, list[dict]], within_breast: bool = True) -> pd.DataFrame:
    """CPU task: each scored record's heatmap, overlay and scores row (``maps.explain_record``),
    then the batch's Parquet parts; one status row per input."""
    import cv2  # deferred: configured per worker process below

    cv2.setNumThreads(1)
    rows, errors, statuses = [], [], []
    for rec in batch.to_dict("records"):
        status = {"image_id": rec["image_id"], "path": rec["source_path"], "status": rec["status"],
                  "reason": rec["reason"], "node_id": rec.get("node_id", ""), "prep_node_id": rec.get("prep_node_id", ""),
                  "cam_worker": rec.get("cam_worker", "")}
        if rec["status"] == "ok":
            try:
                rows.append(explain_record(rec, out=out, threshold=threshold, heatmap_max_side=heatmap_max_side,
                                           lesions=annotations.get(rec["image_id"]), within_breast=within_breast))
            except Exception as exc:  # one bad image (e.g. an unreadable mask) must not stop the archive
                logger.warning("writing outputs failed for %s", rec["source_path"], exc_info=True)
                status.update(status="error", reason=f"writing outputs failed: {describe_exception(exc)}")
        if status["status"] != "ok":
            errors.append({"image_id": rec["image_id"], "path": rec["source_path"], "reason": status["reason"]})
        statuses.append(status)
    write_parts(out, list(batch["image_id"]), rows, errors)
    return pd.DataFrame(statuses, columns=STATUS_COLUMNS)


# ----------------------------------------------------------------------------- driver side
def _check_pool(workers: int, gpw: float, cpus: int, gpus: float, *, autoscaling: bool) -> None:
    """The actor pool fits the cluster: on a local Ray a pool that cannot be placed (or that
    would hold every CPU, starving the tasks that feed it) would wait forever, so it is refused;
    on a cluster the autoscaler may still add nodes, so it is a warning."""
    problem = None
    if gpw > 0 and workers * gpw > gpus:
        problem = f"--workers {workers} x --gpus-per-worker {gpw:g} needs {workers * gpw:g} GPU(s), the cluster has {gpus:g}"
    elif gpw == 0 and cpus < 2:
        problem = f"a CPU-only explain job needs at least 2 CPUs (one CAM actor + its read/write tasks); Ray has {cpus}"
    elif gpw == 0 and workers > cpus - 1:
        problem = (f"--workers {workers} CPU actors on {cpus} CPU(s) leave none for the read/write tasks: "
                   f"use at most {cpus - 1}")
    if problem and not autoscaling:
        raise ValueError(problem)
    if problem:
        logger.warning("%s: waiting for the cluster to scale up", problem)


@dataclass
class _Run:
    """What the checks settled before any work: the listing, what is left to do, the threshold
    and layer, the identity file's content and (when there is work) the actor pool."""

    listing: Listing
    todo: list[dict]
    state: dict[str, Any]
    layer: str
    threshold: float
    threshold_source: str
    identity: dict[str, Any]
    resumed: bool
    annotations: dict[str, list[dict]] = field(default_factory=dict)
    ann_counts: dict[str, int] = field(default_factory=dict)
    workers: int = 1
    gpus_per_worker: float = 0.0
    cfg: PreprocessConfig | None = None


def _threshold(opts: ExplainConfig, state: dict) -> tuple[float, str]:
    stored = (state.get("metrics") or {}).get("val_threshold")
    if opts.threshold is not None:
        return opts.threshold, "--threshold"
    if stored is not None:
        return float(stored), "checkpoint val_threshold (Youden on val)"
    return 0.5, "0.5 (the checkpoint has no val threshold)"


def _plan(inputs: list[str], checkpoint: str, out: str, opts: ExplainConfig, resume: bool) -> _Run:
    """Every check that can refuse the run, before the output folder is touched."""
    data = read_checkpoint_bytes(checkpoint)  # read once: loaded and hashed from the same bytes
    state = load_checkpoint(checkpoint, data=data)
    layer = resolve_target_layer(state["backbone"], opts.target_layer)
    check_target_layer(state, layer, opts.method)
    threshold, source = _threshold(opts, state)
    listing = discover(list(inputs), labels_optional=True)
    check_inputs_vs_out(list(inputs), [r["path"] for r in listing.records], out, extra_folders=listing.linked_folders)
    ident = identity(checkpoint, hashlib.sha256(data).hexdigest(), state, opts, layer, threshold, inputs)
    run = _Run(listing=listing, todo=listing.records, state=state, layer=layer, threshold=threshold,
               threshold_source=source, identity=ident, resumed=check_output(out, ident, resume))
    if opts.annotations:
        run.annotations, run.ann_counts = load_annotations(opts.annotations, listing.records, list(inputs))
    if run.resumed:
        done = set(read_parts(out, SCORES, ["image_id"])["image_id"]) | set(read_parts(out, ERROR_PARTS, ["image_id"])["image_id"])
        run.todo = [r for r in listing.records if r["image_id"] not in done]
    logger.info("%d inputs: %d to explain, %d already done, %d refused while listing", listing.inputs, len(run.todo),
                len(listing.records) - len(run.todo), len(listing.errors))
    return run


def _plan_pool(run: _Run, opts: ExplainConfig, address: str | None) -> None:
    """Start (or join) Ray and size the actor pool; refuse a pool or a read task that cannot fit."""
    import ray  # deferred: a run with nothing left to do (a finished --resume) starts no Ray

    init_ray(address)
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    gpw = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    # CPU-only: leave a CPU to the read/write tasks or the pool starves its own input
    run.workers = opts.workers or (max(1, int(gpus // gpw)) if gpw else max(1, cpus - 1))
    run.gpus_per_worker = gpw
    _check_pool(run.workers, gpw, cpus, gpus, autoscaling=bool(address or os.environ.get("RAY_ADDRESS")))
    run.cfg = cfg = PreprocessConfig(spec=run.state["spec"], external=True, unlabeled=True)
    check_fits(preprocess_task_bytes(size=cfg.spec.size, dtype=cfg.spec.dtype, batch_size=opts.prep_batch_size,
                                     max_pixels=cfg.max_pixels, keep_sources=True), largest_node_memory(),
               what=f"explain: one read task ({opts.prep_batch_size} sources of up to {cfg.max_pixels} pixels, "
                    "kept for the overlays)", hint="run on nodes with more memory")


def _pipeline(run: _Run, inputs: list[str], checkpoint: str, out: str, opts: ExplainConfig) -> pd.DataFrame:
    """read + preprocess (tasks) -> score + CAM (actor pool) -> write (tasks); the status rows."""
    import ray  # deferred: see _plan_pool

    ray.data.DataContext.get_current().op_resource_reservation_enabled = False  # see data/pipeline.py
    env = remote_args([*inputs, out, checkpoint, *([opts.annotations] if opts.annotations else [])])
    # Ray Data retries failed tasks forever by default; max_retries has no named parameter
    # in 2.60, only the deprecated **ray_remote_args (hence the warning filter below)
    task_env = {**env, "max_retries": TASK_RETRIES}
    gpw = run.gpus_per_worker
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ray.data.from_items(run.todo, override_num_blocks=max(1, math.ceil(len(run.todo) / opts.prep_batch_size)))
        # a batch whose task keeps dying becomes error lines, not a failed job; this dataset's
        # own context, not the process-wide one
        ds.context.max_errored_blocks = -1
        ds = ds.map_batches(prepare_batch, batch_format="pandas", batch_size=opts.prep_batch_size,
                            fn_kwargs={"cfg": run.cfg, "preview_size": opts.preview_size}, num_cpus=1, **task_env)
        ds = ds.map_batches(CamActor, batch_format="pandas", batch_size=opts.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=run.workers),
                            fn_constructor_kwargs={"checkpoint": checkpoint, "method": opts.method,
                                                   "target_layer": run.layer, "amp": opts.amp},
                            # the actor keeps Ray Data's restart/retry defaults: a node that goes
                            # away makes its actor "temporarily unavailable" several times before
                            # the restart elsewhere, and bounded retries turned those batches into
                            # errors (tests/test_cluster.py); a failing batch is retried image by
                            # image inside the actor instead
                            num_gpus=gpw, num_cpus=0 if gpw else 1, **env)
        ds = ds.map_batches(write_batch, batch_format="pandas", batch_size=opts.batch_size, num_cpus=1,
                            fn_kwargs={"out": out, "threshold": run.threshold, "preview_size": opts.preview_size,
                                       "heatmap_max_side": opts.heatmap_max_side, "annotations": run.annotations,
                                       "within_breast": opts.cam_within_breast},
                            **task_env)
    frames = list(ds.iter_batches(batch_format="pandas", batch_size=None))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STATUS_COLUMNS)


def _collect(run: _Run, out: str) -> tuple[pd.DataFrame, list[dict], int]:
    """The committed rows and error lines; an input whose every task attempt failed becomes an
    error line. Returns (scores, errors, duplicate rows a resume removed)."""
    # only a resume can meet rows a dying run was still writing; in a fresh run a duplicate is a bug
    deduplicated = dedupe_parts(out) if run.resumed else 0
    scores = read_parts(out, SCORES, SUMMARY_SCORE_COLUMNS)
    part_errors = read_parts(out, ERROR_PARTS, ["image_id", "path", "reason"])
    got = set(scores["image_id"]) | set(part_errors["image_id"])
    lost = [r for r in run.listing.records if r["image_id"] not in got]
    if lost:  # their task failed every retry (worker killed for memory, a crash): errors, not a lost job
        logger.warning("%d image(s) had no result after %d attempts: listed in errors.csv", len(lost), TASK_RETRIES + 1)
    errors = part_errors.to_dict("records") + [{"path": r["path"], "image_id": r["image_id"], "reason": LOST_REASON}
                                               for r in lost]
    return scores, errors, deduplicated


def _summary(run: _Run, scores: pd.DataFrame, errors: list[dict], status: pd.DataFrame, checkpoint: str,
             opts: ExplainConfig, *, seconds: float, job_seconds: float, deduplicated: int) -> tuple[dict, Tally]:
    listing, processed = run.listing, len(status)
    t = tally(listing.inputs, [r["image_id"] for r in listing.records], scores["image_id"],
              [e["image_id"] for e in errors], listing_errors=len(listing.errors))
    summary = {
        "inputs": t.inputs, "rows": t.rows, "errors": t.errors,
        "skipped_while_listing": dict(sorted(listing.skipped.items())), "balanced": t.balanced,
        "processed_this_run": processed, "resumed": run.resumed, "duplicate_rows_removed": deduplicated,
        "skipped_as_done": len(listing.records) - len(run.todo),
        "checkpoint": checkpoint, "backbone": run.state["backbone"], "method": opts.method, "target_layer": run.layer,
        "threshold": run.threshold, "threshold_source": run.threshold_source,
        "predicted_malignant": int(scores["predicted"].sum()),
        # a peak on a removed label, film edge or the padding: the map explains no anatomy
        "cam_peaks_outside_breast": int((scores["cam_peak_in_breast"] == False).sum()),  # noqa: E712 (nullable)
        "cam_nodes": dict(Counter(status["node_id"])) if processed else {},
        "preprocess_nodes": dict(Counter(status["prep_node_id"])) if processed else {},
        # node/pid/gpus=<CUDA_VISIBLE_DEVICES>/device of each CAM actor -> images it explained
        "cam_workers": dict(Counter(status["cam_worker"])) if processed else {},
        "seconds": round(seconds, 3),
        "images_per_second": round(processed / job_seconds, 2) if processed and job_seconds > 0 else None,
    }
    if opts.annotations:
        summary["annotations"] = run.ann_counts  # matched images, lesions, unmatched and ambiguous rows
    return summary, t


def run_explain(inputs: list[str], checkpoint: str, out: str, opts: ExplainConfig | None = None, *,
                resume: bool = False, address: str | None = None) -> dict[str, Any]:
    """Score and explain every input image; see the module doc for the outputs.

    Returns:
        The summary (also written to ``out/summary.json``).

    Raises:
        ValueError: bad options, a checkpoint or layer that cannot be explained, or an output
            folder holding other results (all before any work starts).
        RuntimeError: the final accounting (one row or one error per input) fails.
    """
    opts = opts or ExplainConfig()
    t0 = time.perf_counter()
    run = _plan(inputs, checkpoint, out, opts, resume)
    if run.todo:
        _plan_pool(run, opts, address)
    # every check passed: from here on the folder holds this run's results
    mio.makedirs(out)
    mio.write_bytes(mio.join(out, IDENTITY_FILE), yaml.safe_dump(run.identity, sort_keys=False).encode())
    t_job = time.perf_counter()  # images/s of the pipeline itself, not of starting a local Ray
    status = _pipeline(run, inputs, checkpoint, out, opts) if run.todo else pd.DataFrame(columns=STATUS_COLUMNS)
    job_seconds = time.perf_counter() - t_job
    scores, part_errors, deduplicated = _collect(run, out)
    write_errors(out, run.listing.errors + part_errors)
    if len(scores):
        contact_sheet(out, scores, n=opts.top_n, annotations=run.annotations)
    summary, t = _summary(run, scores, part_errors, status, checkpoint, opts, seconds=time.perf_counter() - t0,
                          job_seconds=job_seconds, deduplicated=deduplicated)
    if run.annotations:
        loc = localization_summary(scores, run.ann_counts, opts.method, run.layer)
        mio.write_bytes(mio.join(out, "localization.json"), json.dumps(loc, indent=2).encode())
        summary["localization"] = {k: loc["all"].get(k) for k in ("n", "pointing_game", "energy_inside", "chance",
                                                                    "pointing_game_in_breast", "chance_in_breast")}
    mio.write_bytes(mio.join(out, "summary.json"), json.dumps(summary, indent=2).encode())
    check_nothing_lost(t, logger)
    return summary
