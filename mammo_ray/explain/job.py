"""The explain batch job: score and Grad-CAM the images of an archive with Ray Data.

The engine is the archive jobs' (``archive.py``): read + preprocess tasks, the model in an
actor pool, write tasks. Here the actor also computes the CAM and the write stage maps it back
to the source geometry and writes its PNGs. ``--cam-for`` chooses the images that get a CAM:

- ``all``: one pass, a CAM for every image (the CAM's forward pass gives the score);
- ``positive`` / ``top:N``: a scoring pass over every image (or the rows of a finished
  ``mammo-ray score`` run, ``--scores-from``), then a CAM pass over the images at or above the
  threshold, or the N highest; their rows are merged into ``scores.parquet`` at the end.

Output folder::

    explain.yaml            what produced the results (checkpoint sha256, method, layer, inputs...)
    scores.parquet/         a Parquet dataset, one row per image (CAM columns null without a CAM)
    breasts.parquet, exams.parquet   breast- and exam-level results (``exams.py``)
    heatmaps/ab/<id>.png    16-bit CAM in [0, 1] at the source image's geometry
    overlays/ab/<id>.png    CAM over the source image at the preview size
    overview.png            the highest-scoring overlays on one sheet
    errors.csv, summary.json, localization.json (when annotations are given)

Nothing is lost and nothing is done twice: a batch's Parquet part is written last and is its
commit; ``--resume`` skips every image that already has a row (and its ``_meta`` keys) or an
error, a retried task rewrites its own part (named by a hash of its image ids), and the job
ends by checking that every input has exactly one row or one error. File names are image ids
(a hash of the source path), never patient identifiers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mammo_ray import io as mio
from mammo_ray.config import ExplainConfig, parse_cam_for
from mammo_ray.data.accounting import Tally, finish_job, tally
from mammo_ray.data.parquet import write_table
from mammo_ray.data.inputs import Listing
from mammo_ray.data.pipeline import write_errors
from mammo_ray.explain.actors import CamActor, ScoreActor
from mammo_ray.explain.archive import (Pool, Stage, account_left, collect, done_ids, labels_summary, list_archive,
                                       plan_pool, run_pipeline, stage_seconds, threshold_of)
from mammo_ray.explain.cam import check_target_layer, resolve_target_layer
from mammo_ray.explain.exams import MetaWriter, fill_meta, finish_exams
from mammo_ray.explain.lesions import load_annotations, localization_summary
from mammo_ray.explain.render import contact_sheet
from mammo_ray.explain.results import (CAM_ERROR_PARTS, CAMS, ERROR_PARTS, IDENTITY_FILE, META, SCORE_SCHEMA, SCORES,
                                       check_output, identity, import_scores, part_paths, read_parts)
from mammo_ray.explain.tasks import STATUS_COLUMNS, write_batch, write_score_batch
from mammo_ray.models.checkpoint import load_checkpoint, read_checkpoint_bytes
from mammo_ray.outputs import finish_out, start_out

logger = logging.getLogger(__name__)

NO_CAM = "no CAM: "
SCORE_PASS_COLUMNS = ["probability", "predicted_label", "threshold"]


# ----------------------------------------------------------------------------- the Ray stages
# ----------------------------------------------------------------------------- driver side
@dataclass
class _Run:
    """What the checks settled before any work: the listing, what is left to score, the
    threshold and layer, the identity file's content and (when there is work) the actor pool."""

    listing: Listing
    todo: list[dict]
    state: dict[str, Any]
    layer: str
    threshold: float
    threshold_source: str
    identity: dict[str, Any]
    resumed: bool
    cam_for: tuple[str, int | None] = ("all", None)
    annotations: dict[str, list[dict]] = field(default_factory=dict)
    ann_counts: dict[str, int] = field(default_factory=dict)
    pool: Pool | None = None


