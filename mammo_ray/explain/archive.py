"""The archive jobs' engine, shared by ``mammo-ray score`` and ``mammo-ray explain``.

    list -> read + decode + preprocess with the checkpoint's spec (CPU tasks)
         -> the model in an actor pool (loaded once per actor; GPU when there is one)
         -> write the rows (and, for explain, the maps) as one Parquet part per batch (CPU tasks)

The two jobs differ only in their actor (``actors.py``) and their write stage (``tasks.py``):
:class:`ScoreActor` + :func:`write_score_batch` score (one forward pass, optionally with its
mirror image), the explain job's ``CamActor`` + ``write_batch`` add a CAM and its PNGs.
Reading, the pool's sizing, retries, the status rows that come back to the driver and the final
collection of committed parts are the same code here.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mammo_ray.config import ArchiveConfig, PreprocessConfig
from mammo_ray.console import Progress
from mammo_ray.data.accounting import LOST_REASON, check_listed
from mammo_ray.data.inputs import Listing, discover
from mammo_ray.data.pipeline import first_uri
from mammo_ray.outputs import check_inputs_vs_out
from mammo_ray.explain.results import ERROR_PARTS, SCORES, dedupe_parts, drop_left, read_parts
from mammo_ray.explain.tasks import META_COLUMNS, STATUS_COLUMNS, prepare_batch
from mammo_ray.ray_utils import init_ray, remote_args
from mammo_ray.resources import TASK_RETRIES, check_fits, largest_node_memory, preprocess_task_bytes

logger = logging.getLogger(__name__)

SUMMARY_SCORE_COLUMNS = ["image_id", "source_path", "label", "orig_height", "probability", "predicted_label", "overlay_path",
                         "pointing_hit", "energy_inside", "lesion_area_fraction", "cam_peak_in_breast",
                         "pointing_hit_in_breast", "lesion_area_fraction_in_breast", "warning",
                         "seconds_preprocess", "seconds_cam", "seconds_write"]
#: the paths of inputs that left which summary.json lists (all of them are counted)
MAX_LEFT_PATHS = 100


# ----------------------------------------------------------------------------- driver side
def list_archive(inputs: list[str], opts: ArchiveConfig, out: str) -> Listing:
    """The archive jobs' listing: labels read when present (``opts.labels``), never a refusal for
    a label (a word outside the vocabulary is unlabeled, counted and warned about), none read
    with ``opts.unlabeled``; ``out`` checked against every input.

    Raises:
        ValueError: an input that does not exist, an ``out`` that overlaps one, or inputs that
            list no image.
    """
    read = (getattr(opts, "annotations", None),)  # explain's lesions CSV may sit beside the images
    listing = discover(list(inputs), unlabeled=opts.unlabeled, labels_optional=True, labels=opts.labels,
                       read_elsewhere=read)
    check_inputs_vs_out(list(inputs), [r["path"] for r in listing.records], out, extra_folders=listing.linked_folders)
    check_listed(listing.inputs, list(inputs), listing.ignored)
    if listing.unknown_labels:
        words = ", ".join(f"{w!r} x {n}" for w, n in sorted(listing.unknown_labels.items(), key=lambda kv: -kv[1]))
        logger.warning("%d image(s) have a label outside the vocabulary (%s): %s; scored as unlabeled (map them with "
                       "--negative/--positive, or pass --unlabeled)", sum(listing.unknown_labels.values()),
                       opts.labels.describe(), words)
    return listing


def labels_summary(listing: Listing, opts: ArchiveConfig) -> dict[str, Any]:
    """What summary.json records of the labels: the vocabulary and the words it did not know."""
    return {"labels": opts.labels.as_dict(), "unlabeled": bool(opts.unlabeled),
            "unknown_labels": dict(sorted(listing.unknown_labels.items()))}


def account_left(out: str, listing: Listing, folders: tuple[str, ...]) -> dict[str, Any]:
    """A resume's inputs that left since the earlier run (deleted or moved): their results are
    removed (``drop_left``) and they are named in the summary (``left``, ``left_paths``) and on
    the console, and the job goes on with the inputs it lists now."""
    left = drop_left(out, {r["image_id"] for r in listing.records}, folders)
    if left:
        shown = ", ".join(r["path"] for r in left[:3])
        logger.warning("%d input(s) of the earlier run are no longer listed (deleted or moved): their results were "
                       "removed; summary.json lists them (left_paths): %s%s", len(left), shown,
                       ", ..." if len(left) > 3 else "")
    return {"left": len(left), "left_paths": [r["path"] for r in left[:MAX_LEFT_PATHS]]}


def check_pool(workers: int, gpw: float, cpus: int, gpus: float, *, autoscaling: bool) -> None:
    """The actor pool fits the cluster: on a local Ray a pool that cannot be placed (or that
    would hold every CPU, starving the tasks that feed it) would wait forever, so it is refused;
    on a cluster the autoscaler may still add nodes, so it is a warning."""
    problem = None
    if gpw > 0 and workers * gpw > gpus:
        problem = f"--workers {workers} x --gpus-per-worker {gpw:g} needs {workers * gpw:g} GPU(s), the cluster has {gpus:g}"
    elif gpw == 0 and cpus < 2:
        problem = f"a CPU-only archive job needs at least 2 CPUs (one model actor + its read/write tasks); Ray has {cpus}"
    elif gpw == 0 and workers > cpus - 1:
        problem = (f"--workers {workers} CPU actors on {cpus} CPU(s) leave none for the read/write tasks: "
                   f"use at most {cpus - 1}")
    if problem and not autoscaling:
        raise ValueError(problem)
    if problem:
        logger.warning("%s: waiting for the cluster to scale up", problem)


def threshold_of(opts: ArchiveConfig, state: dict) -> tuple[float, str]:
    """The decision threshold and where it came from: the flag, else the checkpoint's val one."""
    stored = (state.get("metrics") or {}).get("val_threshold")
    if opts.threshold is not None:
        return opts.threshold, "--threshold"
    if stored is None:
        return 0.5, "0.5 (the checkpoint has no val threshold)"
    if opts.tta != "none":
        # TTA moves the scores: training chose this threshold on plain scores. evaluate --tta
        # chooses one on val's TTA scores (metrics.json), which --threshold takes.
        logger.warning("--tta %s with the checkpoint's val threshold %.4f, chosen on scores without TTA: pass "
                       "--threshold with the one `mammo-ray evaluate --tta %s` chose (metrics.json)", opts.tta,
                       float(stored), opts.tta)
        return float(stored), "checkpoint val_threshold (Youden on val, scores without TTA)"
    return float(stored), "checkpoint val_threshold (Youden on val)"


