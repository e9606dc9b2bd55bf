"""Benchmark: batched evaluation (``predict``, batch 64) against one image at a time, same model.

    python benchmarks/evaluate.py [--backbone resnet18] [--size 224] [--images 256]

Prints one JSON object with both images/s and their ratio.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--smoke-test", action="store_true")
    return p


def main(args) -> dict:
    from mammo_ray.config import PreprocessSpec
    from mammo_ray.models.registry import build_model
    from mammo_ray.data.arrays import SplitArrays
    from mammo_ray.config import TrainConfig
    from mammo_ray.models.inference import predict
    from mammo_ray.models.normalization import resolve_normalization

    if args.smoke_test:
        args.backbone, args.size, args.images = "simplecnn", 64, 32
    rng = np.random.default_rng(0)
    arrays = SplitArrays(pixels=rng.integers(0, 256, (args.images, args.size, args.size), dtype=np.uint8),
                         labels=np.arange(args.images) % 2, image_ids=[str(i) for i in range(args.images)],
                         patient_keys=[None] * args.images, split="test")
    # random init: the normalisation training would resolve for it (the spec's default)
    norm = resolve_normalization(TrainConfig(backbone=args.backbone, pretrained=None), PreprocessSpec(size=args.size))
    torch.manual_seed(0)
    model = build_model(args.backbone).eval().to(memory_format=torch.channels_last)
    device = torch.device("cpu")
    predict(model, arrays, norm=norm, device=device, batch_size=args.batch_size)  # warm-up
    t0 = time.perf_counter()
    batched = predict(model, arrays, norm=norm, device=device, batch_size=args.batch_size)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = predict(model, arrays, norm=norm, device=device, batch_size=1)
    t_single = time.perf_counter() - t0
    result = {"benchmark": "evaluate", "backbone": args.backbone, "size": args.size, "images": args.images,
              "threads": torch.get_num_threads(), "batched_images_per_s": round(args.images / t_batched, 2),
              "single_images_per_s": round(args.images / t_single, 2),
              "batched_vs_single": round(t_single / t_batched, 3),
              "max_abs_score_difference": float(np.abs(batched - single).max())}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
