"""Stage configurations: one frozen dataclass per stage, loaded from YAML then CLI overrides.

Every dataclass validates itself in ``__post_init__`` and refuses unknown keys, so a typo in
a YAML file is an error naming the key and the allowed ones, not a silently ignored option.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")

EQUALIZE_MODES = ("clahe", "global", "none")
RESIZE_MODES = ("pad", "stretch")
ORIENTATIONS = ("left", "right", "none")
OUTPUT_DTYPES = ("uint8", "uint16", "float32")
INVERSION_MODES = ("auto", "never")
OTHER_MODALITY = ("warn", "refuse")
#: Hard caps, whatever the memory: no mammography detector exceeds 8192 pixels a side, and
#: a larger value (from a flag, a YAML file or a checkpoint's stored spec) is a typo or hostile.
MAX_SIDE = 8192
MAX_BATCH = 4096


def check_finite(obj: Any) -> None:
    """Refuse NaN and inf in any float field (or tuple of floats) of a config dataclass: a NaN
    compares False with every bound, so range checks alone would let it through."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "float" in str(f.type) and isinstance(value, str):
            # YAML reads `nan` (no dot) as a string: a float field takes numbers only, as numbers
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{f.name}={value!r}: must be a number") from None
            object.__setattr__(obj, f.name, value)
        items = value if isinstance(value, (tuple, list)) else (value,)
        for v in items:
            for x in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(x, float) and not math.isfinite(x):
                    raise ValueError(f"{f.name}={value!r}: must be a finite number")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(allowed)}")


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, **overrides: Any) -> T:
    """Build a config dataclass from a mapping plus overrides (``None`` overrides are ignored).

    Raises:
        ValueError: on a key the dataclass does not have (names the allowed keys).
    """
    data = dict(data or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s) {', '.join(unknown)}: allowed keys are {', '.join(names)}"
        )
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data and isinstance(data[f.name], list):
            data[f.name] = tuple(data[f.name])
    return cls(**data)


def load_yaml(path: str | None) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load`` (an empty file is an empty mapping)."""
    if not path:
        return {}
    from mammo_ray.io import read_bytes

    try:
        data = yaml.safe_load(read_bytes(path).decode("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a plain YAML mapping: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain-python (YAML-safe) dict of a config dataclass; tuples become lists."""
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


