"""Class activation maps from pytorch-grad-cam, with the score from the same forward pass.

The target layer comes from the backbone registry (overridable). Hooks are released and the
model's train/eval mode restored by a context manager, whatever happens inside.

Speed: pytorch-grad-cam's plain use back-propagates through the whole network and computes
every weight's gradient, although a CAM only needs d(score)/d(target activation). With
``stop_at_target`` (the default) parameters are taken out of autograd for the duration and a
forward hook hands the layers after the target a fresh leaf copy of the target's output: the
part before the target builds no graph (as fast as inference) and the backward pass runs
only through the head. The CAM maths is still pytorch-grad-cam's, on the same activations
and gradients (a test checks the maps match the plain use).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from collections.abc import Iterator

import numpy as np
import torch

from mammo_ray.config import CAM_METHODS
from mammo_ray.models.checkpoint import checkpoint_spec, model_from_checkpoint
from mammo_ray.models.inference import autocast
from mammo_ray.models.registry import get_backbone, get_submodule

__all__ = ["CAM_METHODS", "cam_extractor", "check_method", "check_target_layer", "resolve_target_layer", "score_and_cam"]


def _cam_class(method: str):
    # deferred: pytorch-grad-cam imports scikit-learn and scipy (about a second); only the CAM
    # actors need it, not the read/write tasks that import this package
    from pytorch_grad_cam import (
        EigenCAM,
        GradCAM,
        GradCAMPlusPlus,
        HiResCAM,
        LayerCAM,
        XGradCAM,
    )

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
               "eigencam": EigenCAM, "hirescam": HiResCAM}
    if method not in classes:
        raise ValueError(f"method={method!r}: use one of {', '.join(CAM_METHODS)}")
    return classes[method]


def check_method(method: str) -> str:
    """``method`` if offered, else a ValueError listing the offered ones."""
    if method not in CAM_METHODS:
        raise ValueError(f"method={method!r}: use one of {', '.join(CAM_METHODS)}")
    return method


def resolve_target_layer(backbone: str, target_layer: str | None = None) -> str:
    """The layer to explain: ``target_layer`` if given, else the backbone's registered one.

    Raises:
        ValueError: the backbone has no CAM layer and none was given.
    """
    if target_layer:
        return target_layer
    layer = get_backbone(backbone).cam_layer
    if not layer:
        raise ValueError(f"backbone {backbone!r} has no CAM target layer in the registry: pass --target-layer "
                         f"(a module whose output is a (N, C, H, W) feature map)")
    return layer


def _leaf_hook(module, inputs, output):
    # A fresh leaf: nothing before the target layer is in the graph, backward stops here.
    # float(): under bf16 autocast pytorch-grad-cam's .numpy() would fail on bf16 tensors.
    # clone(): the layers after it may modify their input in place, which a leaf forbids
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
        return output.detach().float().requires_grad_(True).clone()
    return None


@contextmanager
def cam_extractor(model: torch.nn.Module, backbone: str, method: str = "gradcam", *,
                  target_layer: str | None = None, stop_at_target: bool = True) -> Iterator:
    """Yield a pytorch-grad-cam object on the backbone's CAM layer (or ``target_layer``).

    Raises:
        ValueError: an unknown method, or a target layer the model does not have.
    """
    cls = _cam_class(method)
    layer = get_submodule(model, resolve_target_layer(backbone, target_layer))
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    handle = None
    model.eval()
    try:
        if stop_at_target:
            for p, _ in grad_flags:
                p.requires_grad_(False)
            # prepend: pytorch-grad-cam's own hooks must see (and hook) the leaf
            handle = layer.register_forward_hook(_leaf_hook, prepend=True)
        cam = cls(model=model, target_layers=[layer])
        try:
            yield cam
        finally:
            # pytorch-grad-cam's own __exit__ swallows exceptions; release the hooks explicitly
            cam.activations_and_grads.release()
    finally:
        if handle is not None:
            handle.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)


def score_and_cam(model: torch.nn.Module, backbone: str, x: torch.Tensor, *, method: str = "gradcam",
                  target_layer: str | None = None, stop_at_target: bool = True,
                  amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Malignancy probabilities and CAMs (B, H, W) in [0, 1] for a normalized batch, from one
    forward pass (pytorch-grad-cam keeps that pass's outputs). ``amp``: bf16/fp16 autocast on
    CUDA (ignored on CPU)."""
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputTarget,  # deferred: see _cam_class
    )

    device = next(model.parameters()).device
    with cam_extractor(model, backbone, method, target_layer=target_layer, stop_at_target=stop_at_target) as cam:
        with (autocast(device, True) if amp else nullcontext()):
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * x.shape[0])  # the malignancy logit
        probs = torch.sigmoid(cam.outputs[:, 0].detach().float()).cpu().numpy()
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return probs, np.clip(maps, 0.0, 1.0)


def check_target_layer(state: dict, layer: str, method: str) -> None:
    """The target layer exists, gives a (N, C, H, W) map, and a CAM runs through it (a dry
    score + CAM on one blank input, as the actors will do it)."""
    model = model_from_checkpoint(state)
    module = get_submodule(model, layer)
    seen: list[tuple] = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape) if isinstance(o, torch.Tensor) else ()))
    h, w = checkpoint_spec(state).size
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, h, w))
    finally:
        handle.remove()
    if not seen or len(seen[0]) != 4:
        raise ValueError(f"--target-layer {layer!r}: its output has shape {seen[0] if seen else 'none'}, a CAM needs a "
                         f"(N, C, H, W) feature map (e.g. the backbone's last conv block)")
    try:
        score_and_cam(model, state["backbone"], torch.zeros(1, 1, h, w), method=method, target_layer=layer)
    except Exception as exc:
        raise ValueError(f"--target-layer {layer!r} with --method {method}: the CAM fails "
                         f"({type(exc).__name__}: {exc})".splitlines()[0]) from exc
