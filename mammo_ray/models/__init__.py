"""Backbones for single-channel mammograms and selective layer freezing (no Ray here)."""
from __future__ import annotations

from mammo_ray.models.freezing import FreezeReport, freeze_units, frozen_unit_count, train_mode, trainable_parameters
from mammo_ray.models.registry import (
    BACKBONES,
    BackboneSpec,
    build_model,
    expected_weights_file,
    get_backbone,
    get_submodule,
    list_backbones,
    register_backbone,
)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FreezeReport",
    "build_model",
    "expected_weights_file",
    "freeze_units",
    "frozen_unit_count",
    "get_backbone",
    "get_submodule",
    "list_backbones",
    "register_backbone",
    "train_mode",
    "trainable_parameters",
]
