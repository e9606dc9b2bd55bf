"""The configurations of training: one run (:class:`TrainConfig`) and the Tune sweep
(:class:`SweepConfig`), with the vocabularies they validate against; how they scale is
``config/scale.py``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mammo_ray.config.base import MAX_BATCH, _check_choice, _check_lr, check_finite, from_mapping, load_yaml
from mammo_ray.config.scale import check_workers, check_ingest, per_worker

#: the backbones the model registry ships. Named here, below the model layer, so configs validate
#: and ``--help`` lists them without importing torch; ``mammo_ray.models.registry`` adds any
#: backbone registered later (tests/test_layers.py checks the two lists agree).
BUILTIN_BACKBONES = ("efficientnet_b0", "efficientnet_lite0", "resnet18", "resnet50", "simplecnn", "vgg19")
_REGISTERED_BACKBONES: set[str] = set(BUILTIN_BACKBONES)


def add_backbone_name(name: str) -> None:
    """Called by the model registry for every backbone it registers."""
    _REGISTERED_BACKBONES.add(name)


def backbone_names() -> list[str]:
    """Every backbone a config accepts, sorted."""
    return sorted(_REGISTERED_BACKBONES)


CLR_MODES = ("triangular", "triangular2", "exp_range")
OPTIMIZERS = ("sgd", "adamw")
IMBALANCE = ("weighted_loss", "balanced_sampler", "none")
PRETRAINED = ("imagenet",)
#: ``pretrained`` for random init, where a flag or an override of None means "not given"
NO_PRETRAINED = "none"
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: backbone x freezing ratio x cyclic-LR bounds, and the loop's options.

    Attributes:
        backbone: a name from the backbone registry (``mammo-ray train --help`` lists them).
        freeze_ratio: fraction r in [0, 1] of the backbone's ordered units frozen (prefix).
        pretrained: ``imagenet`` (the default) or None / ``"none"`` (random init; backbones
            without ImageNet weights, such as simplecnn, need it). ImageNet weights come from
            the torch hub cache, downloaded once with torchvision's hash check when missing
            (efficientnet_lite0: from its pip package, nothing downloaded).
        weights: path or URI of a torchvision-format state dict to start from (instead of pretrained).
        offline: never download (also ``MAMMO_RAY_OFFLINE=1``): a missing file is an error.
        base_lr, max_lr: CyclicLR bounds (``base_lr < max_lr``).
        clr_mode: ``triangular`` | ``triangular2`` | ``exp_range`` (``clr_gamma`` for the latter).
        step_size_epochs: half a cycle, in epochs (converted to batches per epoch).
        imbalance: ``weighted_loss`` (pos_weight = negatives/positives), ``balanced_sampler``, ``none``.
        patience: epochs without a better val AUC before stopping (0: never stop early).
        max_batches: cap on optimizer steps per epoch (smoke tests; 0 = no cap).
        workers: data-parallel workers (DDP ranks) of the run; more than 1 runs on Ray Train.
        cpus_per_worker, gpus_per_worker: what each worker holds on the Ray cluster.
        ingest: ``memory``, ``stream`` (Ray Data, O(batch) memory) or ``auto`` (config/scale.py).
        accumulate: micro-batches per optimizer step (the cyclic LR counts optimizer steps).
        shuffle, shuffle_buffer: a stream's per-epoch shuffle (``local``: file order and a seeded
            buffer of that many rows; ``full``: Ray Data's random_shuffle).
        activation_checkpointing: recompute each trainable unit's activations in the backward
            pass (``models/recompute.py``): about half the memory, a third more compute.
    """

    # The defaults are what the real-data runs (docs: runs 1-9 on 3,383 digital mammograms) found
    # best: ImageNet-pretrained efficientnet_lite0 (+0.11 AUC over random init at the same
    # budget), half its units frozen (best by val in runs 2-9), one whole cyclic-LR cycle in two
    # epochs (run 7: a third epoch, climbing back to the top LR, cost 0.10-0.12 val AUC).
    backbone: str = "efficientnet_lite0"
    freeze_ratio: float = 0.5
    pretrained: str | None = "imagenet"
    weights: str | None = None
    epochs: int = 2
    batch_size: int = 32
    eval_batch_size: int = 64
    # AdamW with a 1e-4..1e-3 cycle: what benchmarks/realdata.py found best for a pretrained
    # backbone on real mammograms; it also takes simplecnn on phantoms to val AUC >= 0.9 in 10
    # epochs (tests/test_cli.py), where the old SGD 1e-3..1e-2 default stopped at about 0.70
    optimizer: str = "adamw"
    base_lr: float = 1e-4
    max_lr: float = 1e-3
    clr_mode: str = "triangular"
    clr_gamma: float = 0.999
    step_size_epochs: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    imbalance: str = "weighted_loss"
    augment: bool = True
    hflip: bool = False
    patience: int = 5
    seed: int = 0
    channels_last: bool = True
    amp: bool = True
    device: str = "auto"
    max_batches: int = 0
    offline: bool = False
    # scale (config/scale.py): data-parallel workers and their resources, the ingest, and
    # gradient accumulation; batch_size is per worker, so a step holds batch x workers x accumulate
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    ingest: str = "auto"
    accumulate: int = 1
    shuffle: str = "local"
    shuffle_buffer: int = 512
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_finite(self)
        check_workers(self.workers, self.cpus_per_worker, self.gpus_per_worker)
        check_ingest(self.ingest, self.shuffle, self.shuffle_buffer, self.accumulate, self.imbalance)
        names = backbone_names()
        if self.backbone not in names:
            raise ValueError(f"backbone={self.backbone!r}: use one of {', '.join(names)}")
        if not 0.0 <= float(self.freeze_ratio) <= 1.0:
            raise ValueError(f"freeze_ratio={self.freeze_ratio!r}: use a number in [0, 1]")
        if self.pretrained == NO_PRETRAINED:  # the spelling of random init where None means "not given"
            object.__setattr__(self, "pretrained", None)
        if self.pretrained is not None:
            _check_choice("pretrained", self.pretrained, PRETRAINED + (NO_PRETRAINED,))
        if self.pretrained and self.weights:
            raise ValueError(f"pretrained={self.pretrained!r} and weights={self.weights!r}: give one of them "
                             f"(pretrained: {NO_PRETRAINED} to start from the weights file)")
        _check_lr("base_lr", self.base_lr)
        _check_lr("max_lr", self.max_lr)
        if not 0 < self.base_lr < self.max_lr:
            raise ValueError(f"base_lr={self.base_lr!r}, max_lr={self.max_lr!r}: need 0 < base_lr < max_lr")
        _check_choice("clr_mode", self.clr_mode, CLR_MODES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("imbalance", self.imbalance, IMBALANCE)
        _check_choice("device", self.device, DEVICES)
        for name, top in (("epochs", 100_000), ("batch_size", MAX_BATCH), ("eval_batch_size", MAX_BATCH)):
            if not 1 <= int(getattr(self, name)) <= top:
                raise ValueError(f"{name}={getattr(self, name)!r}: use an int in [1, {top}]")
        if self.step_size_epochs <= 0:
            raise ValueError(f"step_size_epochs={self.step_size_epochs!r}: must be > 0")
        if self.patience < 0 or self.max_batches < 0:
            raise ValueError(f"patience={self.patience!r}, max_batches={self.max_batches!r}: must be >= 0")

    @classmethod
    def load(cls, path: str | None = None, **overrides: Any) -> TrainConfig:
        """YAML file first, then overrides (``None`` values ignored)."""
        return from_mapping(cls, load_yaml(path), **overrides)


SCHEDULERS = ("fifo", "asha")


@dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune sweep: backbone x freezing ratio x cyclic-LR bounds (x mode) x num_samples.

    Attributes:
        lr_bounds: grid of ``[base_lr, max_lr]`` pairs; each needs ``base_lr < max_lr``.
        base_lr_range, max_lr_range: instead of ``lr_bounds``, log-uniform sampling ranges
            (``num_samples`` draws per grid point); ``max(base_lr_range) < min(max_lr_range)``
            so every draw has ``max_lr > base_lr``.
        train: extra TrainConfig keys shared by every trial (optimizer, step_size_epochs...).
        max_failures: retries of a failed trial, each from its last checkpoint.
    """

    # train's defaults swept over the freezing ratio (4 trials): the backbone the real-data runs
    # used, its LR bounds (train's, so both stages agree) and its 2-epoch schedule; every trial
    # starts from TrainConfig's defaults (ImageNet weights), `train:` overrides them
    backbones: tuple[str, ...] = (TrainConfig.backbone,)
    freeze_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    lr_bounds: tuple[tuple[float, float], ...] = ((TrainConfig.base_lr, TrainConfig.max_lr),)
    base_lr_range: tuple[float, float] | None = None
    max_lr_range: tuple[float, float] | None = None
    clr_modes: tuple[str, ...] = (TrainConfig.clr_mode,)
    epochs: int = TrainConfig.epochs
    batch_size: int = TrainConfig.batch_size
    num_samples: int = 1
    scheduler: str = "fifo"
    grace_period: int = 2
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    workers: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    max_failures: int = 2
    seed: int = 0
    train: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_finite(self)
        names = backbone_names()
        for key in ("backbones", "freeze_ratios", "clr_modes"):
            if not getattr(self, key):
                raise ValueError(f"{key}: the grid is empty; give at least one value")
        for b in self.backbones:
            if b not in names:
                raise ValueError(f"backbones: {b!r} is not a backbone; use {', '.join(names)}")
        for r in self.freeze_ratios:
            if not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"freeze_ratios: {r!r} is outside [0, 1]")
        for m in self.clr_modes:
            _check_choice("clr_modes", m, CLR_MODES)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        sampled = self.base_lr_range is not None or self.max_lr_range is not None
        if sampled:
            if self.base_lr_range is None or self.max_lr_range is None:
                raise ValueError("base_lr_range and max_lr_range: give both (log-uniform sampling) or neither")
            for name in ("base_lr_range", "max_lr_range"):
                lo, hi = (float(x) for x in getattr(self, name))
                if not 0 < lo < hi:
                    raise ValueError(f"{name}={list(getattr(self, name))}: need 0 < low < high")
                _check_lr(name, hi)
                object.__setattr__(self, name, (lo, hi))
            if self.base_lr_range[1] >= self.max_lr_range[0]:
                raise ValueError(f"base_lr_range={list(self.base_lr_range)} overlaps max_lr_range={list(self.max_lr_range)}: "
                                 "every max_lr must be > every base_lr")
        else:
            if not self.lr_bounds:
                raise ValueError("lr_bounds: the grid is empty; give at least one [base_lr, max_lr] pair")
            pairs = tuple((float(a), float(b)) for a, b in self.lr_bounds)
            for a, b in pairs:
                _check_lr("lr_bounds base_lr", a)
                _check_lr("lr_bounds max_lr", b)
                if not 0 < a < b:
                    raise ValueError(f"lr_bounds: [{a}, {b}] needs 0 < base_lr < max_lr")
            object.__setattr__(self, "lr_bounds", pairs)
        object.__setattr__(self, "freeze_ratios", tuple(float(r) for r in self.freeze_ratios))
        for name, top in (("epochs", 100_000), ("batch_size", MAX_BATCH), ("num_samples", 100_000),
                          ("grace_period", 100_000)):
            if not 1 <= int(getattr(self, name)) <= top:
                raise ValueError(f"{name}={getattr(self, name)!r}: use an int in [1, {top}]")
        cpus, gpus = self.cpus_per_trial, self.gpus_per_trial
        if (cpus is not None and cpus <= 0) or (gpus is not None and gpus < 0) or self.max_failures < 0:
            raise ValueError(f"cpus_per_trial={cpus}, gpus_per_trial={gpus}, "
                             f"max_failures={self.max_failures}: need cpus > 0, gpus >= 0, max_failures >= 0")
        if gpus is not None and gpus > 1 and gpus != int(gpus):
            # Ray packs fractions of one GPU, or whole GPUs: 1.5 GPUs is a trial Ray cannot place
            raise ValueError(f"gpus_per_trial={gpus:g}: use a fraction of one GPU (e.g. 0.25, 0.5) or a "
                             "whole number of GPUs (1, 2, ...)")
        check_workers(self.workers, self.worker_cpus, self.worker_gpus)  # also resolves the two spellings
        reserved = {"backbone", "freeze_ratio", "base_lr", "max_lr", "clr_mode", "epochs", "batch_size", "seed",
                    "workers", "cpus_per_worker", "gpus_per_worker"}
        bad = sorted(set(self.train) & reserved)
        if bad:
            raise ValueError(f"train: {', '.join(bad)} are sweep keys; set them at the top level of the sweep file")
        # unknown TrainConfig keys are refused here, before any trial starts
        TrainConfig.load(None, backbone=self.backbones[0], **dict(self.train))

    @property
    def worker_cpus(self) -> float:
        """CPUs of each of a trial's workers (``--cpus-per-worker``, or ``--cpus-per-trial`` / workers)."""
        return per_worker(self.workers, self.cpus_per_worker, self.cpus_per_trial, name="cpus", default=1.0)

    @property
    def worker_gpus(self) -> float:
        """GPUs of each of a trial's workers (``--gpus-per-worker``, or ``--gpus-per-trial`` / workers)."""
        return per_worker(self.workers, self.gpus_per_worker, self.gpus_per_trial, name="gpus", default=0.0)

    @property
    def grid_size(self) -> int:
        lr = 1 if self.base_lr_range is not None else len(self.lr_bounds)
        return len(self.backbones) * len(self.freeze_ratios) * lr * len(self.clr_modes)

    @classmethod
    def load(cls, path: str | None = None, **overrides: Any) -> SweepConfig:
        data = load_yaml(path)
        for key in ("lr_bounds", "base_lr_range", "max_lr_range"):
            if key in data and isinstance(data[key], list):
                data[key] = tuple(tuple(x) if isinstance(x, list) else x for x in data[key])
        return from_mapping(cls, data, **overrides)