@dataclass(frozen=True)
class PreprocessSpec:
    """How pixels are made from a source image. Stored in ``preprocess.yaml``, in the Parquet
    schema metadata and in every checkpoint; later stages read it from there.

    Attributes:
        size: output (height, width) in pixels.
        crop: crop to the breast's bounding box before resizing.
        mask: set every pixel outside the breast (its largest bright component, holes filled)
            to 0 before resizing and equalizing: film labels, orientation letters and markers
            that lie inside the crop box leave the picture.
        orientation: flip so the chest wall is on this side (``left`` | ``right`` | ``none``).
        resize_mode: ``pad`` keeps the aspect ratio and pads; ``stretch`` ignores it.
        equalize: ``clahe`` | ``global`` | ``none``.
        clahe_clip, clahe_grid: CLAHE clip limit and tile grid (OpenCV semantics).
        invert: ``auto`` re-inverts images whose background is bright (exported MONOCHROME1
            or inverted JPEGs); ``never`` leaves them.
        dtype: stored pixel dtype (``uint8`` | ``uint16`` | ``float32`` in [0, 1]).
        mean, std: normalization applied by the loaders to pixels scaled to [0, 1].
    """

    size: tuple[int, int] = (224, 224)
    crop: bool = True
    mask: bool = True
    orientation: str = "left"
    resize_mode: str = "pad"
    equalize: str = "clahe"
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    invert: str = "auto"
    dtype: str = "uint8"
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        check_finite(self)
        size = self.size
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 8 or max(size) > MAX_SIDE:
            raise ValueError(f"size={self.size!r}: use one int or [height, width], each in [8, {MAX_SIDE}]")
        object.__setattr__(self, "size", size)
        _check_choice("orientation", self.orientation, ORIENTATIONS)
        _check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        _check_choice("equalize", self.equalize, EQUALIZE_MODES)
        _check_choice("invert", self.invert, INVERSION_MODES)
        _check_choice("dtype", self.dtype, OUTPUT_DTYPES)
        if not self.clahe_clip > 0:
            raise ValueError(f"clahe_clip={self.clahe_clip!r}: must be > 0")
        if not 1 <= int(self.clahe_grid) <= 64:
            raise ValueError(f"clahe_grid={self.clahe_grid!r}: use an int in [1, 64]")
        if not self.std > 0:
            raise ValueError(f"std={self.std!r}: must be > 0")


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing job: the pixel spec plus how inputs are accepted, split and read.

    Attributes:
        min_side, max_pixels: sources outside these bounds are errors, not rows.
        other_modality: DICOM whose Modality is not MG: ``warn`` keeps it with a warning
            column, ``refuse`` makes it an error.
        patient_key_file: the secret key file of the patient pseudonyms (``patient_key``, an
            HMAC of the patient id); default ``$MAMMO_RAY_PATIENT_KEY``, else the user's key
            file (see :mod:`mammo_ray.privacy`). The key itself is never written out.
        batch_size: images per Ray task and per Parquet file.
    """

    spec: PreprocessSpec = field(default_factory=PreprocessSpec)
    ratios: tuple[float, float, float] = (0.8, 0.15, 0.05)
    seed: int = 0
    external: bool = False
    unlabeled: bool = False
    batch_size: int = 32
    min_side: int = 32
    max_pixels: int = 100_000_000
    other_modality: str = "warn"
    patient_key_file: str | None = None

    def __post_init__(self) -> None:
        check_finite(self)
        if isinstance(self.spec, Mapping):
            object.__setattr__(self, "spec", from_mapping(PreprocessSpec, self.spec))
        try:
            r = tuple(float(x) for x in self.ratios)
        except (TypeError, ValueError):
            raise ValueError(f"ratios={self.ratios!r}: use three numbers train,val,test") from None
        if len(r) != 3 or not all(math.isfinite(x) for x in r) or min(r) < 0 or abs(sum(r) - 1.0) > 1e-6 or r[0] <= 0:
            raise ValueError(f"ratios={self.ratios!r}: use three non-negative numbers train,val,test summing to 1 with train > 0")
        object.__setattr__(self, "ratios", r)
        _check_choice("other_modality", self.other_modality, OTHER_MODALITY)
        if self.min_side < 1 or self.max_pixels < self.min_side**2:
            raise ValueError(f"min_side={self.min_side}, max_pixels={self.max_pixels}: need 1 <= min_side and min_side**2 <= max_pixels")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size={self.batch_size!r}: use an int in [1, {MAX_BATCH}]")
        if self.max_pixels > 1_000_000_000:
            raise ValueError(f"max_pixels={self.max_pixels!r}: at most 1000000000 (a 1-gigapixel source)")

    @classmethod
    def load(cls, path: str | None = None, **overrides: Any) -> "PreprocessConfig":
        """YAML file first (keys of this class, with the pixel spec under ``spec:``), then overrides.

        Spec keys given as overrides (``size=``, ``equalize=``...) go into the spec.
        """
        data = load_yaml(path)
        if "patient_salt" in data:
            raise ValueError("patient_salt: a public salt let anyone recover patient ids by brute force, so patient "
                             "keys are now keyed by a secret: remove patient_salt and set $MAMMO_RAY_PATIENT_KEY or "
                             "patient_key_file")
        spec_names = {f.name for f in dataclasses.fields(PreprocessSpec)}
        spec_over = {k: overrides.pop(k) for k in list(overrides) if k in spec_names}
        spec_data = dict(data.pop("spec", {}) or {})
        spec = from_mapping(PreprocessSpec, spec_data, **spec_over)
        return from_mapping(cls, data, spec=spec, **overrides)


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


#: the CAM methods explain offers (pytorch-grad-cam's classes of those names)
CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "hirescam")

CLR_MODES = ("triangular", "triangular2", "exp_range")
OPTIMIZERS = ("sgd", "adamw")
IMBALANCE = ("weighted_loss", "balanced_sampler", "none")
PRETRAINED = ("imagenet",)
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: backbone x freezing ratio x cyclic-LR bounds, and the loop's options.

    Attributes:
        backbone: a name from the backbone registry (``mammo-ray train --help`` lists them).
        freeze_ratio: fraction r in [0, 1] of the backbone's ordered units frozen (prefix).
        pretrained: ``imagenet`` or None (random init). ImageNet weights come from the torch hub
            cache, downloaded once with torchvision's hash check when missing
            (efficientnet_lite0: from its pip package).
        weights: path or URI of a torchvision-format state dict to start from (instead of pretrained).
        offline: never download (also ``MAMMO_RAY_OFFLINE=1``): a missing file is an error.
        base_lr, max_lr: CyclicLR bounds (``base_lr < max_lr``).
        clr_mode: ``triangular`` | ``triangular2`` | ``exp_range`` (``clr_gamma`` for the latter).
        step_size_epochs: half a cycle, in epochs (converted to batches per epoch).
        imbalance: ``weighted_loss`` (pos_weight = negatives/positives), ``balanced_sampler``, ``none``.
        patience: epochs without a better val AUC before stopping (0: never stop early).
        max_batches: cap on training batches per epoch (smoke tests; 0 = no cap).
    """

    backbone: str = "resnet18"
    freeze_ratio: float = 0.0
    pretrained: str | None = None
    weights: str | None = None
    epochs: int = 10
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
    step_size_epochs: float = 2.0
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

    def __post_init__(self) -> None:
        check_finite(self)
        names = backbone_names()
        if self.backbone not in names:
            raise ValueError(f"backbone={self.backbone!r}: use one of {', '.join(names)}")
        if not 0.0 <= float(self.freeze_ratio) <= 1.0:
            raise ValueError(f"freeze_ratio={self.freeze_ratio!r}: use a number in [0, 1]")
        if self.pretrained is not None:
            _check_choice("pretrained", self.pretrained, PRETRAINED)
        if self.pretrained and self.weights:
            raise ValueError(f"pretrained={self.pretrained!r} and weights={self.weights!r}: give one of them")
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
    def load(cls, path: str | None = None, **overrides: Any) -> "TrainConfig":
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

    backbones: tuple[str, ...] = ("resnet50", "vgg19")
    freeze_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    # the train default (1e-4..1e-3) and a decade below it, the fine-tuning range the paper swept
    lr_bounds: tuple[tuple[float, float], ...] = ((1e-5, 1e-4), (1e-4, 1e-3))
    base_lr_range: tuple[float, float] | None = None
    max_lr_range: tuple[float, float] | None = None
    clr_modes: tuple[str, ...] = ("triangular",)
    epochs: int = 10
    batch_size: int = 32
    num_samples: int = 1
    scheduler: str = "fifo"
    grace_period: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
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
                object.__setattr__(self, name, (lo, hi))
            if self.base_lr_range[1] >= self.max_lr_range[0]:
                raise ValueError(f"base_lr_range={list(self.base_lr_range)} overlaps max_lr_range={list(self.max_lr_range)}: "
                                 "every max_lr must be > every base_lr")
        else:
            if not self.lr_bounds:
                raise ValueError("lr_bounds: the grid is empty; give at least one [base_lr, max_lr] pair")
            pairs = tuple((float(a), float(b)) for a, b in self.lr_bounds)
            for a, b in pairs:
                if not 0 < a < b:
                    raise ValueError(f"lr_bounds: [{a}, {b}] needs 0 < base_lr < max_lr")
            object.__setattr__(self, "lr_bounds", pairs)
        object.__setattr__(self, "freeze_ratios", tuple(float(r) for r in self.freeze_ratios))
        for name, top in (("epochs", 100_000), ("batch_size", MAX_BATCH), ("num_samples", 100_000),
                          ("grace_period", 100_000)):
            if not 1 <= int(getattr(self, name)) <= top:
                raise ValueError(f"{name}={getattr(self, name)!r}: use an int in [1, {top}]")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0 or self.max_failures < 0:
            raise ValueError(f"cpus_per_trial={self.cpus_per_trial}, gpus_per_trial={self.gpus_per_trial}, "
                             f"max_failures={self.max_failures}: need cpus > 0, gpus >= 0, max_failures >= 0")
        reserved = {"backbone", "freeze_ratio", "base_lr", "max_lr", "clr_mode", "epochs", "batch_size", "seed"}
        bad = sorted(set(self.train) & reserved)
        if bad:
            raise ValueError(f"train: {', '.join(bad)} are sweep keys; set them at the top level of the sweep file")
        # unknown TrainConfig keys are refused here, before any trial starts
        TrainConfig.load(None, backbone=self.backbones[0], **dict(self.train))

    @property
    def grid_size(self) -> int:
        lr = 1 if self.base_lr_range is not None else len(self.lr_bounds)
        return len(self.backbones) * len(self.freeze_ratios) * lr * len(self.clr_modes)

    @classmethod
    def load(cls, path: str | None = None, **overrides: Any) -> "SweepConfig":
        data = load_yaml(path)
        for key in ("lr_bounds", "base_lr_range", "max_lr_range"):
            if key in data and isinstance(data[key], list):
                data[key] = tuple(tuple(x) if isinstance(x, list) else x for x in data[key])
        return from_mapping(cls, data, **overrides)


