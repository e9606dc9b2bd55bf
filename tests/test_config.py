"""Config dataclasses: validation messages name the bad value and the allowed ones."""
from __future__ import annotations

import re

import pytest

from mammo_ray.config import PreprocessConfig, PreprocessSpec, to_dict


@pytest.mark.parametrize("kwargs,message", [
    ({"equalize": "hist"}, "equalize='hist': use one of clahe, global, none"),
    ({"resize_mode": "crop"}, "resize_mode='crop': use one of pad, stretch"),
    ({"orientation": "up"}, "orientation='up': use one of left, right, none"),
    ({"dtype": "int8"}, "dtype='int8': use one of uint8, uint16, float32"),
    ({"invert": "always"}, "invert='always': use one of auto, never"),
    ({"size": (4, 4)}, "size=(4, 4): use one int or [height, width], each in [8, 8192]"),
    ({"clahe_clip": 0}, "clahe_clip=0: must be > 0"),
    ({"std": 0}, "std=0: must be a finite number in [0.01, 1] (or unset: the weights' normalisation)"),
    ({"mean": 1.5}, "mean=1.5: must be a finite number in [0, 1] (or unset: the weights' normalisation)"),
])
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError) as info:
        PreprocessSpec(**kwargs)
    assert str(info.value) == message


def test_size_int_becomes_square_and_round_trips():
    spec = PreprocessSpec(size=128)
    assert spec.size == (128, 128)
    assert PreprocessSpec(**{**to_dict(spec), "size": [128, 128]}) == spec


@pytest.mark.parametrize("kwargs,message", [
    ({"ratios": (0.5, 0.5, 0.5)}, "use three non-negative numbers"),
    ({"ratios": (0.0, 0.5, 0.5)}, "train > 0"),
    ({"other_modality": "drop"}, "other_modality='drop': use one of warn, refuse"),
    ({"batch_size": 0}, "batch_size=0: use an int in [1, 4096]"),
    ({"min_side": 100, "max_pixels": 50}, "min_side=100, max_pixels=50"),
])
def test_job_validation(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PreprocessConfig.load(**kwargs)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 4\nratios: [0.7, 0.2, 0.1]\nspec:\n  size: 96\n  equalize: global\n")
    cfg = PreprocessConfig.load(str(f), equalize="none", seed=None)
    assert cfg.seed == 4 and cfg.ratios == (0.7, 0.2, 0.1)
    assert cfg.spec.size == (96, 96) and cfg.spec.equalize == "none"


def test_unknown_keys_are_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sed: 4\n")
    with pytest.raises(ValueError, match="unknown PreprocessConfig key\\(s\\) sed: allowed keys are spec, ratios"):
        PreprocessConfig.load(str(f))
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        PreprocessConfig.load(str(f))