def _plan(inputs: list[str], checkpoint: str, out: str, opts: ExplainConfig, resume: bool, overwrite: bool) -> _Run:
    """Every check that can refuse the run, before the output folder is touched."""
    data = read_checkpoint_bytes(checkpoint)  # read once: loaded and hashed from the same bytes
    state = load_checkpoint(checkpoint, data=data)
    layer = resolve_target_layer(state["backbone"], opts.target_layer)
    check_target_layer(state, layer, opts.method)
    threshold, source = threshold_of(opts, state)
    listing = list_archive(list(inputs), opts, out)
    ident = identity(checkpoint, hashlib.sha256(data).hexdigest(), state, opts, layer, threshold, inputs)
    run = _Run(listing=listing, todo=listing.records, state=state, layer=layer, threshold=threshold,
               threshold_source=source, identity=ident, resumed=check_output(out, ident, resume, overwrite=overwrite),
               cam_for=parse_cam_for(opts.cam_for))
    if opts.scores_from and run.cam_for[0] == "all":
        raise ValueError(f"--scores-from {opts.scores_from}: only with --cam-for positive or top:N (with all, the "
                         "CAM pass scores every image itself)")
    if opts.scores_from:
        import_scores(opts.scores_from, out, ident, dry_run=True)
    if opts.annotations:
        run.annotations, run.ann_counts = load_annotations(opts.annotations, listing.records, list(inputs))
    if run.resumed:
        done = done_ids(out, SCORES, ERROR_PARTS)
        run.todo = [r for r in listing.records if r["image_id"] not in done]
    logger.info("%d inputs: %d to score, %d already done, %d refused while listing", listing.inputs, len(run.todo),
                len(listing.records) - len(run.todo), len(listing.errors))
    return run


def _cam_stage(run: _Run, checkpoint: str, out: str, opts: ExplainConfig, inputs: list[str], *,
               into: tuple[str, str] = (SCORES, ERROR_PARTS)) -> Stage:
    return Stage(actor=CamActor, actor_kwargs={"checkpoint": checkpoint, "method": opts.method,
                                               "target_layer": run.layer, "amp": opts.amp,
                                               "tta": opts.tta},
                 write=write_batch, write_kwargs={"out": out, "threshold": run.threshold,
                                                  "preview_size": opts.preview_size,
                                                  "heatmap_max_side": opts.heatmap_max_side,
                                                  "annotations": run.annotations,
                                                  "within_breast": opts.cam_within_breast,
                                                  "scores": into[0], "errors_folder": into[1]},
                 preview_size=opts.preview_size, name="explain" if into[0] == SCORES else "explain: CAMs",
                 env_paths=[*inputs, out, checkpoint, *([opts.annotations] if opts.annotations else [])])


def _cam_todo(run: _Run, out: str) -> list[dict]:
    """--cam-for positive|top:N: the images to explain, from every image's committed score,
    less those a previous attempt already explained (or failed to)."""
    kind, n = run.cam_for
    s = read_parts(out, SCORES, ["image_id", "probability"])
    if kind == "positive":
        chosen = s[s["probability"] >= run.threshold]["image_id"]
    else:  # the N highest; ties by image id, so a resume chooses the same images
        chosen = s.sort_values(["probability", "image_id"], ascending=[False, True]).head(n)["image_id"]
    done, by_id = done_ids(out, CAMS, CAM_ERROR_PARTS), {r["image_id"]: r for r in run.listing.records}
    return [by_id[i] for i in chosen if i not in done and i in by_id]


