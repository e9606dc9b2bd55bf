"""Benchmark: train-step images/s of resnet50 at freezing ratios 0, 0.5 and 1.0, and the
mammo_ray loop (uint8 -> float, seeded augmentation, CyclicLR, freezing) against a bare
PyTorch loop on the same model and batch.

    python benchmarks/train.py [--size 224] [--batch-size 16] [--steps 4]

Prints one JSON object. Targets (docs/benchmarks.md): freeze 0.5 >= 1.6x the images/s of freeze 0;
loop_vs_bare >= 0.9.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed steps per measurement (after 1 warm-up)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 (fp16 where bf16 is missing) autocast on CUDA; --no-amp for fp32 (no effect on CPU)")
    p.add_argument("--smoke-test", action="store_true")
    return p


def synthetic_split(n: int, size: int):
    from mammo_ray.data.arrays import SplitArrays

    rng = np.random.default_rng(0)
    return SplitArrays(pixels=rng.integers(0, 256, (n, size, size), dtype=np.uint8),
                       labels=np.arange(n) % 2, image_ids=[f"b{i}" for i in range(n)],
                       patient_keys=[None] * n, split="train")


def loop_images_per_s(cfg, spec, data, device) -> float:
    """mammo_ray's train_one_epoch: one warm-up epoch of 1 batch, then ``steps`` batches timed."""
    from dataclasses import replace

    from mammo_ray.train.loop import build_training_model, make_loss, make_optimizer, make_scheduler, train_one_epoch

    torch.manual_seed(0)
    model = build_training_model(cfg).to(device).to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, 8)
    loss_fn = make_loss(cfg, data, device)
    warm = replace(cfg, max_batches=1)
    train_one_epoch(model, data, cfg=warm, spec=spec, optimizer=opt, scheduler=sched, loss_fn=loss_fn, device=device, epoch=0)
    r = train_one_epoch(model, data, cfg=cfg, spec=spec, optimizer=opt, scheduler=sched, loss_fn=loss_fn, device=device, epoch=1)
    return r["train_images_per_s"]


def bare_images_per_s(cfg, data, device, steps: int) -> float:
    """The textbook loop: float tensors ready, SGD, BCE; same model, freezing and batch."""
    from mammo_ray.models.freezing import trainable_parameters
    from mammo_ray.train.loop import build_training_model

    torch.manual_seed(0)
    model = build_training_model(cfg).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(trainable_parameters(model), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    bs = cfg.batch_size
    x = torch.from_numpy(data.pixels[:bs]).unsqueeze(1).float().div(255).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(data.labels[:bs].astype(np.float32)).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x).squeeze(1), y).backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - t0)


def main(args) -> dict:
    from mammo_ray.config import PreprocessSpec, TrainConfig
    from mammo_ray.models.inference import resolve_device

    if args.smoke_test:
        args.backbone, args.size, args.batch_size, args.steps = "simplecnn", 64, 8, 2
    device = resolve_device(args.device)
    spec = PreprocessSpec(size=args.size)
    data = synthetic_split(args.batch_size * (args.steps + 1), args.size)
    result = {"benchmark": "train", "backbone": args.backbone, "size": args.size, "batch_size": args.batch_size,
              "amp": args.amp and device.type == "cuda",
              "device": str(device), "threads": torch.get_num_threads(), "images_per_s": {}}
    for ratio in args.ratios:
        cfg = TrainConfig(backbone=args.backbone, pretrained=None, freeze_ratio=ratio, batch_size=args.batch_size,
                          max_batches=args.steps,
                          device=args.device, augment=True, amp=args.amp)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result["images_per_s"][str(ratio)] = round(loop_images_per_s(cfg, spec, data, device), 3)
        if device.type == "cuda":
            result.setdefault("peak_gpu_memory_mb", {})[str(ratio)] = round(torch.cuda.max_memory_allocated() / 2**20)
    base = result["images_per_s"][str(args.ratios[0])]
    result["speedup_vs_freeze_0"] = {k: round(v / base, 3) for k, v in result["images_per_s"].items()}
    cfg = TrainConfig(backbone=args.backbone, pretrained=None, freeze_ratio=0.5, batch_size=args.batch_size,
                      max_batches=args.steps,
                      device=args.device)
    ours = loop_images_per_s(cfg, spec, data, device)
    bare = bare_images_per_s(cfg, data, device, args.steps)
    result.update({"loop_images_per_s_r0.5": round(ours, 3), "bare_images_per_s_r0.5": round(bare, 3),
                   "loop_vs_bare": round(ours / bare, 3),
                   "targets": {"speedup_vs_freeze_0 at 0.5": ">= 1.6", "loop_vs_bare": ">= 0.9"}})
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
