"""Benchmark: the archive jobs' steady-state throughput against their own model stage.

    python benchmarks/archive.py [--backbone resnet50] [--size 224] [--n 32] [--source-size 1024 832]

A job's images/s over a whole run hides its start (Ray, the actor's process, the model load).
Here each job runs on an archive of N and of 4N images; the steady-state rate is the 3N extra
images over the extra wall time, and the start-up is what the N-image run spent beyond N images
at that rate. Each is compared, at the same thread count as its actor (Ray gives a 1-CPU actor
one thread), with its model stage measured in the same run:

* ``score`` against the bare batched forward pass (``torch.inference_mode``);
* ``explain --cam-for all`` against the CAM stage alone (``score_and_cam``);
* ``explain --cam-for top:K`` on the 4N archive (K = 4N/10) against ``score`` on the same archive.

The archive is synthetic uint16 DICOMs at ``--source-size`` (hard links to a few distinct files),
the checkpoint a randomly initialised ``--backbone`` (speed does not depend on the weights).
summary.json's per-stage seconds of the 4N runs are reported too. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

import mammo_ray  # noqa: F401  (loopback-only Ray)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--n", type=int, default=32, help="the small archive; the large one is 4x")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--source-size", type=int, nargs=2, default=(1024, 832), metavar=("H", "W"))
    p.add_argument("--jobs", nargs="+", default=["score", "explain", "top"], choices=("score", "explain", "top"))
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    return p


def _archive(root: str, name: str, n: int, files: list[str]) -> str:
    folder = os.path.join(root, name)
    os.makedirs(folder)
    for i in range(n):
        os.link(files[i % len(files)], os.path.join(folder, f"img_{i:06d}.dcm"))
    return folder


def model_stages(args, threads: int) -> dict:
    """Images/s of the bare forward pass and of the CAM stage, on ``threads`` threads."""
    from mammo_ray.explain.cam import score_and_cam
    from mammo_ray.models.registry import build_model

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(args.backbone).eval().to(memory_format=torch.channels_last)
        x = torch.randn(2 * args.batch_size, 1, args.size, args.size).contiguous(memory_format=torch.channels_last)
        batches = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]

        def forward():
            with torch.inference_mode():
                for b in batches:
                    model(b)

        def cam():
            for b in batches:
                score_and_cam(model, args.backbone, b)

        out = {}
        for name, fn in (("bare_forward", forward), ("cam_stage", cam)):
            fn()  # warm-up
            out[f"{name}_images_per_s"] = round(len(x) / _seconds(fn), 3)
        # the same with the machine's other cores busy, as the job keeps them (read tasks,
        # writes, the driver): how much of a job's gap is the machine's, not the job's
        with _busy_cores(max(0, (os.cpu_count() or 1) - threads)):
            for name, fn in (("bare_forward", forward), ("cam_stage", cam)):
                out[f"{name}_other_cores_busy_images_per_s"] = round(len(x) / _seconds(fn), 3)
        return out
    finally:
        torch.set_num_threads(before)


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# decode-like work: float arithmetic over a 1024x832 image and a sort, until killed
_BURN = ("import numpy as np\n"
         "a = np.random.default_rng(0).integers(0, 65535, (1024, 832), dtype=np.uint16)\n"
         "while True:\n    np.sort((a.astype(np.float32) * 0.7).ravel()[::7])\n")


class _busy_cores:
    """``n`` processes each keeping one core busy while the block runs."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        import subprocess

        self.procs = [subprocess.Popen([sys.executable, "-c", _BURN]) for _ in range(self.n)]
        time.sleep(1.0)  # started and busy
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait(timeout=10)


def _run(job: str, archive: str, ckpt: str, out: str, args, cam_for: str = "all") -> tuple[float, dict]:
    from mammo_ray.config import ExplainConfig, ScoreConfig
    from mammo_ray.explain.job import run_explain
    from mammo_ray.explain.score import run_score

    t0 = time.perf_counter()
    if job == "score":
        summary = run_score([archive], ckpt, out, ScoreConfig(batch_size=args.batch_size))
    else:
        summary = run_explain([archive], ckpt, out, ExplainConfig(batch_size=args.batch_size, cam_for=cam_for))
    wall = time.perf_counter() - t0
    assert summary["balanced"] and summary["errors"] == 0, summary
    return wall, summary