def merge_cams(out: str) -> tuple[int, int]:
    """The CAM pass's rows replace their images' score rows in ``scores.parquet``; an image whose
    CAM failed keeps its score row, with the reason in its warning. Rewrites only the parts that
    hold such images; running it again changes nothing. Returns (images with a CAM, failed)."""
    cams = read_parts(out, CAMS, list(SCORE_SCHEMA.names)).drop_duplicates("image_id").set_index("image_id")
    failed = dict(read_parts(out, CAM_ERROR_PARTS, ["image_id", "reason"]).itertuples(index=False))
    for path in part_paths(out, SCORES) if len(cams) or failed else []:
        fs, inner = mio.resolve(path)
        df = pq.read_table(inner, filesystem=fs).to_pandas()
        hit = df["image_id"].isin(cams.index) & df["heatmap_path"].isna()
        bad = df["image_id"].isin(failed.keys()) & ~df["warning"].fillna("").str.contains(NO_CAM, regex=False)
        if not (hit.any() or bad.any()):
            continue
        df.loc[bad, "warning"] = ["; ".join(x for x in (w, NO_CAM + failed[i]) if x)
                                  for w, i in zip(df.loc[bad, "warning"].fillna(""), df.loc[bad, "image_id"], strict=True)]
        # the CAM's columns; the score stays the scoring pass's (the one --cam-for chose by)
        merged = cams.loc[df.loc[hit, "image_id"]].reset_index()
        kept = df.loc[hit, ["image_id", *SCORE_PASS_COLUMNS]].set_index("image_id").loc[merged["image_id"]]
        for col in SCORE_PASS_COLUMNS:
            merged[col] = kept[col].to_numpy()
        df = pd.concat([df[~hit], merged], ignore_index=True)
        write_table(pa.Table.from_pandas(df[list(SCORE_SCHEMA.names)], schema=SCORE_SCHEMA, preserve_index=False), path)
    return len(cams), len(failed)


def _passes(run: _Run, inputs: list[str], checkpoint: str, out: str, opts: ExplainConfig,
            meta: MetaWriter) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """The pipeline passes: one CAM pass over everything (--cam-for all), or a score pass then a
    CAM pass over the chosen images. Returns (score pass statuses, CAM pass statuses, seconds
    per pass)."""
    t0 = time.perf_counter()
    if run.cam_for[0] == "all":
        status = run_pipeline(run.todo, run.pool, opts, _cam_stage(run, checkpoint, out, opts, inputs),
                              on_batch=meta.write) if run.todo else None
        return status, status, {"cam_pass": round(time.perf_counter() - t0, 3)}
    score = Stage(actor=ScoreActor, actor_kwargs={"checkpoint": checkpoint, "amp": opts.amp, "tta": opts.tta},
                  write=write_score_batch, write_kwargs={"out": out, "threshold": run.threshold},
                  env_paths=[*inputs, out, checkpoint], name="explain: scores")
    scored = run_pipeline(run.todo, run.pool, opts, score, on_batch=meta.write) if run.todo else None
    t1 = time.perf_counter()
    todo = _cam_todo(run, out)
    logger.info("--cam-for %s: %d image(s) to explain", opts.cam_for, len(todo))
    cams = run_pipeline(todo, run.pool, opts, _cam_stage(run, checkpoint, out, opts, inputs,
                                                         into=(CAMS, CAM_ERROR_PARTS))) if todo else None
    merge_cams(out)
    return scored, cams, {"score_pass": round(t1 - t0, 3), "cam_pass": round(time.perf_counter() - t1, 3)}


def _summary(run: _Run, rows: pd.DataFrame, errors: list[dict], scored: pd.DataFrame | None,
             cammed: pd.DataFrame | None, checkpoint: str, opts: ExplainConfig, *, seconds: float,
             passes: dict[str, float], deduplicated: int) -> tuple[dict, Tally]:
    listing = run.listing
    scored = scored if scored is not None else pd.DataFrame(columns=STATUS_COLUMNS)
    cammed = cammed if cammed is not None else pd.DataFrame(columns=STATUS_COLUMNS)
    t = tally(listing.inputs, [r["image_id"] for r in listing.records], rows["image_id"],
              [e["image_id"] for e in errors], listing_errors=len(listing.errors))
    busy = sum(passes.values())
    summary = {
        "inputs": t.inputs, "rows": t.rows, "errors": t.errors,
        "skipped_while_listing": dict(sorted(listing.skipped.items())), "balanced": t.balanced,
        "processed_this_run": len(scored), "resumed": run.resumed, "duplicate_rows_removed": deduplicated,
        "skipped_as_done": len(listing.records) - len(run.todo),
        "checkpoint": checkpoint, "backbone": run.state["backbone"], "method": opts.method, "target_layer": run.layer,
        "threshold": run.threshold, "threshold_source": run.threshold_source, "tta": opts.tta,
        "cam_for": opts.cam_for,
        "scores_from": opts.scores_from,
        "cams": int(rows["overlay_path"].notna().sum()), "cams_this_run": len(cammed),
        "cam_failed": int(rows["warning"].fillna("").str.contains(NO_CAM, regex=False).sum()),
        "predicted_malignant": int(rows["predicted_label"].sum()),
        # a peak on a removed label, film edge or the padding: the map explains no anatomy
        "cam_peaks_outside_breast": int((rows["cam_peak_in_breast"] == False).sum()),  # noqa: E712 (nullable)
        "cam_nodes": dict(Counter(cammed["node_id"])), "preprocess_nodes": dict(Counter(scored["prep_node_id"])),
        # node/pid/gpus=<CUDA_VISIBLE_DEVICES>/device of each model actor -> images it explained
        "cam_workers": dict(Counter(cammed["cam_worker"])),
        "stage_seconds": stage_seconds(rows),
        "seconds": round(seconds, 3),
        # the pipeline passes' wall time; the rest of "seconds" is planning and the tables after
        "pass_seconds": passes,
        "images_per_second": round(len(scored) / busy, 2) if len(scored) and busy > 0 else None,
    }
    if opts.annotations:
        summary["annotations"] = run.ann_counts  # matched images, lesions, unmatched and ambiguous rows
    return summary, t


