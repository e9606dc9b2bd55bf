"""The configurations of the stages that apply a checkpoint: evaluate, score and explain.
(Training's: ``config/training.py``.)"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mammo_ray.config.base import MAX_BATCH, MAX_SIDE, _check_choice, check_finite, from_mapping, load_yaml
from mammo_ray.config.labels import LabelMap, as_label_map

#: the CAM methods explain offers (pytorch-grad-cam's classes of those names)
CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "hirescam")

CAM_FOR_FORMS = ("all", "positive", "top:N")


def parse_cam_for(text: str) -> tuple[str, int | None]:
    """``all`` | ``positive`` | ``top:N`` (N >= 1) -> (kind, N or None).

    Raises:
        ValueError: any other form, or N < 1 (one line naming the accepted forms).
    """
    value = str(text).strip().lower()
    if value in ("all", "positive"):
        return value, None
    if value.startswith("top:"):
        try:
            n = int(value[4:])
        except ValueError:
            n = None
        if n is not None and n >= 1:
            return "top", n
        raise ValueError(f"cam_for={text!r}: top:N needs a whole number N >= 1, e.g. top:100 "
                         f"(accepted: {', '.join(CAM_FOR_FORMS)})")
    raise ValueError(f"cam_for={text!r}: use one of {', '.join(CAM_FOR_FORMS)} (N >= 1)")


TTA_MODES = ("none", "vflip", "hflip", "flips")  # the keys of models.inference.TTA_VIEWS (no torch here)


def tta_mode(value: Any) -> Any:
    """A test-time augmentation mode; the score job's earlier boolean ``tta`` (true: the mean
    with the horizontal mirror) maps onto ``hflip`` / ``none``, so old configs and score.yaml
    files mean what they meant."""
    if isinstance(value, bool) or value is None:
        return "hflip" if value else "none"
    return value


@dataclass(frozen=True)
class ArchiveConfig:
    """What the archive jobs (score and explain) share. ``workers``: size of the model's actor
    pool (default: one per GPU, or the CPUs less one on CPU-only clusters, so the read tasks keep
    a core). ``threshold``: the probability at or above which an image is called malignant
    (default: the checkpoint's val threshold); ``amp``: bf16/fp16 autocast on CUDA;
    ``patient_key_file``: the secret of the patient and exam pseudonyms in the breast and exam
    tables (see ``mammo_ray.privacy``); ``tta``: each image's probability is the mean over it and
    its flipped views (``TTA_MODES``, as ``mammo-ray evaluate --tta``; ``true`` in an older
    config: ``hflip``)."""

    batch_size: int = 32
    gpus_per_worker: float | None = None
    workers: int | None = None
    threshold: float | None = None
    prep_batch_size: int = 8
    amp: bool = True
    patient_key_file: str | None = None
    tta: str = "none"
    # labels are read when present and never refuse an image: a word outside the vocabulary is
    # unlabeled (counted in summary.json); unlabeled: ignore them altogether
    labels: LabelMap = field(default_factory=LabelMap)
    unlabeled: bool = False
    max_file_mb: int = 512  # as PreprocessConfig.max_file_mb (checked there)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", as_label_map(self.labels))
        object.__setattr__(self, "tta", tta_mode(self.tta))
        _check_choice("tta", self.tta, TTA_MODES)
        check_finite(self)
        if isinstance(self.max_file_mb, bool) or not isinstance(self.max_file_mb, int) or not 1 <= self.max_file_mb <= 65536:
            raise ValueError(f"max_file_mb={self.max_file_mb!r}: use an int in [1, 65536] (MB)")
        for name, top in (("batch_size", MAX_BATCH), ("prep_batch_size", MAX_BATCH)):
            if not 1 <= int(getattr(self, name)) <= top:
                raise ValueError(f"{name}={getattr(self, name)!r}: use an int in [1, {top}]")
        if self.workers is not None and not 1 <= self.workers <= 100_000:
            raise ValueError(f"workers={self.workers!r}: use an int in [1, 100000]")
        g = self.gpus_per_worker
        if g is not None and (g < 0 or (g > 1 and g != int(g))):
            raise ValueError(f"gpus_per_worker={g!r}: use 0 (CPU), a fraction of one GPU or a whole number of GPUs")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r}: must be in [0, 1]")

    @classmethod
    def load(cls, path: str | None = None, **overrides: Any):
        """YAML file first, then overrides (``None`` values ignored)."""
        return from_mapping(cls, load_yaml(path), **overrides)


@dataclass(frozen=True)
class ScoreConfig(ArchiveConfig):
    """How ``mammo-ray score`` scores an archive (YAML keys of the same names): the shared keys."""


@dataclass(frozen=True)
class ExplainConfig(ArchiveConfig):
    """How ``mammo-ray explain`` explains: the score job's keys plus the CAM's (YAML keys of the
    same names). ``cam_for``: which images get a CAM (all; positive: at or above the threshold;
    top:N: the N highest scores), the others are scored only; ``scores_from``: a finished
    ``mammo-ray score`` folder of the same checkpoint whose scores are used instead of scoring
    again; ``cam_within_breast``: heatmaps, overlays and peaks keep the CAM inside the breast
    mask (the raw map's peak is still counted when it falls outside)."""

    # LayerCAM: on real films it found the lesion 2-7x as often as GradCAM (run 3's checkpoint
    # 20/56 against 0/56; run 8's 22/56 against 7/56)
    method: str = "layercam"
    target_layer: str | None = None
    preview_size: int = 512
    heatmap_max_side: int = 0
    annotations: str | None = None
    top_n: int = 16
    cam_within_breast: bool = True
    cam_for: str = "all"
    scores_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("method", self.method, CAM_METHODS)
        parse_cam_for(self.cam_for)
        for name, top in (("preview_size", MAX_SIDE), ("top_n", 1024)):
            if not 1 <= int(getattr(self, name)) <= top:
                raise ValueError(f"{name}={getattr(self, name)!r}: use an int in [1, {top}]")
        if not 0 <= self.heatmap_max_side <= MAX_SIDE:
            raise ValueError(f"heatmap_max_side={self.heatmap_max_side!r}: 0 (the source's size) or a side in "
                             f"[1, {MAX_SIDE}] pixels")


THRESHOLD_METHODS = ("youden", "sensitivity", "fixed")
DISTRIBUTED_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class EvaluateConfig:
    """How ``mammo-ray evaluate`` evaluates (YAML keys of the same names). ``threshold_method``:
    how the decision threshold is chosen on val (youden; sensitivity: the highest threshold
    reaching ``target_sensitivity``; fixed: 0.5). ``distributed``: score with a Ray Data actor
    pool (auto: sets of 20,000 images or more). ``ensemble``: also evaluate the mean of the
    checkpoints' probabilities as one model (e.g. one configuration trained with several seeds).
    ``tta``: score every image also flipped and average (vflip: vertically, as training
    augments; hflip; flips: both and both together), for the val threshold and every set."""

    threshold_method: str = "youden"
    target_sensitivity: float = 0.9
    allow_spec_mismatch: bool = False
    n_boot: int = 1000
    seed: int = 0
    batch_size: int = 64
    distributed: str = "auto"
    ensemble: bool = False
    tta: str = "none"
    labels: LabelMap = field(default_factory=LabelMap)  # how raw external sets' labels read

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", as_label_map(self.labels))
        check_finite(self)
        _check_choice("threshold_method", self.threshold_method, THRESHOLD_METHODS)
        _check_choice("distributed", self.distributed, DISTRIBUTED_MODES)
        _check_choice("tta", self.tta, TTA_MODES)
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError(f"target_sensitivity={self.target_sensitivity!r}: use a number in (0, 1]")
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, int) or not 0 <= self.n_boot <= 1_000_000:
            raise ValueError(f"n_boot={self.n_boot!r}: use an int in [0, 1000000] (0 skips the bootstrap)")
        if not 1 <= int(self.batch_size) <= MAX_BATCH:
            raise ValueError(f"batch_size={self.batch_size!r}: use an int in [1, {MAX_BATCH}]")

    @classmethod
    def load(cls, path: str | None = None, **overrides: Any) -> EvaluateConfig:
        """YAML file first, then overrides (``None`` values ignored)."""
        return from_mapping(cls, load_yaml(path), **overrides)
