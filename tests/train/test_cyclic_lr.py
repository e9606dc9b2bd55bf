"""CyclicLR as configured by the loop: the LR trace follows each mode's formula (Smith 2017)."""
from __future__ import annotations

import math

import pytest
import torch

from mammo_ray.config import TrainConfig
from mammo_ray.train.loop import make_scheduler


def expected_lr(it: int, *, base: float, top: float, step: int, mode: str, gamma: float) -> float:
    cycle = math.floor(1 + it / (2 * step))
    x = abs(it / step - 2 * cycle + 1)
    scale = {"triangular": 1.0, "triangular2": 1 / 2 ** (cycle - 1), "exp_range": gamma ** it}[mode]
    return base + (top - base) * max(0.0, 1 - x) * scale


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lr_trace_matches_formula(mode, optimizer):
    cfg = TrainConfig(backbone="simplecnn", base_lr=1e-4, max_lr=1e-2, clr_mode=mode, clr_gamma=0.99,
                      step_size_epochs=1.5, optimizer=optimizer)
    steps_per_epoch = 4  # half-cycle = round(1.5 * 4) = 6 batches
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW)([torch.nn.Parameter(torch.zeros(1))], lr=1.0,
                                                                        **({"momentum": 0.9} if optimizer == "sgd" else {}))
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    lrs, moms = [], []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        g = opt.param_groups[0]
        moms.append(g["momentum"] if optimizer == "sgd" else g["betas"][0])
        opt.step()
        sched.step()
    for it, lr in enumerate(lrs):
        assert lr == pytest.approx(expected_lr(it, base=1e-4, top=1e-2, step=6, mode=mode, gamma=0.99), rel=1e-6), it
    # momentum (or Adam's beta1) cycles inversely between 0.95 and 0.85: lowest at the LR peak
    for it, m in enumerate(moms):
        frac = (expected_lr(it, base=1e-4, top=1e-2, step=6, mode=mode, gamma=0.99) - 1e-4) / (1e-2 - 1e-4)
        assert m == pytest.approx(0.95 - 0.10 * frac, rel=1e-6), it
    assert max(range(12), key=lambda i: lrs[i]) == 6 and moms[0] == pytest.approx(0.95)
