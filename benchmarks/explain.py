"""Benchmark: the explain job's CAM stage against naive pytorch-grad-cam and bare inference, plus
the whole job's images/s.

    python benchmarks/explain.py [--backbone resnet50] [--size 224] [--images 32] [--job-images 96]

CAM stage: ``score_and_cam`` (batches, backward stopped at the target layer) vs
  * naive: pytorch-grad-cam as its README shows it, one image at a time in a Python loop
    (``cam(input_tensor=x[i:i+1], targets=...)``: the full backward through every layer);
  * bare: the model's forward pass alone, batched, under ``torch.no_grad``;
same model, size, batch and threads, measured in the same run. Also checks that the fast maps
equal the naive ones. Whole job: ``run_explain`` over an archive of synthetic DICOMs
(decode, preprocess, CAM, write heatmaps/overlays/Parquet) on a local Ray.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

import mammo_ray  # noqa: F401  (loopback-only Ray)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--method", default="gradcam")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=32, help="images for the CAM-stage comparison")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--job-images", type=int, default=96, help="archive size for the whole-job figure (0: skip)")
    p.add_argument("--source-size", type=int, nargs=2, default=(1024, 832), metavar=("H", "W"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA for ours and bare")
    p.add_argument("--repeats", type=int, default=2, help="best of N timings")
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, seconds")
    return p


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def cam_stage(args, device: torch.device) -> dict:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from mammo_ray.explain.cam import _cam_class, resolve_target_layer, score_and_cam
    from mammo_ray.models.registry import build_model, get_submodule
    from mammo_ray.models.inference import autocast as _autocast

    torch.manual_seed(0)
    model = build_model(args.backbone).eval().to(device)
    x = torch.randn(args.images, 1, args.size, args.size, device=device)
    layer = get_submodule(model, resolve_target_layer(args.backbone))
    batches = [x[i:i + args.batch_size] for i in range(0, len(x), args.batch_size)]
    assert _cam_class(args.method) is not None

    def fast_layout():
        # ours and bare run channels_last (as the job's actors do); naive runs as its README shows
        model.to(memory_format=torch.channels_last)
        return [b.contiguous(memory_format=torch.channels_last) for b in batches]

    def naive(channels_last: bool = False):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        out = []
        # pytorch-grad-cam's README usage: one CAM object, one image per call
        with GradCAM(model=model, target_layers=[layer]) as cam:
            for i in range(len(x)):
                out.append(cam(input_tensor=x[i:i + 1].contiguous(memory_format=fmt), targets=[ClassifierOutputTarget(0)]))
        return np.concatenate(out)

    def ours():
        return np.concatenate([score_and_cam(model, args.backbone, b, method=args.method, amp=args.amp)[1]
                               for b in fast_layout()])

    def bare():
        xs = fast_layout()
        with torch.no_grad(), _autocast(device, args.amp):
            for b in xs:
                model(b)

    ours(), bare()  # warm-up (allocator, cuDNN autotune)
    maps_naive = naive() if args.method == "gradcam" else None
    t_naive = _best(naive, args.repeats)
    t_naive_cl = _best(lambda: naive(channels_last=True), args.repeats)  # how much is layout, how much is method
    t_ours = _best(ours, args.repeats)
    t_bare = _best(bare, args.repeats)
    n = len(x)
    res = {"naive_images_per_s": round(n / t_naive, 2), "cam_images_per_s": round(n / t_ours, 2),
           "bare_forward_images_per_s": round(n / t_bare, 2),
           "naive_channels_last_images_per_s": round(n / t_naive_cl, 2),
           "cam_vs_naive": round(t_naive / t_ours, 3), "cam_vs_naive_channels_last": round(t_naive_cl / t_ours, 3),
           "cam_vs_bare_forward": round(t_bare / t_ours, 3)}
    if maps_naive is not None and not args.amp:
        res["max_abs_diff_vs_naive_maps"] = float(np.abs(ours() - np.clip(maps_naive, 0, 1)).max())
    return res


def whole_job(args, root: str) -> dict:
    from mammo_ray.config import PreprocessSpec, TrainConfig
    from mammo_ray.data.synth import write_phantoms
    from mammo_ray.config import ExplainConfig
    from mammo_ray.explain.job import run_explain
    from mammo_ray.models.registry import build_model
    from mammo_ray.models.checkpoint import save_checkpoint

    ckpt = os.path.join(root, "ckpt.pt")
    save_checkpoint(ckpt, model=build_model(args.backbone), cfg=TrainConfig(backbone=args.backbone),
                    spec=PreprocessSpec(size=args.size), epoch=0, metrics={})
    distinct = os.path.join(root, "distinct")
    h, w = args.source_size
    write_phantoms(distinct, min(16, args.job_images), seed=0, height=h, width=w, formats=("dcm",))
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(distinct) for f in fs if f.endswith(".dcm"))
    archive = os.path.join(root, "archive")
    os.makedirs(archive)
    for i in range(args.job_images):
        os.link(files[i % len(files)], os.path.join(archive, f"img_{i:06d}.dcm"))
    t0 = time.perf_counter()
    summary = run_explain([archive], ckpt, os.path.join(root, "out"),
                          ExplainConfig(method=args.method, batch_size=args.batch_size))
    wall = time.perf_counter() - t0
    assert summary["balanced"] and summary["errors"] == 0, summary
    return {"job_images": args.job_images, "job_source": f"{h}x{w} uint16 DICOM (synthetic)",
            "job_images_per_s": summary["images_per_second"], "job_wall_s_incl_ray_start": round(wall, 1)}


def main(args) -> dict:
    from mammo_ray.models.inference import resolve_device

    if args.smoke_test:
        args.backbone, args.size, args.images, args.batch_size, args.job_images, args.repeats = "simplecnn", 64, 8, 4, 8, 1
        args.source_size = (256, 208)
    device = resolve_device(args.device)
    result = {"benchmark": "explain", "backbone": args.backbone, "method": args.method, "size": args.size,
              "images": args.images, "batch_size": args.batch_size, "device": str(device),
              "torch_threads": torch.get_num_threads(), "amp": args.amp}
    result.update(cam_stage(args, device))
    if args.job_images:
        import ray

        root = tempfile.mkdtemp(prefix="bench-explain-")
        ours = not ray.is_initialized()  # a caller's Ray (the test suite's) is left running
        try:
            result.update(whole_job(args, root))
        finally:
            if ours:
                ray.shutdown()
            shutil.rmtree(root, ignore_errors=True)
    result["targets"] = {"cam_vs_naive": ">= 3", "cam_vs_bare_forward": ">= 0.8"}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
    sys.exit(0)
