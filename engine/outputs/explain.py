"""Grad-CAM: where in the image the evidence for a class lies (pytorch-grad-cam).

The target layer is found generically from a traced forward: for CNNs the last module whose
output is a feature map (N, C, H, W); for token models (ViT) the input of the last block, with
the tokens reshaped back into a grid (prefix tokens such as [CLS] dropped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine.core.errors import EngineError
from engine.core.modes import evaluating, model_lock
from engine.data.images import shrink_to
from engine.data.transforms import eval_transform, input_target
from engine.models.factory import ModelHandle

# Grad-CAM hooks the model; models may be shared (one cached copy serves every app session)


@dataclass
class CamResult:
    overlay: Image.Image
    heatmap: np.ndarray  # H x W in [0, 1]
    class_index: int
    class_name: str
    probability: float
    target_layer: str


def _trace_outputs(module: nn.Module, x: torch.Tensor, head: str) -> list[tuple[str, tuple[int, ...]]]:
    order: list[tuple[str, tuple[int, ...]]] = []
    with model_lock(module):  # the hooks see only this forward, never another thread's
        hooks = []
        head_reached = {"flag": False}
        for name, sub in module.named_modules():
            if not name:
                continue

            def hook(_m, _i, out, _name=name):
                if _name == head or _name.startswith(head + "."):
                    head_reached["flag"] = True
                if not head_reached["flag"] and isinstance(out, torch.Tensor):
                    order.append((_name, tuple(out.shape)))
            hooks.append(sub.register_forward_hook(hook))
        try:
            with torch.no_grad():
                module(x)
        finally:
            for h in hooks:
                h.remove()
    return order


def find_target_layer(handle: ModelHandle) -> tuple[str, Callable | None]:
    """(module name, reshape transform or None) for Grad-CAM on this model.

    Whichever comes later in the forward wins: the last feature map (a CNN) or the input of the
    last transformer block (a ViT, whose patch-embedding conv also makes a feature map early on).
    """
    module = handle.module
    outputs = _trace_outputs(module, torch.zeros(1, *handle.spec.input_size), handle.spec.head)
    position = {name: i for i, (name, _) in enumerate(outputs)}
    shapes = dict(outputs)
    maps = [n for n, s in outputs if len(s) == 4 and s[2] > 1 and s[3] > 1]
    best_map = maps[-1] if maps else None
    tokens = _token_target(module, shapes)
    if tokens and (best_map is None or position[tokens[2]] > position[best_map]):
        return tokens[0], tokens[1]
    if best_map:
        return best_map, None
    raise EngineError("Grad-CAM needs a model with spatial feature maps or ViT-style tokens; "
                      "this architecture has neither.")


def _token_target(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> tuple[str, Callable, str] | None:
    """The stack of transformer blocks (a container whose children all map (N, tokens, dim) to the
    same shape; the largest such): its second-to-last block, the reshape, and its last block."""
    best: tuple[int, list[str]] | None = None
    for name, sub in module.named_modules():
        if not isinstance(sub, (nn.Sequential, nn.ModuleList)) or len(sub) < 2:
            continue
        kids = [f"{name}.{k}" if name else k for k, _ in sub.named_children()]
        kid_shapes = {shapes.get(k) for k in kids}
        if len(kid_shapes) != 1 or len(next(iter(kid_shapes)) or ()) != 3:
            continue
        size = sum(p.numel() for p in sub.parameters())
        if best is None or size > best[0]:
            best = (size, kids)
    if best is not None:
        kids = best[1]
        tokens = shapes[kids[-2]][1]
        grid = math.isqrt(tokens)
        prefix = tokens - grid * grid  # [CLS] / register tokens in front of the patch grid
        if grid < 2 or prefix > 16:
            return None

        def reshape(t: torch.Tensor, _p: int = prefix, _g: int = grid) -> torch.Tensor:
            return t[:, _p:, :].reshape(t.size(0), _g, _g, t.size(2)).permute(0, 3, 1, 2)

        return kids[-2], reshape, kids[-1]
    return None


def grad_cam(handle: ModelHandle, image: Image.Image, class_index: int | None = None,
             temperature: float | None = None) -> CamResult:
    """Heatmap of the evidence for ``class_index`` (default: the predicted class), over the image; its
    probability divided by a calibrated run's ``temperature`` as every prediction of the run is.

    Safe on a model other threads use (the app's cached models): the model is locked while its
    hooks are in place, and every module's mode and ``requires_grad`` are restored.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = handle.module
    layer_name, reshape = find_target_layer(handle)
    transform = eval_transform(handle.spec)
    image = shrink_to(image.convert("RGB"), input_target(handle.spec))  # a big image costs no more than needed
    x = transform(image).unsqueeze(0)
    with evaluating(module):  # the model's lock too: its hooks never see another thread's forward
        grads = {n: p.requires_grad for n, p in module.named_parameters()}
        try:
            with torch.no_grad():
                probs = (module(x).float() / (temperature or 1.0)).softmax(-1)[0]
            index = int(probs.argmax()) if class_index is None else int(class_index)
            if not 0 <= index < handle.spec.num_classes:
                raise EngineError(f"Class index {index} is out of range (0..{handle.spec.num_classes - 1}).")
            with GradCAM(model=module, target_layers=[module.get_submodule(layer_name)],
                         reshape_transform=reshape) as cam:
                heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(index)])[0]
        finally:
            for n, p in module.named_parameters():
                p.requires_grad_(grads[n])
    size = handle.spec.input_size[-1]
    shown = image.resize((size, size))
    rgb = np.asarray(shown, dtype=np.float32) / 255.0
    overlay = show_cam_on_image(rgb, heat, use_rgb=True)
    return CamResult(overlay=Image.fromarray(overlay), heatmap=heat, class_index=index,
                     class_name=handle.spec.class_names[index], probability=float(probs[index]),
                     target_layer=layer_name)
