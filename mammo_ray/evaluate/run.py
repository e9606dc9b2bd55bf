"""The evaluation stage: best checkpoints on the test split and on external sets.

The decision threshold is chosen on the validation split of the training data and applied
unchanged to test and external sets. Every external set is read (or, when given as raw
images, preprocessed) with the spec stored in the checkpoint, so a model never sees pixels
prepared differently from its training data.
"""
from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import logging
import os
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from mammo_ray import io as mio
from mammo_ray.config import EvaluateConfig, LabelMap, PreprocessConfig, to_dict
from mammo_ray.data.arrays import load_split
from mammo_ray.data.parquet import SPLIT_DIRS, read_spec, read_split, split_files
from mammo_ray.data.pipeline import run_preprocess
from mammo_ray.evaluate.compare import compare_to_chosen, mean_scores
from mammo_ray.evaluate.inference import score_split
from mammo_ray.evaluate.metrics import evaluate_set
from mammo_ray.metrics import aggregate
from mammo_ray.evaluate.report import chosen_by_val, write_report
from mammo_ray.metrics import choose_threshold
from mammo_ray.models.checkpoint import load_checkpoint
from mammo_ray.models.inference import load_for_inference, predict
from mammo_ray.outputs import check_out_location, finish_out, start_out

logger = logging.getLogger(__name__)


def _has_parquet(folder: str) -> bool:
    return any(split_files(folder, s) for s in SPLIT_DIRS)


def sweep_checkpoints(sweep_dir: str) -> list[str]:
    """Every group's best checkpoint of a sweep (``best/<backbone>-r<ratio>/checkpoint.pt``)."""
    best = mio.join(sweep_dir, "best")
    if not mio.exists(best):
        raise ValueError(f"--sweep {sweep_dir}: no best/ folder (not a finished `mammo-ray tune` output)")
    found = sorted(p for p, _ in mio.list_files(best) if p.endswith("checkpoint.pt") and "/overall/" not in p)
    if not found:
        raise ValueError(f"--sweep {sweep_dir}: best/ holds no group checkpoints")
    return found


#: spec fields that do not make pixels: the checkpoint's recorded normalisation is applied to
#: every set, whatever mean/std the set's own spec names
NOT_PIXELS = ("mean", "std")


def _check_spec(folder: str, spec, ckpt: str, allow_mismatch: bool) -> str | None:
    data_spec = read_spec(folder)
    diff = {k: (v, getattr(data_spec, k)) for k, v in to_dict(spec).items()
            if k not in NOT_PIXELS and to_dict(data_spec)[k] != v}
    if not diff:
        return None
    message = (f"{folder} was preprocessed with another spec than checkpoint {ckpt}: "
               + ", ".join(f"{k} {b!r} (data) vs {a!r} (checkpoint)" for k, (a, b) in diff.items()))
    if not allow_mismatch:
        raise ValueError(message + "; re-preprocess it or pass --allow-spec-mismatch")
    logger.warning("%s (allowed by --allow-spec-mismatch)", message)
    return message


def prepare_external(path: str, spec, out: str, name: str,
                     cache: dict[tuple[str, str], str] | None = None, labels: LabelMap | None = None) -> tuple[str, str]:
    """An external set as a Parquet folder made with ``spec``: used as is when it already is
    one (checked later), otherwise preprocessed into ``out/preprocessed/<name>`` (the first
    spec) or ``<name>-<spec hash>`` (another spec). ``cache`` maps (path, spec) to what this
    run already preprocessed, so a sweep's checkpoints, which share one spec, preprocess each
    external set once, not once per checkpoint. ``labels``: how its raw labels read (the default
    vocabulary when None)."""
    if mio.is_dir(path) and _has_parquet(path):
        return path, "preprocessed folder"
    how = "preprocessed here with the checkpoint's spec"
    cache = {} if cache is None else cache
    key = (path, spec_digest(spec))
    if key in cache:
        return cache[key], how
    taken = set(cache.values())
    dest = mio.join(out, "preprocessed", name)
    if dest in taken:
        dest = f"{dest}-{key[1]}"
    cfg = PreprocessConfig(spec=spec, external=True, labels=labels)
    summary = run_preprocess([path], dest, cfg, overwrite=True)
    if summary["rows"] == 0:
        raise ValueError(f"--external {path}: no image could be preprocessed (see {dest}/errors.csv)")
    cache[key] = dest
    return dest, how


def spec_digest(spec) -> str:
    """A short, stable name for a preprocessing spec (its fields as sorted JSON)."""
    return hashlib.sha256(json.dumps(to_dict(spec), sort_keys=True, default=str).encode()).hexdigest()[:8]


