"""Benchmark: wall time of an N-trial Tune sweep against N sequential `mammo-ray train` runs of
the same configs on the same CPUs, and per-trial training images/s against a bare PyTorch loop.

    python benchmarks/tune.py [--trials 2] [--backbone resnet18] [--size 96] [--epochs 16]

Each trial uses every CPU (``cpus_per_trial`` = CPUs), so trials run one after another
exactly like the sequential baseline and the difference is Tune's overhead (scheduling,
shipping the data, per-epoch checkpoints). Prints one JSON object. Targets (docs/benchmarks.md):
overhead under 10% once trials last over a minute; trial_vs_bare >= 0.9.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import mammo_ray  # noqa: F401  (loopback-only Ray)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--smoke-test", action="store_true")
    return p


def main(args) -> dict:
    import ray

    from mammo_ray.config import PreprocessConfig, SweepConfig, TrainConfig
    from mammo_ray.data.pipeline import run_preprocess
    from mammo_ray.data.synth import write_phantoms
    from mammo_ray.ray_utils import init_ray
    from mammo_ray.train.data import load_training_data
    from mammo_ray.train.sweep import run_sweep

    sys.path.insert(0, os.path.dirname(__file__))
    from train import bare_images_per_s  # the bare loop of benchmarks/train.py

    if args.smoke_test:
        args.trials, args.backbone, args.size, args.images, args.epochs = 1, "simplecnn", 64, 60, 1
    root = tempfile.mkdtemp(prefix="bench-tune-")
    ours = not ray.is_initialized()  # a caller's Ray (the test suite's) is left running
    bin_dir = os.path.dirname(sys.executable)
    try:
        write_phantoms(os.path.join(root, "raw"), args.images, seed=2, height=256, width=208)
        init_ray(num_cpus=args.cpus)
        data = os.path.join(root, "data")
        run_preprocess([os.path.join(root, "raw")], data, PreprocessConfig.load(size=args.size))
        ratios = [round(i / max(args.trials, 1), 3) for i in range(args.trials)]
        sweep = SweepConfig(backbones=(args.backbone,), freeze_ratios=tuple(ratios), lr_bounds=((1e-4, 1e-3),),
                            epochs=args.epochs, batch_size=32, cpus_per_trial=args.cpus,
                            train={"patience": 0, "pretrained": "none"})
        t0 = time.perf_counter()
        summary = run_sweep(data, os.path.join(root, "sweep"), sweep)
        tune_s = time.perf_counter() - t0
        assert summary["errors"] == 0, summary
        if ours:  # the sequential runs get the CPUs to themselves
            ray.shutdown()
        seq_s = 0.0
        env = {**os.environ, "RAY_ADDRESS": ""}
        for i, ratio in enumerate(ratios):
            t0 = time.perf_counter()
            subprocess.run([os.path.join(bin_dir, "mammo-ray"), "train", "--data", data, "--out",
                            os.path.join(root, f"seq{i}"), "--backbone", args.backbone, "--freeze-ratio", str(ratio),
                            "--base-lr", "1e-4", "--max-lr", "1e-3", "--epochs", str(args.epochs), "--patience", "0",
                            "--batch-size", "32", "--pretrained", "none"], check=True, env=env, capture_output=True)
            seq_s += time.perf_counter() - t0
        # per-trial images/s (from the trial's history) against the bare loop, same model/batch
        import csv

        import torch

        spec, train, _ = load_training_data(data)
        with open(os.path.join(root, "seq0", "history.csv")) as f:
            seq_ips = [float(r["train_images_per_s"]) for r in csv.DictReader(f)]
        trial_state = torch.load(os.path.join(root, "sweep", "best", f"{args.backbone}-r0", "checkpoint.pt"),
                                 weights_only=True, map_location="cpu")
        cfg = TrainConfig(backbone=args.backbone, pretrained=None, freeze_ratio=0.0, batch_size=32)
        bare = bare_images_per_s(cfg, train, torch.device("cpu"), 6)
        trial_img_s = float(trial_state["metrics"]["train_images_per_s"])
        result = {
            "benchmark": "tune", "backbone": args.backbone, "size": args.size, "trials": args.trials,
            "epochs": args.epochs, "cpus": args.cpus, "train_images": len(train),
            "tune_wall_s": round(tune_s, 2), "sequential_train_wall_s": round(seq_s, 2),
            "tune_overhead": round(tune_s / seq_s - 1, 4), "mean_trial_s": round(tune_s / args.trials, 1),
            "trial_images_per_s": round(trial_img_s, 2), "sequential_images_per_s": round(sum(seq_ips) / len(seq_ips), 2),
            "bare_images_per_s": round(bare, 2), "trial_vs_bare": round(trial_img_s / bare, 3),
            "targets": {"tune_overhead": "< 0.10 once trials last > 60 s", "trial_vs_bare": ">= 0.9"},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
