"""Backbones for single-channel mammograms and selective layer freezing (no Ray here)."""
from __future__ import annotations

from mammo_ray.models.freezing import FreezeReport, freeze_units, frozen_unit_count, train_mode, trainable_parameters
from mammo_ray.models.registry import (
    BACKBONES,
    BackboneSpec,
    build_backbone,
    build_model,
    expected_weights_file,
    get_backbone,
    get_submodule,
    list_backbones,
    register_backbone,
)
from mammo_ray.models.weights import ENV_OFFLINE, imagenet_backbones, offline_from_env, resolve_weights

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "ENV_OFFLINE",
    "FreezeReport",
    "build_backbone",
    "build_model",
    "expected_weights_file",
    "freeze_units",
    "frozen_unit_count",
    "get_backbone",
    "get_submodule",
    "imagenet_backbones",
    "list_backbones",
    "offline_from_env",
    "register_backbone",
    "resolve_weights",
    "train_mode",
    "trainable_parameters",
]
