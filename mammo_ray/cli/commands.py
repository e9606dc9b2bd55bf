"""The subcommands: for each stage, its flags (defaults from the stage's config dataclass)
and the call that runs it (the stages that apply a checkpoint: :mod:`mammo_ray.cli.apply`). The stages' modules are imported inside the ``_run_*`` functions:
they import torch and Ray, and ``mammo-ray --help`` or a refused flag must not wait for
either (tests/test_layers.py checks it)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import replace

from mammo_ray.config import (CLR_MODES, EQUALIZE_MODES, IMBALANCE, INGEST_MODES, MAX_SIDE, SHUFFLE_MODES, NO_PRETRAINED, OPTIMIZERS, ORIENTATIONS,
                              OTHER_MODALITY, OUTPUT_DTYPES, PRETRAINED, RESIZE_MODES, SCHEDULERS, PreprocessConfig,
                              SweepConfig, TrainConfig, backbone_names)
from mammo_ray import io as mio
from mammo_ray.console import PROGRESS_EVERY_S, rounded, set_console_level
from mammo_ray.outputs import check_out_location, finish_out, start_out
from mammo_ray.cli.apply import _add_evaluate, _add_explain, _add_score, _run_evaluate, _run_explain, _run_score
from mammo_ray.cli.options import (add_defaults_to_help, add_label_options, config_overrides, finite_float,
                                   label_overrides, lr_pair)

logger = logging.getLogger("mammo_ray")


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="decode + transform images into Parquet shards with Ray Data")
    p.add_argument("inputs", nargs="+", help="class folders, CSV manifests, DICOM trees or files (local or s3://...)")
    p.add_argument("--out", required=True, help="output folder or URI")
    p.add_argument("--config", help="YAML file (PreprocessConfig keys, pixel spec under 'spec:')")
    p.add_argument("--external", action="store_true", default=None, help="an external set: everything goes to external/")
    p.add_argument("--unlabeled", action="store_true", default=None, help="ignore class folders / labels")
    add_label_options(p)
    p.add_argument("--size", type=int, nargs="+", help="output size: N or H W")
    p.add_argument("--equalize", choices=EQUALIZE_MODES)
    p.add_argument("--resize-mode", choices=RESIZE_MODES)
    p.add_argument("--orientation", choices=ORIENTATIONS)
    p.add_argument("--dtype", choices=OUTPUT_DTYPES)
    p.add_argument("--mean", type=finite_float,
                   help="override the normalization mean of [0, 1] pixels, in [0, 1] (default: the weights' own: "
                        "ImageNet's for torchvision weights, 0.5 for efficientnet_lite0; 0.5 for a random init)")
    p.add_argument("--std", type=finite_float,
                   help="override the normalization std, in [0.01, 1] (default: the weights' own: ImageNet's for "
                        "torchvision weights, 0.5 for efficientnet_lite0; 0.25 for a random init)")
    p.add_argument("--other-modality", choices=OTHER_MODALITY)
    p.add_argument("--ratios", type=finite_float, nargs=3, metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-file-mb", type=int, help="input files larger than this many MB are errors, never read")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out (only files it wrote)")
    p.add_argument("--patient-key-file", help="secret key file of the patient pseudonyms (default: "
                   "$MAMMO_RAY_PATIENT_KEY, else ~/.config/mammo-ray/patient.key, created on first use)")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    d = PreprocessConfig()
    add_defaults_to_help(p, d, d.spec)


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
        max_file_mb=args.max_file_mb, patient_key_file=args.patient_key_file, labels=label_overrides(args))
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
    p.add_argument("--overwrite", action="store_true", help="replace a previous run of this stage in --out (only files it wrote)")
    add_defaults_to_help(p)


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
                          formats=formats, contrast=args.contrast, noise=args.noise, markers=not args.no_markers,
                          overwrite=args.overwrite)
    print(f"wrote {len(rows)} phantoms to {args.out} (labels.csv)")
    return 0


def _train_options(p, *, full: bool = True) -> None:
    p.add_argument("--data", required=True, help="a preprocessed folder (train/ and val/ splits)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="YAML file of TrainConfig keys (flags override it)")
    p.add_argument("--backbone", choices=backbone_names())
    p.add_argument("--freeze-ratio", type=finite_float, help="fraction of backbone units frozen, in [0, 1]")
    p.add_argument("--pretrained", choices=PRETRAINED + (NO_PRETRAINED,),
                   help="ImageNet weights (torch hub cache, downloaded once with a hash check; efficientnet_lite0 "
                        f"from its pip package), or {NO_PRETRAINED}: random init (simplecnn has no ImageNet weights)")
    p.add_argument("--weights", help="a torchvision-format state dict to start from (PATH or s3://...), instead of "
                                     "the ImageNet weights")
    p.add_argument("--offline", action="store_true", default=None,
                   help="never download weights (also MAMMO_RAY_OFFLINE=1)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--imbalance", choices=IMBALANCE)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no training augmentation (flips, small shifts and contrast changes)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run of this stage in --out (only files it wrote)")
    if full:
        p.add_argument("--base-lr", type=finite_float)
        p.add_argument("--max-lr", type=finite_float)
        p.add_argument("--clr-mode", choices=CLR_MODES)
        p.add_argument("--clr-gamma", type=finite_float)
        p.add_argument("--step-size-epochs", type=finite_float, help="half a cyclic-LR cycle, in epochs")
        p.add_argument("--epochs", type=int)
        p.add_argument("--patience", type=int, help="early stopping on val AUC (0: off)")
        p.add_argument("--max-batches", type=int, help="cap optimizer steps per epoch (smoke runs)")
        p.add_argument("--resume", help="a last.pt to continue from")
        _scale_options(p)
        p.add_argument("--address", help="Ray address for --workers > 1 or a streamed ingest (default: $RAY_ADDRESS, "
                                         "else a local Ray on 127.0.0.1)")
    add_defaults_to_help(p, TrainConfig())


def _scale_options(p, *, sweep: bool = False) -> None:
    """--workers and the ingest: train's flags, and tune's (per trial)."""
    what = "each trial's" if sweep else "the run's"
    p.add_argument("--workers", type=int, help=f"{what} data-parallel workers (DDP ranks on Ray Train; batch size is "
                                               "per worker)")
    p.add_argument("--cpus-per-worker", type=finite_float, help="CPUs each worker holds")
    p.add_argument("--gpus-per-worker", type=finite_float, help="GPUs each worker holds (nccl when > 0, else gloo)")
    p.add_argument("--ingest", choices=INGEST_MODES,
                   help="memory: the split decoded into RAM once; stream: Ray Data streams its Parquet shards "
                        "(O(batch) memory); auto: memory while it fits")
    p.add_argument("--accumulate", type=int, help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--shuffle", choices=SHUFFLE_MODES,
                   help="a stream's per-epoch shuffle: local (file order + a seeded buffer) or full")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass: about half the memory at high resolution, "
                        "a third more compute")


def _start_weights(args) -> None:
    """``--weights`` replaces the ImageNet default: random init under the given file, unless
    ``--pretrained`` was also named (then the config refuses the pair)."""
    if getattr(args, "weights", None) and args.pretrained is None:
        args.pretrained = NO_PRETRAINED


def _train_config(args, **extra):
    _start_weights(args)
    return TrainConfig.load(args.config, **config_overrides(TrainConfig, args, **extra))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one model (backbone x freezing ratio x cyclic LR)")
    _train_options(p)


def _run_train(args) -> int:
    from mammo_ray.train.data import load_training_data
    from mammo_ray.train.loop import fit

    cfg = _train_config(args)
    check_out_location(args.out, folders=[args.data])
    if cfg.workers > 1 or _streams(cfg, args.data):
        return _run_train_distributed(cfg, args)
    spec, train, val = load_training_data(args.data)
    logger.info("train %d images %s, val %d images %s", len(train), train.class_counts(), len(val), val.class_counts())
    start_out(args.out, "train", overwrite=args.overwrite, resume=bool(args.resume))
    tty = sys.stderr.isatty()  # off a terminal (a log file, CI) a line every 15 s instead of tqdm's bar
    result = fit(cfg, spec, train, val, out=args.out, resume=args.resume, progress=tty,
                 progress_every_s=0.0 if tty else PROGRESS_EVERY_S)
    finish_out(args.out, "train")
    return _print_train(args.out, result.best_epoch, result.best_metrics)


def _streams(cfg, data_dir: str) -> bool:
    """One worker streams when asked to, or (auto) when the splits would not fit in memory."""
    if cfg.ingest != "auto":
        return cfg.ingest == "stream"
    from mammo_ray.train.ingest import choose_ingest, read_totals

    spec, totals = read_totals(data_dir)
    return choose_ingest(cfg, data_dir, spec, totals) == "stream"


def _run_train_distributed(cfg, args) -> int:
    from mammo_ray.train.launch import execute_train, prepare_train

    launch = prepare_train(cfg, args.data, resume=args.resume, address=args.address)  # refusals before --out
    start_out(args.out, "train", overwrite=args.overwrite, resume=bool(args.resume))
    result = execute_train(launch, args.out)
    finish_out(args.out, "train")
    return _print_train(args.out, result["best_epoch"], result["best_metrics"])


def _print_train(out: str, best_epoch: int, best: dict) -> int:
    print(f"best epoch {best_epoch}: val_auc {rounded(best.get('val_auc'))} "
          f"val_accuracy {rounded(best.get('val_accuracy'))}")
    print(f"checkpoints: {os.path.join(out, 'best.pt')} {os.path.join(out, 'last.pt')}")
    return 0


def _add_lr_find(sub) -> None:
    p = sub.add_parser("lr-find", help="LR range test: suggests cyclic-LR bounds, writes lr_find.png")
    _train_options(p, full=False)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--start-lr", type=finite_float, default=1e-6)
    p.add_argument("--end-lr", type=finite_float, default=1.0)
    add_defaults_to_help(p, TrainConfig())


def _run_lr_find(args) -> int:
    from mammo_ray.train.data import load_training_data
    from mammo_ray.train.lr_find import lr_range_test, write_lr_find

    cfg = _train_config(args)
    check_out_location(args.out, folders=[args.data])
    spec, train, _ = load_training_data(args.data)
    result = lr_range_test(cfg, spec, train, start_lr=args.start_lr, end_lr=args.end_lr, num_steps=args.steps)
    start_out(args.out, "lr-find", overwrite=args.overwrite)
    write_lr_find(result, args.out)
    finish_out(args.out, "lr-find")
    lo, hi = result["suggested_base_lr"], result["suggested_max_lr"]
    # train takes the two bounds as flags, tune as one BASE:MAX pair: print both spellings
    print(f"suggested --base-lr {lo:.2e} --max-lr {hi:.2e} (train), --lr-bounds {lo:.2e}:{hi:.2e} (tune) "
          f"(plot: {os.path.join(args.out, 'lr_find.png')})")
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="Ray Tune sweep over backbone x freezing ratio x cyclic-LR bounds")
    p.add_argument("--data", required=True, help="a preprocessed folder (train/ and val/)")
    p.add_argument("--out", required=True, help="output folder or URI (Tune storage under OUT/tune)")
    p.add_argument("--config", help="sweep YAML (SweepConfig keys; flags override it)")
    p.add_argument("--backbones", nargs="+", choices=backbone_names(), help="the backbones swept")
    p.add_argument("--freeze-ratios", nargs="+", type=finite_float, help="the freezing ratios swept")
    p.add_argument("--lr-bounds", nargs="+", type=lr_pair, metavar="BASE:MAX", help="the cyclic-LR bounds swept")
    p.add_argument("--clr-modes", nargs="+", choices=CLR_MODES, help="the cyclic-LR modes swept")
    p.add_argument("--epochs", type=int, help="epochs per trial")
    p.add_argument("--batch-size", type=int, help="images per training batch")
    p.add_argument("--num-samples", type=int, help="trials per grid point (seeds, or draws of sampled ranges)")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="fifo: every trial runs its epochs; asha: stops weak ones")
    p.add_argument("--cpus-per-trial", type=finite_float, help="CPUs each trial holds (all its workers; default 1 "
                                                               "per worker)")
    p.add_argument("--gpus-per-trial", type=finite_float, help="may be fractional (e.g. 0.5: two one-worker trials per "
                                                               "GPU); with --workers, split among them")
    _scale_options(p, sweep=True)
    p.add_argument("--max-failures", type=int, help="retries of a failed trial from its last checkpoint")
    # every trial's shared training options (the sweep file's `train:`); defaults: TrainConfig's
    p.add_argument("--pretrained", choices=PRETRAINED + (NO_PRETRAINED,),
                   help=f"every trial's start: ImageNet weights resolved once on the driver, or {NO_PRETRAINED}: "
                        "random init")
    p.add_argument("--weights", help="start every trial from this state dict (PATH or s3://...)")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--patience", type=int, help="early stopping on val AUC, in epochs (0: off)")
    p.add_argument("--step-size-epochs", type=finite_float, help="half a cyclic-LR cycle, in epochs")
    p.add_argument("--offline", action="store_true", help="never download weights (also MAMMO_RAY_OFFLINE=1)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep stored in --out")
    p.add_argument("--yes", action="store_true",
                   help=f"start even when the plan's estimate passes {CPU_SWEEP_LIMIT_S // 3600:.0f} h on a machine "
                        "without GPUs")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run of this stage in --out (only files it wrote)")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    add_defaults_to_help(p, SweepConfig(), TrainConfig())


def _run_tune(args) -> int:
    from mammo_ray.train.sweep import run_sweep

    if args.resume and args.config is None and os.path.exists(os.path.join(args.out, "sweep.yaml")):
        args.config = os.path.join(args.out, "sweep.yaml")  # the interrupted sweep's own file
    over = {"backbones": args.backbones, "freeze_ratios": args.freeze_ratios, "lr_bounds": args.lr_bounds,
            "clr_modes": args.clr_modes, "epochs": args.epochs, "batch_size": args.batch_size,
            "num_samples": args.num_samples, "scheduler": args.scheduler, "cpus_per_trial": args.cpus_per_trial,
            "gpus_per_trial": args.gpus_per_trial, "max_failures": args.max_failures, "workers": args.workers,
            "cpus_per_worker": args.cpus_per_worker, "gpus_per_worker": args.gpus_per_worker}
    over = {k: (tuple(v) if isinstance(v, list) else v) for k, v in over.items()}
    sweep = SweepConfig.load(args.config, **over)
    _start_weights(args)
    train = {"pretrained": args.pretrained, "weights": args.weights, "optimizer": args.optimizer,
             "patience": args.patience, "step_size_epochs": args.step_size_epochs, "offline": args.offline or None,
             "ingest": args.ingest, "accumulate": args.accumulate, "shuffle": args.shuffle,
             "activation_checkpointing": args.activation_checkpointing}
    train = {k: v for k, v in train.items() if v is not None}
    if train:
        sweep = replace(sweep, train={**sweep.train, **train})
    summary = run_sweep(args.data, args.out, sweep, resume=args.resume, overwrite=args.overwrite, address=args.address,
                        confirm=lambda plan: _confirm_plan(plan, args.yes))
    print(open(os.path.join(args.out, "table.md")).read() if not mio.is_uri(args.out) else "")
    print(f"{summary['trials']} trials, {summary['errors']} errors; outputs in {args.out}")
    return 0 if summary["errors"] == 0 else 1


#: a sweep estimated to run longer than this on a machine without GPUs waits for --yes
CPU_SWEEP_LIMIT_S = 3600


def _confirm_plan(plan: dict, yes: bool) -> None:
    """Print the sweep's plan (trials x epochs and the probe's estimate); refuse a CPU-only sweep
    estimated over an hour unless ``--yes`` (one line saying so, before any trial starts)."""
    print(plan["line"], flush=True)
    if plan["gpus"] == 0 and plan["estimate_s"] > CPU_SWEEP_LIMIT_S and not yes:
        raise ValueError(f"the sweep is estimated at {plan['estimate_s'] / 3600:.1f} h on a machine without GPUs "
                         f"(over {CPU_SWEEP_LIMIT_S / 3600:.0f} h): pass --yes to start it, or shrink it "
                         "(--freeze-ratios, --epochs, --num-samples)")


def _add_demo(sub) -> None:
    from mammo_ray.demo import DemoConfig  # config only: no torch or Ray

    d, full = DemoConfig.laptop(), DemoConfig.full()
    p = sub.add_parser("demo", help="the whole pipeline on synthetic phantoms: preprocess, sweep, evaluate, explain")
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--full", action="store_true",
                   help="the paper's configuration (resnet50 + vgg19, freezing 0-0.75, ImageNet weights): a GPU box")
    p.add_argument("--n", type=int, help=f"phantoms in the training set (default: {d.n}; --full {full.n})")
    p.add_argument("--n-external", type=int,
                   help=f"phantoms in the external set (default: {d.n_external}; --full {full.n_external})")
    p.add_argument("--epochs", type=int,
                   help=f"epochs per trial (default: {d.sweep.epochs}; --full {full.sweep.epochs})")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    add_defaults_to_help(p, d)


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
                         progress=lambda line: print(line, flush=True), overwrite=args.overwrite)
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