def steady(job: str, small: str, large: str, n: int, ckpt: str, root: str, args) -> dict:
    if not args.smoke_test:
        _run(job, small, ckpt, os.path.join(root, f"{job}-warm-up"), args)  # Ray's workers started, imports done
    t_small, _ = _run(job, small, ckpt, os.path.join(root, f"{job}-small"), args)
    t_large, summary = _run(job, large, ckpt, os.path.join(root, f"{job}-large"), args)
    # a difference below the timing noise (tiny smoke sizes) gives no rate rather than a huge one
    rate = 3 * n / (t_large - t_small) if t_large - t_small > 0.5 else None
    return {"steady_images_per_s": None if rate is None else round(rate, 3),
            "startup_s": None if rate is None else round(max(t_small - n / rate, 0.0), 1),
            "wall_s": [round(t_small, 1), round(t_large, 1)], "stage_seconds_large": summary["stage_seconds"],
            "pass_seconds_large": summary["pass_seconds"]}


def _ratio(a: float | None, b: float) -> float | None:
    return None if a is None else round(a / b, 3)


def main(args) -> dict:
    import ray

    from mammo_ray.config import PreprocessSpec, TrainConfig
    from mammo_ray.data.synth import write_phantoms
    from mammo_ray.models.checkpoint import save_checkpoint
    from mammo_ray.models.registry import build_model
    from mammo_ray.ray_utils import init_ray

    if args.smoke_test:
        # score at N and 4N and top:K (explain --cam-for all shares steady() with score)
        args.backbone, args.size, args.n, args.batch_size, args.source_size = "simplecnn", 64, 4, 4, (256, 208)
        args.jobs = ["score", "top"]
    root = tempfile.mkdtemp(prefix="bench-archive-")
    ours = not ray.is_initialized()  # a caller's Ray (the test suite's) is left running
    result = {"benchmark": "archive", "backbone": args.backbone, "size": args.size, "n": args.n,
              "batch_size": args.batch_size, "source": f"{args.source_size[0]}x{args.source_size[1]} uint16 DICOM",
              "cpus": os.cpu_count(), "actor_threads": 1}
    try:
        ckpt = os.path.join(root, "ckpt.pt")
        save_checkpoint(ckpt, model=build_model(args.backbone), cfg=TrainConfig(backbone=args.backbone),
                        spec=PreprocessSpec(size=args.size), epoch=0, metrics={})
        distinct = os.path.join(root, "distinct")
        write_phantoms(distinct, 8, seed=0, height=args.source_size[0], width=args.source_size[1], formats=("dcm",))
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(distinct) for f in fs if f.endswith(".dcm"))
        small, large = _archive(root, "small", args.n, files), _archive(root, "large", 4 * args.n, files)
        result.update(model_stages(args, threads=1))  # a 1-CPU actor's thread count
        init_ray()
        if "score" in args.jobs:
            result["score"] = steady("score", small, large, args.n, ckpt, root, args)
            result["score_vs_bare_forward"] = _ratio(result["score"]["steady_images_per_s"],
                                                     result["bare_forward_images_per_s"])
            result["score_vs_bare_forward_other_cores_busy"] = _ratio(
                result["score"]["steady_images_per_s"], result["bare_forward_other_cores_busy_images_per_s"])
        if "explain" in args.jobs:
            result["explain_all"] = steady("explain", small, large, args.n, ckpt, root, args)
            result["explain_vs_cam_stage"] = _ratio(result["explain_all"]["steady_images_per_s"],
                                                    result["cam_stage_images_per_s"])
            result["explain_vs_cam_stage_other_cores_busy"] = _ratio(
                result["explain_all"]["steady_images_per_s"], result["cam_stage_other_cores_busy_images_per_s"])
        if "top" in args.jobs and "score" in args.jobs:
            k = max(1, 4 * args.n // 10)
            t_top, summary = _run("explain", large, ckpt, os.path.join(root, "top"), args, cam_for=f"top:{k}")
            assert summary["cams"] == k, summary
            result["explain_top"] = {"k": k, "archive": 4 * args.n, "wall_s": round(t_top, 1),
                                     "pass_seconds": summary["pass_seconds"]}
            result["top_vs_score"] = round(t_top / result["score"]["wall_s"][1], 3)
    finally:
        if ours:
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    result["targets"] = {"score_vs_bare_forward": ">= 0.8", "explain_vs_cam_stage": ">= 0.8", "top_vs_score": "<= 1.5"}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
    sys.exit(0)