@dataclass
class Pool:
    """The actor pool and read tasks as sized for this cluster."""

    workers: int
    gpus_per_worker: float
    cfg: PreprocessConfig


def plan_pool(opts: ArchiveConfig, spec, address: str | None, *, keep_sources: bool, what: str) -> Pool:
    """Start (or join) Ray and size the actor pool; refuse a pool or a read task that cannot fit."""
    import ray  # deferred: a run with nothing left to do (a finished --resume) starts no Ray

    init_ray(address)
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    gpw = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    # CPU-only: leave a CPU to the read/write tasks or the pool starves its own input
    workers = opts.workers or (max(1, int(gpus // gpw)) if gpw else max(1, cpus - 1))
    check_pool(workers, gpw, cpus, gpus, autoscaling=bool(address or os.environ.get("RAY_ADDRESS")))
    cfg = PreprocessConfig(spec=spec, external=True, unlabeled=True, max_file_mb=opts.max_file_mb)
    check_fits(preprocess_task_bytes(size=cfg.spec.size, dtype=cfg.spec.dtype, batch_size=opts.prep_batch_size,
                                     max_pixels=cfg.max_pixels, keep_sources=keep_sources), largest_node_memory(),
               what=f"{what}: one read task ({opts.prep_batch_size} sources of up to {cfg.max_pixels} pixels"
                    f"{', kept for the overlays' if keep_sources else ''})", hint="run on nodes with more memory")
    return Pool(workers=workers, gpus_per_worker=gpw, cfg=cfg)


@dataclass
class Stage:
    """The model stage of one pipeline: its actor class and arguments, its write task and
    arguments, and the preview size the read tasks make for it (0: none)."""

    actor: type
    actor_kwargs: dict[str, Any]
    write: Callable[..., pd.DataFrame]
    write_kwargs: dict[str, Any]
    preview_size: int = 0
    env_paths: list[str] = field(default_factory=list)
    name: str = "score"


def run_pipeline(todo: list[dict], pool: Pool, opts: ArchiveConfig, stage: Stage,
                 on_batch: Callable[[pd.DataFrame], None] | None = None) -> pd.DataFrame:
    """read + preprocess (tasks) -> the model (actor pool) -> write (tasks); the status rows.
    ``on_batch`` sees each batch of status rows as it streams back (the driver's pseudonyms)."""
    import ray  # deferred: see plan_pool

    if not todo:
        return pd.DataFrame(columns=STATUS_COLUMNS + META_COLUMNS)
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False  # see data/pipeline.py
    env = remote_args([*stage.env_paths, *first_uri(todo)])  # a local manifest may list s3:// rows
    # Ray Data retries failed tasks forever by default; max_retries has no named parameter
    # in 2.60, only the deprecated **ray_remote_args (hence the warning filter below)
    task_env = {**env, "max_retries": TASK_RETRIES}
    gpw = pool.gpus_per_worker
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / opts.prep_batch_size)))
        # a batch whose task keeps dying becomes error lines, not a failed job; this dataset's
        # own context, not the process-wide one
        ds.context.max_errored_blocks = -1
        ds = ds.map_batches(prepare_batch, batch_format="pandas", batch_size=opts.prep_batch_size,
                            fn_kwargs={"cfg": pool.cfg, "preview_size": stage.preview_size}, num_cpus=1, **task_env)
        ds = ds.map_batches(stage.actor, batch_format="pandas", batch_size=opts.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=pool.workers),
                            fn_constructor_kwargs=stage.actor_kwargs,
                            # the actor keeps Ray Data's restart/retry defaults: a node that goes
                            # away makes its actor "temporarily unavailable" several times before
                            # the restart elsewhere, and bounded retries turned those batches into
                            # errors (tests/test_cluster.py); a failing batch is retried image by
                            # image inside the actor instead
                            num_gpus=gpw, num_cpus=0 if gpw else 1, **env)
        # the writes hold no CPU of their own (bounded to one task per actor instead): with a
        # CPU each they queued behind the read tasks for the CPU the actor leaves, so on a
        # 2-CPU node no part was written, and no memory freed, until every image was read
        ds = ds.map_batches(stage.write, batch_format="pandas", batch_size=opts.batch_size, num_cpus=0,
                            concurrency=max(1, pool.workers), fn_kwargs=stage.write_kwargs, **task_env)
    frames, progress = [], Progress(stage.name, len(todo))
    for frame in ds.iter_batches(batch_format="pandas", batch_size=None):
        if on_batch is not None:
            on_batch(frame)
        frames.append(frame[STATUS_COLUMNS])
        progress.update(len(frame), int((frame["status"] != "ok").sum()))
    progress.close()
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=STATUS_COLUMNS + META_COLUMNS)