@dataclass(frozen=True)
class ExplainConfig:
    """How ``mammo-ray explain`` explains (YAML keys of the same names). ``workers``: size of the
    CAM actor pool (default: one per GPU, or the CPUs less one on CPU-only clusters, so the read
    tasks keep a core). ``threshold``: the probability at or above which an image is called
    malignant (default: the checkpoint's val threshold); ``amp``: bf16/fp16 autocast on CUDA."""

    method: str = "gradcam"
    target_layer: str | None = None
    batch_size: int = 32
    gpus_per_worker: float | None = None
    workers: int | None = None
    preview_size: int = 512
    heatmap_max_side: int = 0
    threshold: float | None = None
    annotations: str | None = None
    top_n: int = 16
    prep_batch_size: int = 8
    amp: bool = True

    def __post_init__(self) -> None:
        check_finite(self)
        _check_choice("method", self.method, CAM_METHODS)
        for name, top in (("batch_size", MAX_BATCH), ("preview_size", MAX_SIDE), ("top_n", 1024),
                          ("prep_batch_size", MAX_BATCH)):
            if not 1 <= int(getattr(self, name)) <= top:
                raise ValueError(f"{name}={getattr(self, name)!r}: use an int in [1, {top}]")
        if not 0 <= self.heatmap_max_side <= MAX_SIDE:
            raise ValueError(f"heatmap_max_side={self.heatmap_max_side!r}: 0 (the source's size) or a side in "
                             f"[1, {MAX_SIDE}] pixels")
        if self.workers is not None and not 1 <= self.workers <= 100_000:
            raise ValueError(f"workers={self.workers!r}: use an int in [1, 100000]")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker={self.gpus_per_worker!r}: must be >= 0")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r}: must be in [0, 1]")
