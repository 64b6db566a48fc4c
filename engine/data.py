"""Image datasets: built-in real data, image folders and zip uploads, validated and split.

An ImageSet is a list of (how to load one image, label) plus class names; nothing is decoded
until a sample is asked for (the Dataset pattern: decode + transform at access time).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from engine.archive import ZipLimits, extract_upload, is_hidden_name, safe_extract_zip  # noqa: F401 (re-exported)
from engine.errors import DataError, EngineError  # noqa: F401
from engine.images import IMAGE_SUFFIXES, open_image

BUILTIN = ("digits", "lfw")
TORCHVISION_SETS = ("cifar10",)
MIN_PER_CLASS = 2  # fewer images than this in a class cannot be split into train and val


@dataclass
class ImageSet:
    """Class names and a lazy loader per sample."""

    name: str
    class_names: list[str]
    labels: list[int]
    loaders: list[Callable[[], Image.Image]] = field(repr=False)
    sources: list[str]  # file path or "digits[17]": shown in reports and galleries
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        return self.loaders[i]()

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.class_names}
        for y in self.labels:
            out[self.class_names[y]] += 1
        return out


# ------------------------------------------------------------------ built-in data
def _array_loader(arr: np.ndarray, scale: float) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8)).convert("RGB")
    return load


def load_digits_set() -> ImageSet:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels), 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return ImageSet(
        name="digits", class_names=[str(i) for i in range(10)], labels=[int(t) for t in d.target],
        loaders=[_array_loader(img, 255.0 / 16.0) for img in d.images],
        sources=[f"digits[{i}]" for i in range(len(d.target))],
    )


def load_lfw_set() -> ImageSet:
    """scikit-image's lfw_subset: 100 faces and 100 non-faces, 25x25 grey."""
    from skimage.data import lfw_subset

    faces = lfw_subset()
    labels = [1] * 100 + [0] * 100
    return ImageSet(
        name="lfw", class_names=["non-face", "face"], labels=labels,
        loaders=[_array_loader(img, 255.0) for img in faces],
        sources=[f"lfw[{i}]" for i in range(len(labels))],
    )


# ------------------------------------------------------------------ folders
def _file_loader(path: Path) -> Callable[[], Image.Image]:
    return lambda: open_image(path)


