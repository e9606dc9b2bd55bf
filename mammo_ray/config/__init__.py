"""Stage configurations: one frozen dataclass per stage, loaded from YAML then CLI overrides.

Every dataclass validates itself in ``__post_init__`` and refuses unknown keys, so a typo in
a YAML file is an error naming the key and the allowed ones, not a silently ignored option.
The CLI takes each flag's default from these classes, so a default lives in one place.

``base``: caps, label/split names, helpers; ``data``: the pixel spec and preprocessing;
``training``: train and tune (``scale``: workers, ingest); ``stages``: evaluate, score, explain.
"""
from mammo_ray.config.base import (EXTERNAL, LABELS, MAX_BATCH, MAX_SIDE, SPLITS, TEST, TRAIN, VAL, _check_choice,
                                   check_finite, from_mapping, load_yaml, to_dict)
from mammo_ray.config.labels import LabelMap, as_label_map
from mammo_ray.config.data import (EQUALIZE_MODES, INVERSION_MODES, ORIENTATIONS, OTHER_MODALITY, OUTPUT_DTYPES,
                                   RESIZE_MODES, PreprocessConfig, PreprocessSpec)
from mammo_ray.config.scale import INGEST_MODES, SHUFFLE_MODES
from mammo_ray.config.training import (BUILTIN_BACKBONES, CLR_MODES, DEVICES, IMBALANCE, NO_PRETRAINED, OPTIMIZERS,
                                       PRETRAINED, SCHEDULERS, SweepConfig, TrainConfig, add_backbone_name,
                                       backbone_names)
from mammo_ray.config.stages import (CAM_FOR_FORMS, CAM_METHODS, DISTRIBUTED_MODES, THRESHOLD_METHODS, TTA_MODES,
                                     ArchiveConfig, EvaluateConfig, ExplainConfig, ScoreConfig, parse_cam_for, tta_mode)

__all__ = [
    "EXTERNAL", "LABELS", "MAX_BATCH", "MAX_SIDE", "SPLITS", "TEST", "TRAIN", "VAL", "_check_choice", "check_finite",
    "from_mapping", "load_yaml", "to_dict", "EQUALIZE_MODES", "INVERSION_MODES", "ORIENTATIONS", "OTHER_MODALITY",
    "OUTPUT_DTYPES", "RESIZE_MODES", "PreprocessConfig", "PreprocessSpec", "BUILTIN_BACKBONES", "CAM_FOR_FORMS", "CAM_METHODS",
    "CLR_MODES", "DEVICES", "DISTRIBUTED_MODES", "IMBALANCE", "NO_PRETRAINED", "OPTIMIZERS", "PRETRAINED", "SCHEDULERS",
    "THRESHOLD_METHODS", "TTA_MODES", "ArchiveConfig", "EvaluateConfig", "ScoreConfig", "parse_cam_for", "tta_mode", "ExplainConfig", "SweepConfig", "TrainConfig", "add_backbone_name",
    "backbone_names", "LabelMap", "as_label_map", "INGEST_MODES", "SHUFFLE_MODES",
]