def _split_arrays(folder: str, split: str):
    arrays = load_split(folder, split)
    meta = read_split(folder, split, columns=["image_id", "laterality", "view"]).to_pylist()
    return arrays, meta


def per_image_groups_reason(groups: list | None, *, min_images: int = 10) -> str | None:
    """A warning when the patient keys look per image: every key holds one image in a set of
    ``min_images`` or more. CBIS-style DICOM headers put one PatientID on each image
    (``Mass-Test_P_00173_LEFT_CC``), so "patients resampled" would resample images and the
    breast and exam aggregates would equal the image ones."""
    if not groups or len(groups) < min_images:
        return None
    keys = [g for g in groups if g is not None]
    if len(keys) < min_images or len(set(keys)) < len(keys):
        return None
    return (f"every one of the {len(keys)} patient keys holds a single image: they look per-image (CBIS-style "
            "PatientIDs), so the bootstrap resamples images and breast/exam results equal image ones; give a "
            "manifest with a patient_id column that names patients")


def _set_result(labels: np.ndarray, scores: np.ndarray, groups: list, meta: list[dict], *, threshold: float,
                n_boot: int, seed: int) -> dict[str, Any]:
    if (labels < 0).any():
        return {"metrics": None, "reason": f"{int((labels < 0).sum())} of {len(labels)} images have no label: "
                                          "scores written, metrics skipped", "n": int(len(labels))}
    groups_or_none = groups if any(g is not None for g in groups) else None
    res = evaluate_set(labels, scores, threshold=threshold, groups=groups_or_none, n_boot=n_boot, seed=seed)
    if res.get("small_sample"):
        logger.warning("%s", res["small_sample"])
    res["grouping_warning"] = per_image_groups_reason(groups_or_none)
    if res["grouping_warning"]:
        logger.warning("%s", res["grouping_warning"])
    levels = {}
    if groups_or_none and any(m.get("laterality") for m in meta):
        breast_keys = [(g, m.get("laterality")) if g is not None and m.get("laterality") else None
                       for g, m in zip(groups, meta, strict=True)]
        for level, keys in (("breast", breast_keys), ("exam", list(groups))):
            for how in ("max", "mean"):
                lab, sc, _ = aggregate(labels, scores, keys, how=how)
                if len(lab):
                    levels[f"{level}_{how}"] = evaluate_set(lab, sc, threshold=threshold, n_boot=0, seed=seed)["metrics"]
    res["aggregated"] = levels
    return res


@dataclass
class Scored:
    """A checkpoint's (or an ensemble's) scores, kept in memory for the ensemble and the paired
    comparisons; metrics.json holds the metrics, the scores CSVs the probabilities."""

    val: tuple  # (image_ids, labels, scores, patient_keys) of val
    sets: dict[str, tuple] = field(default_factory=dict)  # set name -> the same for that set
    meta: dict[str, list[dict]] = field(default_factory=dict)  # set name -> each image's laterality and view


def evaluate_checkpoint(ckpt: str, *, data: str, externals: list[str], out: str, cfg: EvaluateConfig,
                        prepared: dict[tuple[str, str], str] | None = None, taken: dict[str, str] | None = None
                        ) -> tuple[dict[str, Any], Scored]:
    """Scores, threshold (on val) and metrics of one checkpoint on test and every external set.
    ``prepared``: external sets already preprocessed by this run, by (path, spec digest);
    ``taken``: the run's earlier checkpoints by tag (the new one is added), kept distinct.
    Returns (the checkpoint's metrics.json entry, its scores)."""
    loaded = load_for_inference(ckpt)
    state, spec, model, device = loaded.state, loaded.spec, loaded.model, loaded.device
    notes = []
    mismatch = _check_spec(data, spec, ckpt, cfg.allow_spec_mismatch)
    if mismatch:
        notes.append(mismatch)
    if not split_files(data, "val") or not split_files(data, "test"):
        raise ValueError(f"--data {data}: needs val/ (to choose the threshold) and test/ splits")
    val, _ = _split_arrays(data, "val")
    val_scores = predict(model, val, norm=loaded.norm, device=device, batch_size=cfg.batch_size, tta=cfg.tta)
    thr = choose_threshold(val.labels, val_scores, method=cfg.threshold_method,
                           target_sensitivity=cfg.target_sensitivity)
    sets: dict[str, dict[str, Any]] = {}
    sources = [("test", data, "test", "training data's test split")]
    for path in externals:
        name = external_set_name(path)
        folder, how = prepare_external(path, spec, out, name, prepared, labels=cfg.labels)
        split = "external" if split_files(folder, "external") else next(s for s in SPLIT_DIRS if split_files(folder, s))
        sources.append((name, folder, split, how))
    tag = _checkpoint_tag(state, ckpt, taken if taken is not None else {})
    scored = Scored(val=(val.image_ids, val.labels, val_scores, val.patient_keys))
    for name, folder, split, how in sources:
        if folder != data:
            mismatch = _check_spec(folder, spec, ckpt, cfg.allow_spec_mismatch)
            if mismatch:
                notes.append(mismatch)
        arrays, meta = _split_arrays(folder, split)
        scores = score_split(model, arrays, norm=loaded.norm, device=device, checkpoint=ckpt, folder=folder, split=split,
                             distributed=cfg.distributed, batch_size=cfg.batch_size, tta=cfg.tta)
        _write_scores(mio.join(out, "scores", tag, f"{name}.csv"), arrays, scores, thr["threshold"])
        res = _set_result(arrays.labels, scores, arrays.patient_keys, meta, threshold=thr["threshold"],
                          n_boot=cfg.n_boot, seed=cfg.seed)
        res.update({"source": folder, "split": split, "how": how})
        scored.sets[name], scored.meta[name] = (arrays.image_ids, arrays.labels, scores, arrays.patient_keys), meta
        sets[name] = res
    return {"checkpoint": ckpt, "tag": tag, "backbone": state["backbone"], "freeze_ratio": state["freeze_ratio"],
            "epoch": state["epoch"], "train_metrics": state["metrics"], "spec": state["spec"],
            "normalization": loaded.norm.to_dict(),
            "threshold": {**thr, "chosen_on": "val", "n_val": int(len(val))}, "sets": sets, "notes": notes}, scored