def load_folder(root: str | Path, verify: bool = True) -> ImageSet:
    """One sub-folder per class. Hidden folders, non-images and unreadable files are skipped and listed."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden_name(p.name))
    if not class_dirs:
        inner = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        hint = " It holds images directly: put them in one sub-folder per class." if inner else ""
        raise DataError(f"{root.name} has no class folders.{hint}")
    lowered: dict[str, str] = {}
    for d in class_dirs:
        if d.name.lower() in lowered:
            raise DataError(f"Class folders '{lowered[d.name.lower()]}' and '{d.name}' differ only by case; merge them.")
        lowered[d.name.lower()] = d.name
    names, labels, loaders, sources, skipped = [], [], [], [], []
    for label, d in enumerate(class_dirs):
        names.append(d.name)
        for path in sorted(d.rglob("*")):
            rel = path.relative_to(root)
            if any(is_hidden_name(part) for part in rel.parts) or not path.is_file():
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((str(rel), "not an image file type"))
                continue
            if verify:
                problem = _verify_image(path)
                if problem:
                    skipped.append((str(rel), problem))
                    continue
            labels.append(label)
            loaders.append(_file_loader(path))
            sources.append(str(path))
    return ImageSet(name=root.name, class_names=names, labels=labels, loaders=loaders,
                    sources=sources, skipped=skipped)


def _verify_image(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.verify()  # cheap structural check, no full decode
    except Exception as exc:  # PIL raises many types for broken files
        return f"unreadable ({type(exc).__name__})"
    return None


# ------------------------------------------------------------------ validation and split
@dataclass
class DataReport:
    n_images: int
    counts: dict[str, int]
    skipped: list[tuple[str, str]]
    problems: list[str]  # blocking: training cannot start
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(ds: ImageSet, min_per_class: int = MIN_PER_CLASS) -> DataReport:
    counts = ds.counts()
    problems, warnings = [], []
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        problems.append(f"{len(empty)} class(es) have no images: {', '.join(empty)}.")
    populated = [c for c, n in counts.items() if n > 0]
    if len(populated) < 2:
        problems.append("Only one class has images: a classifier needs at least two classes.")
    few = [c for c, n in counts.items() if 0 < n < min_per_class]
    if few:
        problems.append(f"Classes with fewer than {min_per_class} images: {', '.join(few)}.")
    if ds.skipped:
        warnings.append(f"{len(ds.skipped)} file(s) skipped (listed below).")
    small = [c for c, n in counts.items() if min_per_class <= n < 10]
    if small:
        warnings.append(f"Very few images (<10) in: {', '.join(small)}; expect noisy results.")
    return DataReport(n_images=len(ds), counts=counts, skipped=list(ds.skipped),
                      problems=problems, warnings=warnings)


def subsample_per_class(labels: Sequence[int], per_class: int | None, seed: int = 0) -> list[int]:
    """At most ``per_class`` seeded random indices of every class (all of them when None), sorted."""
    if not per_class:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    keep: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep += rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()
    return sorted(keep)


def stratified_split(labels: Sequence[int], val_fraction: float = 0.2, test_fraction: float = 0.0,
                     seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Per-class shuffled split, same seed -> same split; every class keeps >= 1 training image."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError("Split fractions must be in (0, 1) and sum to less than 1.")
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    train, val, test = [], [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n = len(idx)
        n_val = max(1, int(round(n * val_fraction))) if n >= 2 else 0
        n_test = int(round(n * test_fraction)) if test_fraction else 0
        n_test = min(n_test, max(0, n - n_val - 1))
        val += idx[:n_val].tolist()
        test += idx[n_val:n_val + n_test].tolist()
        train += idx[n_val + n_test:].tolist()
    return sorted(train), sorted(val), sorted(test)


class TransformDataset(torch.utils.data.Dataset):
    """The torch Dataset: decode + transform one sample at access time."""

    def __init__(self, ds: ImageSet, indices: Sequence[int], transform: Callable[[Image.Image], torch.Tensor]):
        self.ds, self.indices, self.transform = ds, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        return self.transform(self.ds.image(j)), self.ds.labels[j]


def load_cifar10_set(root: str | Path | None = None, download: bool = True) -> ImageSet:
    """torchvision's CIFAR-10 (train split) from ``root``; downloaded when missing and reachable."""
    from torchvision.datasets import CIFAR10

    from engine.paths import data_root

    folder = Path(root) if root else data_root() / "cifar10"
    try:
        data = CIFAR10(str(folder), train=True, download=False)
    except RuntimeError:
        if not download:
            raise DataError(f"CIFAR-10 is not in {folder}.") from None
        try:
            data = CIFAR10(str(folder), train=True, download=True)
        except Exception as exc:  # URLError, HTTPError, timeouts
            raise DataError(
                f"CIFAR-10 is not in {folder} and could not be downloaded ({type(exc).__name__}); this "
                "machine may be offline. Put the extracted 'cifar-10-batches-py' folder there, or use "
                "digits, lfw or your own images.") from exc
    images = data.data  # N x 32 x 32 x 3 uint8, in memory
    return ImageSet(
        name="cifar10", class_names=list(data.classes), labels=[int(t) for t in data.targets],
        loaders=[_array_loader(images[i], 1.0) for i in range(len(images))],
        sources=[f"cifar10[{i}]" for i in range(len(images))],
    )


def load_source(source: str, work_dir: str | Path | None = None) -> ImageSet:
    """'digits' | 'lfw' | 'cifar10' | a folder | a .zip (extracted under ``work_dir``)."""
    if source in BUILTIN:
        return load_digits_set() if source == "digits" else load_lfw_set()
    if source == "cifar10":
        return load_cifar10_set()
    path = Path(source)
    if path.suffix.lower() == ".zip":
        if not path.is_file():
            raise DataError(f"Zip file not found: {path}")
        target = Path(work_dir or path.with_suffix("")) / "extracted"
        return load_folder(safe_extract_zip(path, target))
    if path.is_dir():
        return load_folder(path)
    raise DataError(f"Unknown data '{source}': use {', '.join(BUILTIN + TORCHVISION_SETS)}, a folder with one sub-folder "
                    "per class, or a .zip of such a folder.")