def collect(out: str, records: list[dict], resumed: bool, *, scores: str = SCORES, errors: str = ERROR_PARTS,
            columns: list[str] = SUMMARY_SCORE_COLUMNS) -> tuple[pd.DataFrame, list[dict], int]:
    """The committed rows and error lines of ``records``; an input whose every task attempt
    failed becomes an error line. Returns (rows, errors, duplicate rows a resume removed)."""
    # only a resume can meet rows a dying run was still writing; in a fresh run a duplicate is a bug
    deduplicated = dedupe_parts(out, folders=(scores, errors)) if resumed else 0
    rows = read_parts(out, scores, columns)
    part_errors = read_parts(out, errors, ["image_id", "path", "reason"])
    got = set(rows["image_id"]) | set(part_errors["image_id"])
    lost = [r for r in records if r["image_id"] not in got]
    if lost:  # their task failed every retry (worker killed for memory, a crash): errors, not a lost job
        logger.warning("%d image(s) had no result after %d attempts: listed in errors.csv", len(lost), TASK_RETRIES + 1)
    return rows, part_errors.to_dict("records") + [{"path": r["path"], "image_id": r["image_id"], "reason": LOST_REASON}
                                                  for r in lost], deduplicated


def done_ids(out: str, *folders: str) -> set[str]:
    """Image ids with a committed row in any of ``folders``."""
    ids: set[str] = set()
    for folder in folders:
        ids |= set(read_parts(out, folder, ["image_id"])["image_id"])
    return ids


def stage_seconds(rows: pd.DataFrame) -> dict[str, float]:
    """Per-stage seconds summed over the committed rows: where an archive job spends its time."""
    out = {}
    for col, name in (("seconds_preprocess", "decode_preprocess"), ("seconds_cam", "model"), ("seconds_write", "write")):
        if col in rows:
            out[name] = round(float(pd.to_numeric(rows[col], errors="coerce").fillna(0).sum()), 3)
    return out
