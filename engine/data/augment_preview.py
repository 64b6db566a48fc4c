"""What an augmentation does, seen: one training image drawn through the training transform n times.

The Training page and ``python -m engine augment-preview`` show the same grid. The tiles go through
exactly the per-image steps a run's DataLoader uses (engine.data.transforms.augment_transform, before
the tensor conversion); with mixup/cutmix each tile is also blended with a second training image of
another class by the training step's own function (engine.data.mixing), one draw per tile, so the
grid shows the range of blends a batch can get. Seeded: the same SPEC and seed give the same grid, and
the caller's random state (torch, random, numpy) is left as it was.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from engine.core.errors import DataError, ImageError
from engine.data.augment import AugmentSpec, parse_augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the fill of rotated corners and RandAugment's translations
IMAGENET_STD = (0.229, 0.224, 0.225)
GAP = 4  # white pixels between tiles


@dataclass(frozen=True)
class PreviewSplit:
    """The split settings the preview picks its training image with (a TrainConfig's defaults)."""

    max_per_class: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_seed: int = 0


def preview_images(data: str, *, split_seed: int = 0, target: int = 256) -> list[Image.Image]:
    """[a training image, a training image of another class] of ``data`` (the second is what
    mixup/cutmix blend in), decoded reduced to about ``target`` px. DataError when nothing is readable."""
    from engine.data.datasets import load_source
    from engine.data.splits import split_all

    ds = load_source(data)
    train, _val, _test = split_all(ds, PreviewSplit(split_seed=split_seed))
    picked: list[Image.Image] = []
    first_label = None
    for i in train or range(len(ds.labels)):
        if picked and ds.labels[i] == first_label:
            continue
        try:
            image = ds.image(i, target=target)
        except ImageError:
            continue
        picked.append(image.convert("RGB"))
        first_label = ds.labels[i] if first_label is None else first_label
        if len(picked) == 2:
            break
    if not picked:
        raise DataError(f"{data}: no readable training image to preview.")
    return picked if len(picked) == 2 else picked * 2


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch, random and numpy seeded inside, restored after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def preview_config(image_size: int) -> dict:
    """The data config the preview frames images with: the training defaults (crop_pct 1, bilinear)."""
    return {"input_size": (3, image_size, image_size), "interpolation": "bilinear", "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "crop_pct": 1.0, "crop_mode": "center"}


def augmented_tiles(images: Sequence[Image.Image], spec: str | bool | AugmentSpec, *, n: int = 8, seed: int = 0,
                    image_size: int = 96) -> list[Image.Image]:
    """``n`` augmented versions of ``images[0]`` (``images[1]``: the mixup/cutmix partner), each
    ``image_size`` px square. AugmentError for a bad SPEC."""
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image

    from engine.data.mixing import mix_batch
    from engine.data.transforms import augment_transform

    aug = parse_augment(spec)
    steps = augment_transform(aug.settings(), preview_config(image_size), to_tensor=False)
    first, partner = images[0], images[1] if len(images) > 1 else images[0]
    tiles = []
    with _seeded(seed):
        for _ in range(n):
            tile = steps(first)
            if aug.mixes:
                pair = torch.stack([pil_to_tensor(tile), pil_to_tensor(steps(partner))]).float() / 255
                mixed, _ = mix_batch(pair, torch.tensor([0, 1]), 2, aug.mixup, aug.cutmix)
                tile = to_pil_image((mixed[0] * 255).round().clamp(0, 255).to(torch.uint8))
            tiles.append(tile.convert("RGB"))
    return tiles


def tile_grid(tiles: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """The tiles in rows of ``columns``, GAP white pixels apart."""
    side_w, side_h = tiles[0].size
    rows = -(-len(tiles) // columns)
    cols = min(columns, len(tiles))
    grid = Image.new("RGB", (cols * side_w + (cols - 1) * GAP, rows * side_h + (rows - 1) * GAP), (255, 255, 255))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % columns) * (side_w + GAP), (k // columns) * (side_h + GAP)))
    return grid


def augment_preview(images: Sequence[Image.Image], spec: str | bool | AugmentSpec, *, n: int = 8, seed: int = 0,
                    image_size: int = 96, columns: int = 4) -> Image.Image:
    """The grid of ``n`` augmented versions of one image (``augmented_tiles``), ``columns`` per row."""
    return tile_grid(augmented_tiles(images, spec, n=n, seed=seed, image_size=image_size), columns)
