"""Pixels to tensors: the model's own eval transform, the training augmentation, and the
size an image must be decoded at. Training, evaluation and prediction share these, so
a model sees at inference exactly what it saw in training.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from PIL import Image

if TYPE_CHECKING:
    from engine.models.factory import ModelSpec


def eval_transform(spec: ModelSpec, image_size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Resize, center-crop, normalise exactly as the weights expect (timm's transform factory)."""
    from timm.data import create_transform

    return create_transform(**spec.data_config(image_size), is_training=False)


def input_target(spec: ModelSpec, image_size: int | None = None) -> int:
    """The shortest side an image must keep for the eval transform (timm resizes it to S / crop_pct
    before the center crop): decoding any larger only costs memory."""
    size = image_size or spec.input_size[-1]
    return math.ceil(size / (spec.crop_pct if spec.crop_pct and spec.crop_pct > 0 else 1.0))


def train_transform(spec: ModelSpec, image_size: int | None, *, augment: bool = True, hflip: bool = True):
    """timm's training transform (random resized crop, optional flip) sized to the model, or the eval
    transform when augmentation is off."""
    from timm.data import create_transform

    if not augment:
        return eval_transform(spec, image_size)
    cfg = spec.data_config(image_size)
    return create_transform(
        input_size=cfg["input_size"], is_training=True, scale=(0.7, 1.0), ratio=(0.85, 1.18),
        hflip=0.5 if hflip else 0.0, vflip=0.0, color_jitter=0.0,
        interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
    )


def resize_target(transform: Callable) -> int | None:
    """The shortest side an image needs before ``transform`` (a torchvision/timm Compose) runs.

    Eval: timm's Resize(S / crop_pct) of the shortest side. Train: a random-resized crop of at least
    ``scale[0]`` of the area, about sqrt(scale[0]) of each side, then resized to the crop size. None
    when the transform is not recognised (the image is then decoded at full size, within limits).
    """
    from torchvision import transforms as T

    for step in getattr(transform, "transforms", [transform]):
        size = getattr(step, "size", None)
        if isinstance(step, T.RandomResizedCrop) or type(step).__name__.startswith("RandomResizedCrop"):
            side = max(size) if isinstance(size, (tuple, list)) else int(size)
            smallest = min(getattr(step, "scale", (1.0, 1.0)))
            return math.ceil(side / math.sqrt(max(smallest, 0.01)))
        if isinstance(step, T.Resize) or type(step).__name__.startswith("Resize"):
            if isinstance(size, int):
                return size  # the shortest side becomes ``size``
            if isinstance(size, (tuple, list)) and size:
                return max(size)  # a fixed (h, w): both sides must stay at least that long
    return None
