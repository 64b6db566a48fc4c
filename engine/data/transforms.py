"""Pixels to tensors: the model's own eval transform, the training augmentation, and the
size an image must be decoded at. Training, evaluation and prediction share these, so
a model sees at inference exactly what it saw in training.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from PIL import Image

from engine.data.augment import AugmentSpec, parse_augment

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


def train_transform(spec: ModelSpec, image_size: int | None, *, augment: bool | str | AugmentSpec = True,
                    hflip: bool = True):
    """The training transform for an augmentation SPEC (engine/data/augment.py), sized to the model; the
    eval transform when nothing changes single images. ``hflip`` mirrors too when augmentation is on
    (an AugmentSpec is taken as it is: TrainConfig.augment_spec merged its hflip already)."""
    aug = parse_augment(augment)
    if aug and hflip and not isinstance(augment, AugmentSpec):
        aug = AugmentSpec(**{**aug.settings(), "flip": True})
    if not aug.per_image:
        return eval_transform(spec, image_size)
    return augment_transform(aug.settings(), spec.data_config(image_size))


def augment_transform(aug: dict[str, Any], data_config: dict[str, Any], *, to_tensor: bool = True):
    """Compose(geometry, flip, rotation, RandAugment / colour jitter[, to tensor, normalise]).

    ``aug``: AugmentSpec.settings(). timm's create_transform builds the random resized crop, flip,
    RandAugment and colour jitter, so ``crop:0.7`` alone is exactly the transform ``augment: true``
    always was with create_transform (its ColorJitter(0, 0, 0) included: it draws from the RNG, and old runs replay). Without
    ``crop`` the geometry is the eval transform's resize and centre crop; a rotation (not in timm)
    follows the flip, its corners filled with the mean colour. The standalone script
    (engine/outputs/script_template.py) builds the same Compose; tests compare their repr.
    ``to_tensor`` False: PIL images out (the preview).
    """
    from timm.data import create_transform
    from timm.data.transforms_factory import transforms_imagenet_train
    from torchvision import transforms as T

    size = data_config["input_size"]
    mean, std = data_config["mean"], data_config["std"]
    randaug = None if aug["randaug"] is None else f"rand-m{aug['randaug']}-mstd0.5"
    primary, secondary, final = transforms_imagenet_train(
        img_size=tuple(size[-2:]), scale=(aug["crop"] or 1.0, 1.0), ratio=(0.85, 1.18),
        hflip=0.5 if aug["flip"] else 0.0, vflip=0.0, color_jitter=float(aug["color"]), auto_augment=randaug,
        force_color_jitter=bool(aug["color"]), interpolation=data_config["interpolation"], mean=mean, std=std,
        separate=True)
    steps = list(primary.transforms)
    if aug["crop"] is None:  # the whole image, framed as evaluation frames it
        framing = create_transform(**{**data_config, "input_size": size}, is_training=False).transforms
        steps[:1] = [t for t in framing if type(t).__name__ in ("Resize", "CenterCrop", "ResizeKeepRatio",
                                                                    "CenterCropOrPad")]
    if aug["rotate"]:
        fill = [min(255, round(255 * m)) for m in mean]
        steps.append(T.RandomRotation(float(aug["rotate"]), interpolation=T.InterpolationMode.BILINEAR, fill=fill))
    steps += list(secondary.transforms)
    return T.Compose(steps + (list(final.transforms) if to_tensor else []))


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
