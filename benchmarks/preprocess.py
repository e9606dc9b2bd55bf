"""Benchmark: the Ray Data preprocessing job vs a single-process loop of the same functions,
on full-size 16-bit synthetic DICOM mammograms; and peak memory at N and 4N images.

    python benchmarks/preprocess.py [--n 24] [--height 3328 --width 2560] [--cpus 2]

Prints one JSON object. Targets (docs/benchmarks.md): ray_vs_loop >= 1.6 on 2 CPUs (2.0 is the limit),
memory flat in N (peak_mb at 4N within ~10% of N).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import mammo_ray  # noqa: F401  (loopback-only Ray)
from mammo_ray.memory import PeakMemory


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24, help="images in the small run (the large run is 4N)")
    p.add_argument("--height", type=int, default=3328)
    p.add_argument("--width", type=int, default=2560)
    p.add_argument("--distinct", type=int, default=8, help="distinct phantoms, copied to reach N")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    return p


def make_archive(root: str, n: int, distinct: int, height: int, width: int) -> str:
    from mammo_ray.data.synth import write_phantoms

    seed_dir = os.path.join(root, "distinct")
    if not os.path.isdir(seed_dir):
        write_phantoms(seed_dir, distinct, seed=0, height=height, width=width, formats=("dcm",))
    out = os.path.join(root, f"archive-{n}")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(seed_dir) for f in fs if f.endswith(".dcm"))
    for i in range(n):
        src = files[i % len(files)]
        cls = os.path.basename(os.path.dirname(src))
        os.makedirs(os.path.join(out, cls), exist_ok=True)
        shutil.copy(src, os.path.join(out, cls, f"img_{i:06d}.dcm"))
    return out


def run_loop(archive: str, out: str, cfg) -> float:
    """The same functions in one process: list, assign, process_batch per batch, no Ray."""
    import pandas as pd

    from mammo_ray.data.inputs import discover
    from mammo_ray.data.pipeline import _assign, process_batch
    from mammo_ray.privacy import load_patient_secret

    t0 = time.perf_counter()
    listing = discover([archive])
    _assign(listing.records, cfg, load_patient_secret(cfg.patient_key_file))
    frame = pd.DataFrame(listing.records)
    for i in range(0, len(frame), cfg.batch_size):
        status = process_batch(frame.iloc[i:i + cfg.batch_size], cfg=cfg, out=out)
        assert (status["status"] == "ok").all(), status["reason"].tolist()
    return time.perf_counter() - t0


def run_ray(archive: str, out: str, cfg) -> tuple[float, dict]:
    from mammo_ray.data.pipeline import run_preprocess

    t0 = time.perf_counter()
    summary = run_preprocess([archive], out, cfg, overwrite=True)
    assert summary["balanced"] and summary["errors"] == 0, summary
    return time.perf_counter() - t0, summary


def main(args) -> dict:
    import ray

    from mammo_ray.config import PreprocessConfig
    from mammo_ray.ray_utils import init_ray

    if args.smoke_test:
        args.n, args.height, args.width, args.distinct = 4, 640, 512, 2
    cfg = PreprocessConfig.load(batch_size=args.batch_size)
    root = tempfile.mkdtemp(prefix="bench-preprocess-")
    ours = not ray.is_initialized()  # a caller's Ray (the test suite's) is left running
    try:
        small = make_archive(root, args.n, args.distinct, args.height, args.width)
        large = make_archive(root, 4 * args.n, args.distinct, args.height, args.width)
        run_loop(small, os.path.join(root, "loop-warm"), cfg)  # imports and first-call costs
        loop_s = run_loop(small, os.path.join(root, "loop-out"), cfg)
        init_ray(num_cpus=args.cpus)
        run_ray(small, os.path.join(root, "warm"), cfg)  # start the worker processes once
        # timings first, without the memory sampler (it costs CPU on a 2-core machine)
        ray_s, _ = run_ray(small, os.path.join(root, "ray-out"), cfg)
        ray4_s, _ = run_ray(large, os.path.join(root, "ray-out-4n"), cfg)
        with PeakMemory() as mem_n:
            run_ray(small, os.path.join(root, "ray-out"), cfg)
        with PeakMemory() as mem_4n:
            run_ray(large, os.path.join(root, "ray-out-4n"), cfg)
        if ours:
            ray.shutdown()
        result = {
            "benchmark": "preprocess",
            "image": f"{args.height}x{args.width} uint16 DICOM (synthetic)",
            "cpus": args.cpus, "batch_size": args.batch_size, "n": args.n,
            "loop_images_per_s": round(args.n / loop_s, 3),
            "ray_images_per_s": round(args.n / ray_s, 3),
            "ray_images_per_s_4n": round(4 * args.n / ray4_s, 3),
            "ray_vs_loop": round(loop_s / ray_s, 3),
            "ray_4n_vs_loop": round((4 * args.n / ray4_s) / (args.n / loop_s), 3),
            "peak_mb_n": round(mem_n.peak / 2**20, 1),
            "peak_mb_4n": round(mem_4n.peak / 2**20, 1),
            "peak_4n_over_n": round(mem_4n.peak / max(mem_n.peak, 1), 3),
            "targets": {"ray_vs_loop": ">= 1.6 (2.0 limit on 2 cores)", "peak_4n_over_n": "~1.0 (flat)"},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
    sys.exit(0)