def external_set_name(path: str) -> str:
    """``external-<name>``: a folder's own name; a manifest is named after its folder
    (``films/labels.csv`` -> ``external-films``), not after the CSV (``external-labels.csv``)."""
    norm = os.path.normpath(path.rstrip("/"))
    base = os.path.basename(norm)
    if base.lower().endswith(".csv"):
        folder = os.path.basename(os.path.dirname(norm))
        stem = base[:-4]
        base = folder if stem.lower() in ("labels", "manifest", "index", "images") and folder else (
            f"{folder}-{stem}" if folder else stem)
    return "external-" + base


def _checkpoint_tag(state: dict[str, Any], path: str, taken: dict[str, str]) -> str:
    """The checkpoint's folder name (``efficientnet_lite0-r0.5``), or its backbone and ratio, kept
    distinct from ``taken`` (tag -> path; the new one is added): the tag names the checkpoint's
    scores folder and figures, and two sweeps' ``best/<group>/checkpoint.pt`` share the folder
    name (the second one's scores used to overwrite the first's). A repeated tag is prefixed with
    the nearest folder where the two paths differ (``sweep-random_efficientnet_lite0-r0.5``), or
    suffixed with the file's name (``runs_b`` for ``runs/b.pt`` after ``runs/a.pt``), else a number."""
    norm = os.path.abspath(path)
    parts = norm.split(os.sep)
    has_dir = os.path.dirname(os.path.normpath(path)) and parts[-2]  # not cwd, not the root
    base = parts[-2] if has_dir else f"{state['backbone']}-r{state['freeze_ratio']:g}"
    tag = base
    if tag in taken:
        other = taken[tag].split(os.sep)
        if parts[-1] != other[-1]:
            tag = f"{base}_{os.path.splitext(parts[-1])[0]}"
        else:
            tag = next((f"{a}_{base}" for a, b in zip(parts[-3::-1], other[-3::-1], strict=False) if a != b), base)
    return _claim(tag, base, norm, taken)


def _claim(tag: str, base: str, path: str, taken: dict[str, str]) -> str:
    """``tag``, or ``base-2``, ``base-3``... when it is taken; recorded in ``taken`` with ``path``."""
    n = 2
    while tag in taken:
        tag, n = f"{base}-{n}", n + 1
    taken[tag] = path
    return tag


