"""The score batch job: a probability for every image of an archive, and breast- and exam-level
results, without CAMs (``mammo-ray score``).

The archive engine (``archive.py``) with :class:`~mammo_ray.explain.actors.ScoreActor`: the
same inputs (folders, DICOM trees, manifests, ``s3://``), decode with the checkpoint's spec,
actor pool, resume and accounting as explain. Output folder::

    score.yaml              what produced the results (checkpoint sha256, threshold, inputs, tta)
    scores.parquet/         one row per image (the CAM columns of explain's schema stay null)
    breasts.parquet, exams.parquet   when the inputs say which images belong together
    errors.csv, summary.json

Nothing is written per image. ``mammo-ray explain --cam-for top:N --scores-from <this folder>``
then explains the chosen images without scoring again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from typing import Any

import yaml

from mammo_ray import io as mio
from mammo_ray.config import ScoreConfig
from mammo_ray.data.accounting import finish_job, tally
from mammo_ray.data.pipeline import write_errors
from mammo_ray.explain.actors import ScoreActor
from mammo_ray.explain.archive import (Stage, account_left, collect, done_ids, labels_summary, list_archive, plan_pool,
                                       run_pipeline, stage_seconds, threshold_of)
from mammo_ray.explain.exams import MetaWriter, fill_meta, finish_exams
from mammo_ray.explain.results import (ERROR_PARTS, META, SCORE_IDENTITY_FILE, SCORE_IDENTITY_KEYS, SCORES,
                                       check_output, score_identity)
from mammo_ray.explain.tasks import write_score_batch
from mammo_ray.models.checkpoint import load_checkpoint, read_checkpoint_bytes
from mammo_ray.outputs import finish_out, start_out

logger = logging.getLogger(__name__)


def _where_scored(status) -> dict[str, dict]:
    """The model actors and nodes that scored this run's images, and the read tasks' nodes."""
    if status is None or not len(status):
        return {"workers": {}, "nodes": {}, "preprocess_nodes": {}}
    return {"workers": dict(Counter(status["cam_worker"])), "nodes": dict(Counter(status["node_id"])),
            "preprocess_nodes": dict(Counter(status["prep_node_id"]))}


def run_score(inputs: list[str], checkpoint: str, out: str, opts: ScoreConfig | None = None, *,
              resume: bool = False, overwrite: bool = False, address: str | None = None) -> dict[str, Any]:
    """Score every input image; see the module doc for the outputs.

    Returns:
        The summary (also written to ``out/summary.json``).

    Raises:
        ValueError: bad options or checkpoint, or an output folder holding other results (all
            before any work starts).
        RuntimeError: the final accounting (one row or one error per input) fails.
        NoRowsError: every input was refused (after the outputs are written).
    """
    opts = opts or ScoreConfig()
    t0 = time.perf_counter()
    data = read_checkpoint_bytes(checkpoint)
    state = load_checkpoint(checkpoint, data=data)
    threshold, source = threshold_of(opts, state)
    listing = list_archive(list(inputs), opts, out)
    ident = score_identity(checkpoint, hashlib.sha256(data).hexdigest(), state, opts, threshold, inputs)
    resumed = check_output(out, ident, resume, file=SCORE_IDENTITY_FILE, keys=SCORE_IDENTITY_KEYS, overwrite=overwrite)
    listed = {r["image_id"] for r in listing.records}
    done = done_ids(out, SCORES, ERROR_PARTS) & listed if resumed else set()
    todo = [r for r in listing.records if r["image_id"] not in done]
    logger.info("%d inputs: %d to score, %d already done, %d refused while listing", listing.inputs, len(todo),
                len(done), len(listing.errors))
    pool = plan_pool(opts, state["spec"], address, keep_sources=False, what="score") if todo else None
    start_out(out, "score", overwrite=overwrite, resume=resume)
    mio.write_bytes(mio.join(out, SCORE_IDENTITY_FILE), yaml.safe_dump(ident, sort_keys=False).encode())
    left = account_left(out, listing, (SCORES, ERROR_PARTS, META)) if resumed else {"left": 0, "left_paths": []}
    t_job = time.perf_counter()
    stage = Stage(actor=ScoreActor, actor_kwargs={"checkpoint": checkpoint, "amp": opts.amp, "tta": opts.tta},
                  write=write_score_batch, write_kwargs={"out": out, "threshold": threshold},
                  env_paths=[*inputs, out, checkpoint])
    meta = MetaWriter(out, opts.patient_key_file)
    status = run_pipeline(todo, pool, opts, stage, on_batch=meta.write) if todo else None
    job_seconds = time.perf_counter() - t_job
    rows, errors, deduplicated = collect(out, listing.records, resumed)
    fill_meta(out, listing.records, rows, meta)
    exam_lines, exam_counts = finish_exams(out, rows, threshold)
    write_errors(out, listing.errors + errors + exam_lines)
    t = tally(listing.inputs, [r["image_id"] for r in listing.records], rows["image_id"],
              [e["image_id"] for e in errors], listing_errors=len(listing.errors))
    processed = 0 if status is None else len(status)
    summary = {
        "inputs": t.inputs, "rows": t.rows, "errors": t.errors, "balanced": t.balanced,
        "skipped_while_listing": dict(sorted(listing.skipped.items())), "processed_this_run": processed,
        "resumed": resumed, "duplicate_rows_removed": deduplicated, "skipped_as_done": len(done), **left,
        **labels_summary(listing, opts),
        "checkpoint": checkpoint, "backbone": state["backbone"], "threshold": threshold, "threshold_source": source,
        "tta": opts.tta, "predicted_malignant": int(rows["predicted_label"].sum()), "exams": exam_counts,
        **_where_scored(status),
        "stage_seconds": stage_seconds(rows), "seconds": round(time.perf_counter() - t0, 3),
        "pass_seconds": {"score_pass": round(job_seconds, 3)},
        "images_per_second": round(processed / job_seconds, 2) if processed and job_seconds > 0 else None,
    }
    mio.write_bytes(mio.join(out, "summary.json"), json.dumps(summary, indent=2).encode())
    finish_out(out, "score")
    finish_job(t, [e["reason"] for e in listing.errors + errors], logger, where=mio.join(out, "errors.csv"))
    return summary