def run_explain(inputs: list[str], checkpoint: str, out: str, opts: ExplainConfig | None = None, *,
                resume: bool = False, overwrite: bool = False, address: str | None = None) -> dict[str, Any]:
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
    run = _plan(inputs, checkpoint, out, opts, resume, overwrite)
    meta = MetaWriter(out, opts.patient_key_file)
    # a finished --resume starts no Ray; a CAM pass may be left after a finished score pass
    if run.todo or (run.cam_for[0] != "all" and (not run.resumed or _cam_todo(run, out))):
        run.pool = plan_pool(opts, run.state["spec"], address, keep_sources=True, what="explain")
    # every check passed: from here on the folder holds this run's results
    start_out(out, "explain", overwrite=overwrite, resume=resume)
    mio.write_bytes(mio.join(out, IDENTITY_FILE), yaml.safe_dump(run.identity, sort_keys=False).encode())
    left = (account_left(out, run.listing, (SCORES, ERROR_PARTS, META, CAMS, CAM_ERROR_PARTS)) if run.resumed
            else {"left": 0, "left_paths": []})
    if opts.scores_from:
        import_scores(opts.scores_from, out, run.identity)
        done = done_ids(out, SCORES, ERROR_PARTS)
        run.todo = [r for r in run.todo if r["image_id"] not in done]
    scored, cammed, passes = _passes(run, inputs, checkpoint, out, opts, meta)
    rows, part_errors, deduplicated = collect(out, run.listing.records, run.resumed or bool(opts.scores_from))
    fill_meta(out, run.listing.records, rows, meta)
    exam_lines, exam_counts = finish_exams(out, rows, run.threshold)
    write_errors(out, run.listing.errors + part_errors + exam_lines)
    if rows["overlay_path"].notna().any():
        contact_sheet(out, rows[rows["overlay_path"].notna()], n=opts.top_n, annotations=run.annotations)
    summary, t = _summary(run, rows, part_errors, scored, cammed, checkpoint, opts, seconds=time.perf_counter() - t0,
                          passes=passes, deduplicated=deduplicated)
    summary.update(exams=exam_counts, **left, **labels_summary(run.listing, opts))
    if run.annotations:
        loc = localization_summary(rows, run.ann_counts, opts.method, run.layer)
        mio.write_bytes(mio.join(out, "localization.json"), json.dumps(loc, indent=2).encode())
        summary["localization"] = {k: loc["all"].get(k) for k in ("n", "pointing_game", "energy_inside", "chance",
                                                                    "pointing_game_in_breast", "chance_in_breast")}
    mio.write_bytes(mio.join(out, "summary.json"), json.dumps(summary, indent=2).encode())
    finish_out(out, "explain")
    finish_job(t, [e["reason"] for e in run.listing.errors + part_errors], logger, where=mio.join(out, "errors.csv"))
    return summary
