"""The subcommands: for each stage, its flags (defaults from the stage's config dataclass)
and the call that runs it. The stages' modules are imported inside the ``_run_*`` functions:
they import torch and Ray, and ``mammo-ray --help`` or a refused flag must not wait for
either (tests/test_layers.py checks it)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from dataclasses import replace

from mammo_ray.config import (CAM_FOR_FORMS, CAM_METHODS, CLR_MODES, DISTRIBUTED_MODES, EQUALIZE_MODES, IMBALANCE,
                              MAX_SIDE, OPTIMIZERS, ORIENTATIONS, OTHER_MODALITY, OUTPUT_DTYPES, PRETRAINED,
                              RESIZE_MODES, SCHEDULERS, THRESHOLD_METHODS, TTA_MODES, EvaluateConfig, ExplainConfig,
                              PreprocessConfig, ScoreConfig, SweepConfig, TrainConfig, backbone_names)
from mammo_ray.console import set_console_level
from mammo_ray.outputs import check_out_location
from mammo_ray.cli.options import (Renamed, add_label_options, config_overrides, finite_float, label_overrides,
                                   lr_pair)

logger = logging.getLogger("mammo_ray")


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="decode + transform images into Parquet shards with Ray Data")
    p.add_argument("inputs", nargs="+", help="class folders, CSV manifests, DICOM trees or files (local or s3://...)")
    p.add_argument("--out", required=True, help="output folder or URI")
    p.add_argument("--config", help="YAML file (PreprocessConfig keys, pixel spec under 'spec:')")
    p.add_argument("--external", action="store_true", default=None, help="an external set: everything goes to external/")
    p.add_argument("--unlabeled", action="store_true", default=None, help="ignore class folders / labels")
    add_label_options(p)
    p.add_argument("--size", type=int, nargs="+", help="output size: N or H W (default 224)")
    p.add_argument("--equalize", choices=EQUALIZE_MODES)
    p.add_argument("--resize-mode", choices=RESIZE_MODES)
    p.add_argument("--orientation", choices=ORIENTATIONS)
    p.add_argument("--dtype", choices=OUTPUT_DTYPES)
    p.add_argument("--mean", type=finite_float, help="normalization mean of [0, 1] pixels (default 0.5)")
    p.add_argument("--std", type=finite_float,
                   help="normalization std (default 0.25; 0.5 for efficientnet_lite0, whose weights expect [-1, 1])")
    p.add_argument("--other-modality", choices=OTHER_MODALITY)
    p.add_argument("--ratios", type=finite_float, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out (only files it wrote)")
    p.add_argument("--patient-key-file", help="secret key file of the patient pseudonyms (default: "
                   "$MAMMO_RAY_PATIENT_KEY, else ~/.config/mammo-ray/patient.key, created on first use)")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")


def _run_preprocess(args) -> int:
    from mammo_ray.data.pipeline import run_preprocess

    if args.size and len(args.size) > 2:
        raise ValueError(f"--size {' '.join(map(str, args.size))}: give N or H W")
    size = (tuple(args.size) if len(args.size) == 2 else args.size[0]) if args.size else None
    cfg = PreprocessConfig.load(
        args.config, external=args.external, unlabeled=args.unlabeled, size=size,
        equalize=args.equalize, resize_mode=args.resize_mode, orientation=args.orientation,
        dtype=args.dtype, mean=args.mean, std=args.std, other_modality=args.other_modality,
        ratios=tuple(args.ratios) if args.ratios else None, seed=args.seed, batch_size=args.batch_size,
        patient_key_file=args.patient_key_file, labels=label_overrides(args))
    summary = run_preprocess(args.inputs, args.out, cfg, overwrite=args.overwrite, address=args.address)
    print(json.dumps({k: summary[k] for k in ("inputs", "rows", "errors", "splits")}))
    print(f"inputs={summary['inputs']} rows={summary['rows']} errors={summary['errors']} -> {args.out}")
    return 0


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic mammogram phantoms (class folders + labels.csv)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=416)
    p.add_argument("--formats", default="png8,png16,dcm,dcm-mono1",
                   help="comma list, round-robin over images")
    p.add_argument("--contrast", type=finite_float, default=1.0)
    p.add_argument("--noise", type=finite_float, default=1.0)
    p.add_argument("--no-markers", action="store_true", help="no burned-in text or clip markers")


def _run_synth(args) -> int:
    from mammo_ray.data.synth import FORMATS, write_phantoms

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--formats {args.formats!r}: use a comma list of {', '.join(FORMATS)}")
    if not 1 <= args.n <= 10_000_000:
        raise ValueError(f"--n {args.n}: use an int in [1, 10000000]")
    if not (32 <= args.height <= MAX_SIDE and 32 <= args.width <= MAX_SIDE):
        raise ValueError(f"--height {args.height} --width {args.width}: each in [32, {MAX_SIDE}]")
    rows = write_phantoms(args.out, args.n, seed=args.seed, height=args.height, width=args.width,
                          formats=formats, contrast=args.contrast, noise=args.noise, markers=not args.no_markers)
    print(f"wrote {len(rows)} phantoms to {args.out} (labels.csv)")
    return 0


def _train_options(p, *, full: bool = True) -> None:
    p.add_argument("--data", required=True, help="a preprocessed folder (train/ and val/ splits)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="YAML file of TrainConfig keys (flags override it)")
    p.add_argument("--backbone", choices=backbone_names())
    p.add_argument("--freeze-ratio", type=finite_float, help="fraction of backbone units frozen, in [0, 1]")
    p.add_argument("--pretrained", choices=PRETRAINED,
                   help="ImageNet weights: torch hub cache, downloaded once with a hash check; efficientnet_lite0 "
                        "from its pip package")
    p.add_argument("--weights", help="a torchvision-format state dict to start from (PATH or s3://...)")
    p.add_argument("--offline", action="store_true", default=None,
                   help="never download weights (also MAMMO_RAY_OFFLINE=1)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--imbalance", choices=IMBALANCE)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    if full:
        p.add_argument("--base-lr", type=finite_float)
        p.add_argument("--max-lr", type=finite_float)
        p.add_argument("--clr-mode", choices=CLR_MODES)
        p.add_argument("--clr-gamma", type=finite_float)
        p.add_argument("--step-size-epochs", type=finite_float, help="half a cyclic-LR cycle, in epochs")
        p.add_argument("--epochs", type=int)
        p.add_argument("--patience", type=int, help="early stopping on val AUC (0: off)")
        p.add_argument("--max-batches", type=int, help="cap training batches per epoch (smoke runs)")
        p.add_argument("--resume", help="a last.pt to continue from")


def _train_config(args, **extra):
    return TrainConfig.load(args.config, **config_overrides(TrainConfig, args, **extra))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one model (backbone x freezing ratio x cyclic LR)")
    _train_options(p)


def _run_train(args) -> int:
    from mammo_ray.train.data import load_training_data
    from mammo_ray.train.loop import fit

    cfg = _train_config(args)
    check_out_location(args.out, folders=[args.data])
    spec, train, val = load_training_data(args.data)
    logger.info("train %d images %s, val %d images %s", len(train), train.class_counts(), len(val), val.class_counts())
    result = fit(cfg, spec, train, val, out=args.out, resume=args.resume, progress=sys.stderr.isatty())
    best = result.best_metrics
    print(f"best epoch {result.best_epoch}: val_auc {best.get('val_auc')} val_accuracy {best.get('val_accuracy')}")
    print(f"checkpoints: {os.path.join(args.out, 'best.pt')} {os.path.join(args.out, 'last.pt')}")
    return 0


def _add_lr_find(sub) -> None:
    p = sub.add_parser("lr-find", help="LR range test: suggests cyclic-LR bounds, writes lr_find.png")
    _train_options(p, full=False)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--start-lr", type=finite_float, default=1e-6)
    p.add_argument("--end-lr", type=finite_float, default=1.0)


def _run_lr_find(args) -> int:
    from mammo_ray.train.data import load_training_data
    from mammo_ray.train.lr_find import lr_range_test, write_lr_find

    cfg = _train_config(args)
    check_out_location(args.out, folders=[args.data])
    spec, train, _ = load_training_data(args.data)
    result = lr_range_test(cfg, spec, train, start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.steps)
    write_lr_find(result, args.out)
    lo, hi = result["suggested_base_lr"], result["suggested_max_lr"]
    # train takes the two bounds as flags, tune as one BASE:MAX pair: print both spellings
    print(f"suggested --base-lr {lo:.2e} --max-lr {hi:.2e} (train), --lr-bounds {lo:.2e}:{hi:.2e} (tune) "
          f"(plot: {os.path.join(args.out, 'lr_find.png')})")
    return 0


def _add_tune(sub) -> None:
    d, t = SweepConfig(), TrainConfig()
    p = sub.add_parser("tune", help="Ray Tune sweep over backbone x freezing ratio x cyclic-LR bounds")
    p.add_argument("--data", required=True, help="a preprocessed folder (train/ and val/)")
    p.add_argument("--out", required=True, help="output folder or URI (Tune storage under OUT/tune)")
    p.add_argument("--config", help="sweep YAML (SweepConfig keys; flags override it)")
    p.add_argument("--backbones", nargs="+", choices=backbone_names(), help=f"default: {' '.join(d.backbones)}")
    p.add_argument("--freeze-ratios", nargs="+", type=finite_float,
                   help=f"default: {' '.join(f'{r:g}' for r in d.freeze_ratios)}")
    p.add_argument("--lr-bounds", nargs="+", type=lr_pair, metavar="BASE:MAX",
                   help=f"default: {' '.join(f'{a:g}:{b:g}' for a, b in d.lr_bounds)}")
    p.add_argument("--clr-modes", nargs="+", choices=CLR_MODES, help=f"default: {' '.join(d.clr_modes)}")
    p.add_argument("--epochs", type=int, help=f"default: {d.epochs}")
    p.add_argument("--batch-size", type=int, help=f"default: {d.batch_size}")
    p.add_argument("--num-samples", type=int, help=f"default: {d.num_samples}")
    p.add_argument("--scheduler", choices=SCHEDULERS, help=f"default: {d.scheduler}")
    p.add_argument("--cpus-per-trial", type=finite_float, help=f"default: {d.cpus_per_trial:g}")
    p.add_argument("--gpus-per-trial", type=finite_float,
                   help=f"may be fractional (e.g. 0.5: two trials per GPU); default: {d.gpus_per_trial:g}")
    p.add_argument("--max-failures", type=int, help=f"retries of a failed trial from its last checkpoint; "
                                                     f"default: {d.max_failures}")
    # every trial's shared training options (the sweep file's `train:`); defaults: TrainConfig's
    p.add_argument("--pretrained", choices=PRETRAINED, help="start every trial from ImageNet weights, resolved "
                                                             "once on the driver (default: random init)")
    p.add_argument("--weights", help="start every trial from this state dict (PATH or s3://...)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default: {t.optimizer}")
    p.add_argument("--patience", type=int, help=f"early stopping on val AUC, in epochs (0: off); default: {t.patience}")
    p.add_argument("--step-size-epochs", type=finite_float,
                   help=f"half a cyclic-LR cycle, in epochs; default: {t.step_size_epochs:g}")
    p.add_argument("--offline", action="store_true", help="never download weights (also MAMMO_RAY_OFFLINE=1)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep stored in --out")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")


def _run_tune(args) -> int:
    from mammo_ray.train.sweep import run_sweep

    if args.resume and args.config is None and os.path.exists(os.path.join(args.out, "sweep.yaml")):
        args.config = os.path.join(args.out, "sweep.yaml")  # the interrupted sweep's own file
    over = {"backbones": args.backbones, "freeze_ratios": args.freeze_ratios, "lr_bounds": args.lr_bounds,
            "clr_modes": args.clr_modes, "epochs": args.epochs, "batch_size": args.batch_size,
            "num_samples": args.num_samples, "scheduler": args.scheduler, "cpus_per_trial": args.cpus_per_trial,
            "gpus_per_trial": args.gpus_per_trial, "max_failures": args.max_failures}
    over = {k: (tuple(v) if isinstance(v, list) else v) for k, v in over.items()}
    sweep = SweepConfig.load(args.config, **over)
    train = {"pretrained": args.pretrained, "weights": args.weights, "optimizer": args.optimizer,
             "patience": args.patience, "step_size_epochs": args.step_size_epochs, "offline": args.offline or None}
    train = {k: v for k, v in train.items() if v is not None}
    if train:
        sweep = replace(sweep, train={**sweep.train, **train})
    summary = run_sweep(args.data, args.out, sweep, resume=args.resume, address=args.address)
    print(open(os.path.join(args.out, "table.md")).read() if not args.out.startswith(("s3://", "gs://")) else "")
    print(f"{summary['trials']} trials, {summary['errors']} errors; outputs in {args.out}")
    return 0 if summary["errors"] == 0 else 1


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
    p.add_argument("--threshold-method", choices=THRESHOLD_METHODS,
                   help=f"how the decision threshold is chosen on val (fixed: 0.5); default: {d.threshold_method}")
    p.add_argument("--threshold", action=Renamed, hint="evaluate's threshold rule is now --threshold-method "
                   f"({', '.join(THRESHOLD_METHODS)}); a probability threshold is explain's --threshold")
    p.add_argument("--target-sensitivity", type=finite_float, help=f"default: {d.target_sensitivity:g}")
    p.add_argument("--allow-spec-mismatch", action="store_true", default=None)
    p.add_argument("--n-boot", type=int, help=f"bootstrap replicates for the CIs; default: {d.n_boot}")
    p.add_argument("--batch-size", type=int, help=f"default: {d.batch_size}")
    p.add_argument("--distributed", choices=DISTRIBUTED_MODES,
                   help=f"score with a Ray Data actor pool (auto: sets of 20,000+ images); default: {d.distributed}")
    p.add_argument("--seed", type=int, help=f"default: {d.seed}")
    p.add_argument("--ensemble", action="store_true", default=None,
                   help="also evaluate the mean of the checkpoints' probabilities as one model (e.g. several seeds)")
    p.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation: the mean over flipped views (vflip: as "
                   f"training flips; hflip; flips: both, and both together); default: {d.tta}")
    add_label_options(p)  # how raw --external sets' labels read


def _run_evaluate(args) -> int:
    from mammo_ray.evaluate.run import run_evaluate, sweep_checkpoints

    cfg = EvaluateConfig.load(args.config, **config_overrides(EvaluateConfig, args, labels=label_overrides(args)))
    checkpoints = [c for s in args.sweep for c in sweep_checkpoints(s)] if args.sweep else args.checkpoint
    run_evaluate(checkpoints, data=args.data, externals=args.external, out=args.out, cfg=cfg)
    sections = open(os.path.join(args.out, "report.md")).read().split("\n## ")  # the table and the paired comparisons
    print("\n## ".join(x for i, x in enumerate(sections) if i == 0 or x.startswith("Paired comparisons")))
    print(f"report: {os.path.join(args.out, 'report.html')}")
    return 0


def _archive_args(p, d) -> None:
    """The flags the archive jobs (score, explain) share."""
    p.add_argument("inputs", nargs="+", help="folders, DICOM trees, CSV manifests or files (local or s3://...)")
    p.add_argument("--checkpoint", required=True, help="a mammo-ray checkpoint (train/tune best)")
    p.add_argument("--out", required=True, help="output folder or URI")
    p.add_argument("--batch-size", type=int, help=f"images per model batch; default: {d.batch_size}")
    p.add_argument("--gpus-per-worker", type=finite_float, help="GPUs per model actor (default: 1 when the cluster has GPUs)")
    p.add_argument("--workers", type=int, help="model actors (default: one per GPU, or CPUs - 1)")
    p.add_argument("--threshold", type=finite_float,
                   help="probability at or above which an image is called malignant (default: the checkpoint's val threshold)")
    p.add_argument("--patient-key-file",
                   help="secret key file of the patient/exam pseudonyms in breasts/exams.parquet (default: "
                        "$MAMMO_RAY_PATIENT_KEY, else ~/.config/mammo-ray/patient.key)")
    # a bare --tta (before modes) averaged with the horizontal mirror: it still does
    p.add_argument("--tta", nargs="?", const="hflip", choices=TTA_MODES,
                   help="test-time augmentation, as evaluate's: the mean over the image and its flipped views "
                        f"(vflip: as training flips; bare --tta: hflip); default: {d.tta}")
    p.add_argument("--no-tta", dest="tta", action="store_const", const="none", help="no test-time augmentation")
    p.add_argument("--resume", action="store_true", help="continue a killed or partial run in --out")
    p.add_argument("--unlabeled", action="store_true", default=None,
                   help="read no labels (labels are otherwise kept when present; an unknown word is unlabeled)")
    add_label_options(p)
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")


def _add_score(sub) -> None:
    d = ScoreConfig()
    p = sub.add_parser("score", help="score an image archive (no CAMs): scores, breast and exam tables")
    _archive_args(p, d)
    p.add_argument("--config", help="YAML file of ScoreConfig keys (flags override it)")


def _run_score(args) -> int:
    from mammo_ray.explain.score import run_score

    opts = ScoreConfig.load(args.config, **config_overrides(ScoreConfig, args, labels=label_overrides(args)))
    summary = run_score(args.inputs, args.checkpoint, args.out, opts, resume=args.resume, address=args.address)
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
                                     f"the N highest scores); default: {d.cam_for}")
    p.add_argument("--scores-from", help="a finished `mammo-ray score` --out folder of the same checkpoint: its scores "
                                         "are used instead of scoring again (with --cam-for positive or top:N)")
    p.add_argument("--method", choices=CAM_METHODS, help=f"default: {d.method}")
    p.add_argument("--target-layer", help="dotted module path (default: the backbone's registered CAM layer)")
    p.add_argument("--preview-size", type=int, help=f"long side of the overlay PNGs; default: {d.preview_size}")
    p.add_argument("--heatmap-max-side", type=int,
                   help=f"long side of the heatmap PNGs; default: {d.heatmap_max_side} (the source image's own size)")
    p.add_argument("--annotations", help="CSV of lesions (path/image_id + lesion_x,lesion_y,lesion_r or mask_path)")
    p.add_argument("--cam-within-breast", action=argparse.BooleanOptionalAction, default=None,
                   help="keep heatmaps, overlays and peaks inside the breast mask (the raw map's peak is still "
                        f"counted in cam_peaks_outside_breast); default: {d.cam_within_breast}")
    p.add_argument("--top", dest="top_n", type=int, help=f"overlays on overview.png; default: {d.top_n}")


def _run_explain(args) -> int:
    from mammo_ray.explain.job import run_explain

    opts = ExplainConfig.load(args.config, **config_overrides(ExplainConfig, args, labels=label_overrides(args)))
    summary = run_explain(args.inputs, args.checkpoint, args.out, opts, resume=args.resume, address=args.address)
    print(json.dumps({k: summary[k] for k in ("inputs", "rows", "errors", "cams", "images_per_second", "threshold")}))
    if "localization" in summary:
        print(f"localization: {json.dumps(summary['localization'])}")
    print(f"inputs={summary['inputs']} rows={summary['rows']} errors={summary['errors']} -> {args.out}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on synthetic phantoms: preprocess, sweep, evaluate, explain")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--full", action="store_true",
                   help="the paper's configuration (resnet50 + vgg19, freezing 0-0.75, ImageNet weights): a GPU box")
    p.add_argument("--n", type=int, help="phantoms in the training set (default 360; --full 4000)")
    p.add_argument("--n-external", type=int, help="phantoms in the external set (default 60; --full 600)")
    p.add_argument("--epochs", type=int, help="epochs per trial (default 12; --full 30)")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")


def _run_demo(args) -> int:
    from mammo_ray.demo import DEMO_MARKER, DemoConfig, run_demo

    make = DemoConfig.full if args.full else DemoConfig.laptop
    cfg = make(n=args.n, n_external=args.n_external)
    if args.epochs:
        cfg = replace(cfg, sweep=replace(cfg.sweep, epochs=args.epochs))
    if not (args.verbose or args.log_level or args.quiet):
        set_console_level(logging.WARNING)  # its own stage lines say what happens; INFO goes to demo.log
    try:
        facts = run_demo(args.out, cfg, full=args.full, address=args.address,
                         progress=lambda line: print(line, flush=True))
    finally:  # the whole log (Ray's included) kept with the outputs, also when a stage failed
        if os.path.exists(os.path.join(args.out, DEMO_MARKER)) and getattr(args, "log_file", None):
            shutil.copyfile(args.log_file, os.path.join(args.out, "demo.log"))
    best = facts["best"]
    print(f"demo finished in {facts['seconds']:.0f} s ({facts['seconds'] / 60:.1f} min); best checkpoint by val AUC: "
          f"{best['name']}, test AUC {best['test_auc']:.3f}, external AUC {best['external_auc']:.3f}")
    print(f"report: {facts['report']}")
    print(f"outputs in {os.path.abspath(args.out)} (full log: {os.path.join(args.out, 'demo.log')})")
    return 0


COMMANDS = {"synth": (_add_synth, _run_synth), "preprocess": (_add_preprocess, _run_preprocess),
            "train": (_add_train, _run_train), "lr-find": (_add_lr_find, _run_lr_find),
            "tune": (_add_tune, _run_tune), "evaluate": (_add_evaluate, _run_evaluate),
            "explain": (_add_explain, _run_explain), "score": (_add_score, _run_score),
            "demo": (_add_demo, _run_demo)}
