"""The subcommands that apply a trained checkpoint: ``evaluate`` (test split and external sets,
with a report), ``score`` and ``explain`` (Ray Data batch jobs over an image archive). As in
:mod:`mammo_ray.cli.commands`, each flag's default comes from the stage's config dataclass and
the stages' modules are imported inside the ``_run_*`` functions (no torch or Ray for --help)."""
from __future__ import annotations

import argparse
import json
import os

from mammo_ray.cli.options import (Deprecated, Renamed, add_defaults_to_help, add_label_options, config_overrides,
                                   finite_float, label_overrides)
from mammo_ray.config import (CAM_FOR_FORMS, CAM_METHODS, DISTRIBUTED_MODES, THRESHOLD_METHODS, TTA_MODES,
                              EvaluateConfig, ExplainConfig, ScoreConfig)


def _add_evaluate(sub) -> None:
    d = EvaluateConfig()
    p = sub.add_parser("evaluate", help="evaluate checkpoints on the test split and external sets, with a report")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", help="checkpoint file(s)")
    src.add_argument("--sweep", nargs="+", help="`mammo-ray tune` output(s): every group's best checkpoint")
    p.add_argument("--data", required=True, help="the preprocessed training data (val/ for the threshold, test/)")
    p.add_argument("--external", nargs="*", default=[], help="external sets: preprocessed folders or raw images")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="YAML file of EvaluateConfig keys (flags override it)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run of this stage in --out (only files it wrote)")
    p.add_argument("--threshold-method", choices=THRESHOLD_METHODS,
                   help="how the decision threshold is chosen on val (fixed: 0.5)")
    p.add_argument("--threshold", action=Renamed, hint="evaluate's threshold rule is now --threshold-method "
                   f"({', '.join(THRESHOLD_METHODS)}); a probability threshold is explain's --threshold")
    p.add_argument("--target-sensitivity", type=finite_float, help="the sensitivity --threshold-method sensitivity reaches")
    p.add_argument("--allow-spec-mismatch", action="store_true", default=None,
                   help="evaluate a checkpoint on data preprocessed with another pixel spec (size, equalization, "
                        "normalization) than it was trained on, with a warning, instead of refusing it")
    p.add_argument("--n-boot", type=int, help="bootstrap replicates for the CIs")
    p.add_argument("--batch-size", type=int, help="images per model batch")
    p.add_argument("--distributed", choices=DISTRIBUTED_MODES,
                   help="score with a Ray Data actor pool (auto: sets of 20,000+ images)")
    p.add_argument("--seed", type=int, help="seed of the bootstrap")
    p.add_argument("--ensemble", action="store_true", default=None,
                   help="also evaluate the mean of the checkpoints' probabilities as one model (e.g. several seeds)")
    _tta_option(p)
    add_label_options(p)  # how raw --external sets' labels read
    add_defaults_to_help(p, d)


def _run_evaluate(args) -> int:
    from mammo_ray.evaluate.run import run_evaluate, sweep_checkpoints

    cfg = EvaluateConfig.load(args.config, **config_overrides(EvaluateConfig, args, labels=label_overrides(args)))
    checkpoints = [c for s in args.sweep for c in sweep_checkpoints(s)] if args.sweep else args.checkpoint
    from mammo_ray.evaluate.report import console_summary

    report = run_evaluate(checkpoints, data=args.data, externals=args.external, out=args.out, cfg=cfg,
                          overwrite=args.overwrite)
    print("\n".join(console_summary(report)))  # * = chosen on val; every metric and interval in the report
    print(f"report: {os.path.join(args.out, 'report.html')} (the full table: {os.path.join(args.out, 'report.md')})")
    return 0


def _tta_option(p) -> None:
    """``--tta MODE``, the same on evaluate, score and explain: the mode is always named."""
    p.add_argument("--tta", choices=TTA_MODES,
                   help="test-time augmentation: each image's probability is the mean over it and its flipped "
                        "views (vflip: as training flips; hflip; flips: both, and both together); a bare --tta, "
                        "which once meant hflip in score and explain, is refused")


