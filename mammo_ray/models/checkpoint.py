"""Checkpoints: weights + backbone + freezing ratio + training config + preprocessing spec +
epoch + metrics, in plain types only so they load with ``torch.load(weights_only=True)``."""
from __future__ import annotations

import io
import logging
import pickle
from typing import Any

import torch

from mammo_ray import io as mio
from mammo_ray.config import PreprocessSpec, TrainConfig, from_mapping, to_dict

logger = logging.getLogger(__name__)

FORMAT = "mammo_ray.checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "model", "backbone", "freeze_ratio", "train_config", "spec", "epoch", "metrics")


def save_checkpoint(path: str, *, model: torch.nn.Module, cfg: TrainConfig, spec: PreprocessSpec, epoch: int,
                    metrics: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, extra: dict[str, Any] | None = None) -> None:
    """Write a checkpoint (atomically for local paths)."""
    state = {
        "format": FORMAT, "version": VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "backbone": cfg.backbone, "freeze_ratio": float(cfg.freeze_ratio),
        "train_config": to_dict(cfg), "spec": to_dict(spec), "epoch": int(epoch),
        "metrics": {k: (None if v is None else float(v)) for k, v in metrics.items()},
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if not callable(v)}
    if extra:
        state.update(extra)
    buf = io.BytesIO()
    torch.save(state, buf)
    mio.write_bytes(path, buf.getvalue())


def unsafe_globals(data: bytes) -> list[str]:
    """The callables a torch file would import to unpickle, listed without running any
    (torch's own scanner); empty for a plain tensor file or bytes that are no torch file."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
    except Exception:  # not a zip-format torch file: nothing to list
        return []


def read_checkpoint_bytes(path: str) -> bytes:
    """A checkpoint file's bytes (local or URI); FileNotFoundError naming it when absent."""
    if not mio.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    return mio.read_bytes(path)


def load_checkpoint(path: str, *, map_location: str | torch.device = "cpu", data: bytes | None = None) -> dict[str, Any]:
    """Load and check a checkpoint with ``weights_only=True`` (no arbitrary code runs).
    ``data``: the file's bytes when the caller already read them (named ``path`` in errors).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a mammo_ray checkpoint, or one that would need unpickling code.
    """
    if data is None:
        data = read_checkpoint_bytes(path)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message ends with "Re-running torch.load with weights_only set to False will
        # likely succeed": the one thing a user must not do with an untrusted file, so it is
        # never shown. The wording no longer matters either (it changed in torch 2.14).
        unsafe = unsafe_globals(data)
        if unsafe:
            raise ValueError(f"checkpoint {path} refused: loading it would run arbitrary code ({', '.join(unsafe[:3])}), "
                             "which weights_only=True never does; only a mammo-ray checkpoint of tensors loads") from exc
        raise ValueError(f"checkpoint {path}: not a torch checkpoint (unreadable pickle)") from exc
    except Exception as exc:
        raise ValueError(f"checkpoint {path}: not a torch checkpoint ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: not a mammo_ray checkpoint (no format={FORMAT!r} key)")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"checkpoint {path}: missing key(s) {', '.join(missing)}")
    if state["version"] > VERSION:
        raise ValueError(f"checkpoint {path}: version {state['version']} is newer than this mammo_ray ({VERSION})")
    return state


def checkpoint_spec(state: dict[str, Any]) -> PreprocessSpec:
    return from_mapping(PreprocessSpec, state["spec"])


def checkpoint_config(state: dict[str, Any]) -> TrainConfig:
    return from_mapping(TrainConfig, state["train_config"])


def model_from_checkpoint(state: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the model of a checkpoint (random init, then its weights), in eval mode."""
    from mammo_ray.models.registry import (
        build_model,  # deferred: registry -> weights -> this module
    )

    model = build_model(state["backbone"])
    model.load_state_dict(state["model"])
    return model.eval()
