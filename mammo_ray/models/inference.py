"""Running a model: the device, autocast, the one input normalisation, loading a checkpoint
for inference, and batched prediction. Training, evaluation and the archive jobs all use these,
so a model sees its inputs prepared the same way in every stage."""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mammo_ray.config import PreprocessSpec
from mammo_ray.data.arrays import SplitArrays, pixel_scale
from mammo_ray.models.checkpoint import checkpoint_spec, load_checkpoint, model_from_checkpoint
from mammo_ray.models.normalization import Normalization, checkpoint_normalization

logger = logging.getLogger(__name__)


_WARNED_NO_CUDA = False


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when this process sees a GPU, else CPU. On a Ray worker given GPUs, Ray
    sets CUDA_VISIBLE_DEVICES to them, so ``cuda`` is the first GPU Ray assigned (never a
    guessed ``cuda:0`` of the whole node). GPUs assigned but no CUDA in this process (logical
    GPUs, a CPU-only torch): CPU, with one warning line per process."""
    global _WARNED_NO_CUDA
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        assigned = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if assigned and assigned != "-1" and not _WARNED_NO_CUDA:
            _WARNED_NO_CUDA = True
            logger.warning("GPU(s) %s assigned (CUDA_VISIBLE_DEVICES) but torch sees no CUDA device here: "
                           "running on CPU", assigned)
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda': no CUDA device is available here; use auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    """bf16 (or fp16 where bf16 is missing) autocast on CUDA; nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_unit(pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, H, W) stored pixels -> (B, 1, H, W) float in [0, 1] on ``device``."""
    if isinstance(pixels, np.ndarray):
        scale = pixel_scale(pixels.dtype)
        # Parquet pixels are read-only views of their buffer: a copy (one small batch) rather
        # than a tensor over memory torch must not write
        x = torch.from_numpy(np.ascontiguousarray(pixels) if pixels.flags.writeable else pixels.copy())
    else:
        scale, x = pixel_scale(str(pixels.dtype).replace("torch.", "")), pixels
    x = x.to(device, non_blocking=True).unsqueeze(1)
    # float() copies integer pixels; float pixels are cloned, so the in-place ops below never
    # write into the caller's array
    return (x.float() if x.dtype != torch.float32 else x.clone()).div_(scale)


def normalize(x01: torch.Tensor, norm: Normalization, *, channels_last: bool = True) -> torch.Tensor:
    """The model input: (x - norm.mean) / norm.std, channels-last by default (faster convolutions
    with cuDNN and oneDNN). The only place a normalisation is applied: training's (resolved from
    the weights and the data spec) and, in every later stage, the one its checkpoint recorded."""
    x = x01.sub_(norm.mean).div_(norm.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def to_model_input(pixels: np.ndarray | torch.Tensor, norm: Normalization, device: torch.device, *,
                   channels_last: bool = True) -> torch.Tensor:
    """(B, H, W) stored pixels -> the normalized (B, 1, H, W) model input on ``device``."""
    return normalize(to_unit(pixels, device), norm, channels_last=channels_last)


@dataclass
class LoadedModel:
    """A checkpoint ready for inference: its state, spec, the normalisation it was trained with
    and its model (eval mode, on ``device``)."""

    state: dict[str, Any]
    spec: PreprocessSpec
    model: torch.nn.Module
    device: torch.device
    norm: Normalization

    @property
    def backbone(self) -> str:
        return self.state["backbone"]


def load_for_inference(checkpoint: str | dict[str, Any], device: str = "auto") -> LoadedModel:
    """Load a checkpoint (a path, or a state already loaded) and build its model on the device."""
    state = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    dev = resolve_device(device)
    model = model_from_checkpoint(state).to(dev).to(memory_format=torch.channels_last)
    return LoadedModel(state=state, spec=checkpoint_spec(state), model=model, device=dev,
                       norm=checkpoint_normalization(state))


# Test-time augmentation: the views averaged, as the image axes each view flips ((B, 1, H, W):
# -2 is vertical, -1 horizontal). Training flips vertically by default (``augment_params``),
# so ``vflip`` shows the model nothing it was not trained on; a horizontal flip puts the chest
# wall on the right, which only a model trained with ``hflip`` has seen.
TTA_VIEWS = {"none": ((),), "vflip": ((), (-2,)), "hflip": ((), (-1,)), "flips": ((), (-2,), (-1,), (-2, -1))}


def check_tta(tta: str) -> tuple[tuple[int, ...], ...]:
    """The views of a TTA mode, or a ValueError listing the modes."""
    if tta not in TTA_VIEWS:
        raise ValueError(f"tta={tta!r}: use one of {', '.join(TTA_VIEWS)}")
    return TTA_VIEWS[tta]


def view_probabilities(model: torch.nn.Module, x: torch.Tensor, views: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The mean malignancy probability of a normalized batch over ``views`` (each a tuple of
    axes to flip, ``()`` the image itself): (B,) float32. The caller sets no_grad and autocast."""
    return torch.stack([torch.sigmoid(model(x.flip(dims) if dims else x).squeeze(1).float())
                        for dims in views]).mean(0)


@torch.no_grad()
def predict(model: torch.nn.Module, arrays: SplitArrays, *, norm: Normalization, device: torch.device,
            batch_size: int = 64, channels_last: bool = True, amp: bool = True, tta: str = "none") -> np.ndarray:
    """Malignancy probabilities for every row, in order (model in eval mode). ``tta``: the mean
    of the probabilities over the views of ``TTA_VIEWS[tta]``."""
    check_tta(tta)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(arrays), batch_size):
            x = to_model_input(arrays.pixels[i:i + batch_size], norm, device, channels_last=channels_last)
            with autocast(device, amp):
                out.append(view_probabilities(model, x, TTA_VIEWS[tta]).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, np.float32)