def _archive_args(p, d) -> None:
    """The flags the archive jobs (score, explain) share."""
    p.add_argument("inputs", nargs="+", help="folders, DICOM trees, CSV manifests or files (local or s3://...)")
    p.add_argument("--checkpoint", required=True, help="a mammo-ray checkpoint (train/tune best)")
    p.add_argument("--out", required=True, help="output folder or URI")
    p.add_argument("--batch-size", type=int, help="images per model batch")
    p.add_argument("--gpus-per-worker", type=finite_float, help="GPUs per model actor (default: 1 when the cluster has GPUs)")
    p.add_argument("--workers", type=int, help="model actors (default: one per GPU, or CPUs - 1)")
    p.add_argument("--threshold", type=finite_float,
                   help="probability at or above which an image is called malignant (default: the checkpoint's val threshold)")
    p.add_argument("--patient-key-file",
                   help="secret key file of the patient/exam pseudonyms in breasts/exams.parquet (default: "
                        "$MAMMO_RAY_PATIENT_KEY, else ~/.config/mammo-ray/patient.key)")
    _tta_option(p)
    p.add_argument("--no-tta", dest="tta", action="store_const", const="none", help="the same as --tta none")
    p.add_argument("--resume", action="store_true", help="continue a killed or partial run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run of this stage in --out (only files it wrote)")
    p.add_argument("--max-file-mb", type=int, help="input files larger than this many MB are errors, never read")
    p.add_argument("--unlabeled", action="store_true", default=None,
                   help="read no labels (labels are otherwise kept when present; an unknown word is unlabeled)")
    add_label_options(p)
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")


def _add_score(sub) -> None:
    d = ScoreConfig()
    p = sub.add_parser("score", help="score an image archive (no CAMs): scores, breast and exam tables")
    _archive_args(p, d)
    p.add_argument("--config", help="YAML file of ScoreConfig keys (flags override it)")
    add_defaults_to_help(p, d)


def _run_score(args) -> int:
    from mammo_ray.explain.score import run_score

    opts = ScoreConfig.load(args.config, **config_overrides(ScoreConfig, args, labels=label_overrides(args)))
    summary = run_score(args.inputs, args.checkpoint, args.out, opts, resume=args.resume, overwrite=args.overwrite,
                          address=args.address)
    print(json.dumps({k: summary[k] for k in ("inputs", "rows", "errors", "images_per_second", "threshold",
                                              "predicted_malignant")}))
    print(f"exams: {json.dumps(summary['exams'])}")
    print(f"inputs={summary['inputs']} rows={summary['rows']} errors={summary['errors']} -> {args.out}")
    return 0


def _add_explain(sub) -> None:
    d = ExplainConfig()
    p = sub.add_parser("explain", help="score and Grad-CAM an image archive with a Ray Data batch job")
    _archive_args(p, d)
    p.add_argument("--config", help="YAML file of ExplainConfig keys (flags override it)")
    p.add_argument("--cam-for", help=f"which images get a CAM: {', '.join(CAM_FOR_FORMS)} (at or above the threshold; "
                                     "the N highest scores)")
    p.add_argument("--scores-from", help="a finished `mammo-ray score` --out folder of the same checkpoint: its scores "
                                         "are used instead of scoring again (with --cam-for positive or top:N)")
    p.add_argument("--method", choices=CAM_METHODS,
                   help="the CAM (layercam found the lesion 2-7x as often as gradcam on real films)")
    p.add_argument("--target-layer", help="dotted module path (default: the backbone's registered CAM layer)")
    p.add_argument("--preview-size", type=int, help="long side of the overlay PNGs")
    p.add_argument("--heatmap-max-side", type=int,
                   help=f"long side of the heatmap PNGs; default: {d.heatmap_max_side} (the source image's own size)")
    p.add_argument("--annotations", help="CSV of lesions (path/image_id + lesion_x,lesion_y,lesion_r or mask_path)")
    p.add_argument("--cam-within-breast", action=argparse.BooleanOptionalAction, default=None,
                   help="keep heatmaps, overlays and peaks inside the breast mask (the raw map's peak is still "
                        "counted in cam_peaks_outside_breast)")
    p.add_argument("--overview-size", dest="top_n", type=int, metavar="N",
                   help="how many of the highest-scoring overlays overview.png shows")
    p.add_argument("--top", dest="top_n", type=int, action=Deprecated, new="--overview-size")
    add_defaults_to_help(p, d)


def _run_explain(args) -> int:
    from mammo_ray.explain.job import run_explain

    opts = ExplainConfig.load(args.config, **config_overrides(ExplainConfig, args, labels=label_overrides(args)))
    summary = run_explain(args.inputs, args.checkpoint, args.out, opts, resume=args.resume, overwrite=args.overwrite,
                          address=args.address)
    print(json.dumps({k: summary[k] for k in ("inputs", "rows", "errors", "cams", "images_per_second", "threshold")}))
    if "localization" in summary:
        print(f"localization: {json.dumps(summary['localization'])}")
    print(f"inputs={summary['inputs']} rows={summary['rows']} errors={summary['errors']} -> {args.out}")
    return 0