def ensemble_result(results: list[dict[str, Any]], scored: list[Scored], *, out: str, cfg: EvaluateConfig,
                    taken: dict[str, str]) -> tuple[dict[str, Any], Scored]:
    """The mean of the checkpoints' probabilities evaluated as one model (``--ensemble``): its
    threshold chosen on val from the mean val scores, its val AUC from them (so it can be the
    checkpoint chosen on val), every set scored, written and aggregated (breast, exam) as a
    checkpoint's are."""
    v_ids, v_labels, v_scores, v_groups = mean_scores([sc.val for sc in scored], "val")
    thr = choose_threshold(v_labels, v_scores, method=cfg.threshold_method, target_sensitivity=cfg.target_sensitivity)
    tag = _claim("ensemble", "ensemble", "", taken)
    sets, ens = {}, Scored(val=(v_ids, v_labels, v_scores, v_groups))
    for name in scored[0].sets:
        ids, labels, scores, groups = mean_scores([sc.sets[name] for sc in scored], name)
        # in the first member's image order (mean_scores keeps it), so its laterality and view fit
        ens.sets[name], ens.meta[name] = (ids, labels, scores, groups), scored[0].meta[name]
        arrays = SimpleNamespace(image_ids=ids, labels=labels)
        _write_scores(mio.join(out, "scores", tag, f"{name}.csv"), arrays, scores, thr["threshold"])
        res = _set_result(labels, scores, groups, ens.meta[name], threshold=thr["threshold"], n_boot=cfg.n_boot,
                          seed=cfg.seed)
        res.update({"source": "mean of the members' scores", "split": results[0]["sets"][name]["split"],
                    "how": "mean of the checkpoints' probabilities"})
        sets[name] = res
    ratios = {float(r["freeze_ratio"]) for r in results}
    val_auc = float(roc_auc_score(v_labels, v_scores)) if len(set(v_labels.tolist())) == 2 else None
    return ({"checkpoint": f"mean of {len(results)} checkpoints", "tag": tag, "members": [r["tag"] for r in results],
             "backbone": "+".join(sorted({r["backbone"] for r in results})),
             "freeze_ratio": ratios.pop() if len(ratios) == 1 else None, "epoch": None,
             "train_metrics": {"val_auc": val_auc},
             "spec": results[0]["spec"] if all(r["spec"] == results[0]["spec"] for r in results) else
             "the members' own (they differ)",
             "threshold": {**thr, "chosen_on": "val", "n_val": int(len(v_ids))}, "sets": sets,
             "notes": [f"ensemble: the mean probability of {', '.join(r['tag'] for r in results)}"]}, ens)


def _write_scores(path: str, arrays, scores: np.ndarray, threshold: float) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image_id", "label", "probability", "predicted_label"])
    for iid, lab, s in zip(arrays.image_ids, arrays.labels, scores, strict=True):
        w.writerow([iid, int(lab), f"{float(s):.6f}", int(s >= threshold)])
    mio.write_bytes(path, buf.getvalue().encode())


def run_evaluate(checkpoints: list[str], *, data: str, externals: list[str], out: str,
                 cfg: EvaluateConfig | None = None, overwrite: bool = False, **overrides: Any) -> dict[str, Any]:
    """Evaluate every checkpoint; write ``metrics.json``, ``report.md``, ``report.html`` and figures.
    ``overrides``: EvaluateConfig fields (``n_boot=200``...) on top of ``cfg``; ``overwrite``:
    replace an earlier evaluation in ``out`` (see :func:`mammo_ray.outputs.claim_out`)."""
    cfg = replace(cfg, **overrides) if cfg is not None else EvaluateConfig.load(None, **overrides)
    if not checkpoints:
        raise ValueError("no checkpoint to evaluate: give --checkpoint PATH... or --sweep DIR")
    if cfg.ensemble and len(checkpoints) < 2:
        raise ValueError(f"--ensemble needs 2 or more checkpoints; got {len(checkpoints)}")
    for e in externals:
        if not mio.exists(e):
            raise ValueError(f"--external {e} does not exist")
    check_out_location(out, folders=[data, *(e for e in externals if mio.is_dir(e))],
                       files=[*(e for e in externals if not mio.is_dir(e)), *checkpoints])
    for c in checkpoints:
        # every checkpoint checked (stored values, weights against backbone) before the output
        # folder is claimed or any set is scored; each is loaded again, one at a time, to score
        load_checkpoint(c)
    start_out(out, "evaluate", overwrite=overwrite)
    prepared: dict[tuple[str, str], str] = {}  # each external set preprocessed once per spec
    taken: dict[str, str] = {}
    evaluated = [evaluate_checkpoint(c, data=data, externals=externals, out=out, cfg=cfg, prepared=prepared,
                                     taken=taken) for c in checkpoints]
    results, scored = [r for r, _ in evaluated], [sc for _, sc in evaluated]
    if cfg.ensemble:
        ens, ens_scored = ensemble_result(results, scored, out=out, cfg=cfg, taken=taken)
        results, scored = [*results, ens], [*scored, ens_scored]
    comparisons = compare_to_chosen(results, [sc.sets for sc in scored], chosen_by_val({"checkpoints": results}),
                                    n_boot=cfg.n_boot, seed=cfg.seed)
    report = {"data": data, "externals": externals, "tta": cfg.tta,
              # how raw external sets' labels were read (preprocessed sets carry their own preprocess.yaml's)
              "labels": cfg.labels.as_dict(), "checkpoints": results, "comparisons": comparisons}
    mio.write_bytes(mio.join(out, "metrics.json"), json.dumps(report, indent=2, default=_json_default).encode())
    write_report(report, out)
    finish_out(out, "evaluate")
    return report


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")
