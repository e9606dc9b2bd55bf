"""Class activation maps from pytorch-grad-cam, with the score from the same forward pass.

The target layer comes from the backbone registry (overridable). Hooks are released and the
model's train/eval mode restored by a context manager, whatever happens inside.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "hirescam")


def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
               "eigencam": EigenCAM, "hirescam": HiResCAM}
    if method not in classes:
        raise ValueError(f"method={method!r}: use one of {', '.join(CAM_METHODS)}")
    return classes[method]


@contextmanager
def cam_extractor(model: torch.nn.Module, backbone: str, method: str = "gradcam", *,
                  target_layer: str | None = None) -> Iterator:
    """Yield a pytorch-grad-cam object on the backbone's CAM layer (or ``target_layer``).

    Raises:
        ValueError: an unknown method, or a target layer the model does not have.
    """
    from mammo_ray.models.registry import get_backbone, get_submodule

    cls = _cam_class(method)
    layer = get_submodule(model, target_layer or get_backbone(backbone).cam_layer)
    was_training = model.training
    model.eval()
    cam = cls(model=model, target_layers=[layer])
    try:
        yield cam
    finally:
        # pytorch-grad-cam's own __exit__ swallows exceptions; release the hooks explicitly
        cam.activations_and_grads.release()
        model.train(was_training)


def score_and_cam(model: torch.nn.Module, backbone: str, x: torch.Tensor, *, method: str = "gradcam",
                  target_layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Malignancy probabilities and CAMs (B, H, W) in [0, 1] for a normalized batch, from one
    forward pass (pytorch-grad-cam keeps that pass's outputs)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with cam_extractor(model, backbone, method, target_layer=target_layer) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * x.shape[0])  # the malignancy logit
        probs = torch.sigmoid(cam.outputs[:, 0].detach().float()).cpu().numpy()
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return probs, np.clip(maps, 0.0, 1.0)


def localization(cam: np.ndarray, *, x: float, y: float, r: float) -> dict[str, float | bool]:
    """How well a CAM (in the source geometry) points at a lesion given as a circle.

    Returns:
        pointing_hit: the CAM's peak lies inside the lesion (pointing game, Zhang et al. 2018);
        energy_inside: share of the CAM's total mass inside the lesion;
        area_fraction: the lesion's share of the image, the chance level of both.
    """
    h, w = cam.shape
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (xx - x) ** 2 + (yy - y) ** 2 <= r ** 2
    py, px = np.unravel_index(int(np.argmax(cam)), cam.shape)
    total = float(cam.sum())
    return {"pointing_hit": bool(inside[py, px]), "energy_inside": float(cam[inside].sum() / total) if total > 0 else 0.0,
            "area_fraction": float(inside.mean())}
