"""Image datasets: built-in real data, image folders and zip uploads, validated and split.

An ImageSet is a list of (how to load one image, label) plus class names; nothing is decoded
until a sample is asked for (the Dataset pattern: decode + transform at access time).

"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from engine.core.errors import DataError, ImageError
from engine.core.paths import data_root
from engine.data.archive import extract_once, is_hidden_name
from engine.data.images import IMAGE_SUFFIXES, check_image, open_image
from engine.data.transforms import resize_target

BUILTIN = ("digits", "lfw")


@dataclass(frozen=True)
class BuiltinFacts:
    """What the case matrix needs to know about a built-in dataset without reading it."""

    images: int
    classes: int
    similarity: str  # to the ImageNet photos the backbones learned from: "similar" | "different"


BUILTIN_FACTS = {
    "digits": BuiltinFacts(images=1797, classes=10, similarity="different"),  # 8x8 grey strokes
    "lfw": BuiltinFacts(images=200, classes=2, similarity="similar"),  # photos of faces and scenes
}
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

    def image(self, i: int, target: int | None = None) -> Image.Image:
        """Sample ``i`` as RGB; files are decoded reduced to a shortest side >= ``target`` when given
        (in-memory arrays are small already and come as they are). Raises ImageError for a file
        that became unreadable since the folder was checked."""
        loader = self.loaders[i]
        return loader(target=target) if isinstance(loader, FileLoader) else loader()

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.class_names}
        for y in self.labels:
            out[self.class_names[y]] += 1
        return out


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


@dataclass(frozen=True)
class FileLoader:
    """Loads one image file, bounded (engine.images.open_image); messages call it by ``name``.

    ``root_real``: the resolved dataset folder; the file is read only while it still resolves inside
    it (a file swapped for a link to outside after the folder was checked is refused, not read).
    """

    path: Path
    name: str
    root_real: str | None = None

    def __call__(self, target: int | None = None) -> Image.Image:
        if self.root_real and not _inside(self.path, self.root_real):
            raise ImageError(f"{self.name}: {OUTSIDE}")
        return open_image(self.path, name=self.name, target=target)


OUTSIDE = "link to outside the dataset folder"
FOLDER_LINK = "link to a folder (links to folders are not followed)"
BROKEN_LINK = "broken link (or a link loop)"


def _inside(path: Path, root_real: str) -> bool:
    """Whether ``path`` resolves (every link followed, loops included) to ``root_real`` or below it."""
    real = os.path.realpath(path)  # never raises on loops, unlike Path.resolve on Python 3.11
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _link_problem(path: Path, root_real: str) -> str | None:
    """Why a symlink at ``path`` is not used: it leaves the dataset, or it is a link to a folder
    (never followed: following could loop or list the same images twice), or it is broken."""
    if not _inside(path, root_real):
        return OUTSIDE
    if path.is_dir():  # follows the link; a loop is False here
        return FOLDER_LINK
    if not path.exists():
        return BROKEN_LINK
    return None


def load_folder(root: str | Path, verify: bool = True) -> ImageSet:
    """One sub-folder per class. Hidden folders, non-images and unreadable files are skipped and listed.

    Nothing outside ``root`` is ever read: links are checked against the resolved root. A link to a
    file that stays inside the folder is used; a link to a file outside, and every link to a folder
    (class folder or deeper, inside or outside), is skipped with the reason. With ``verify`` every
    image is checked (engine.images.check_image: header limits, a reduced decode, Pillow's verify).
    """
    root = Path(root)
    if not root.name:  # '.', './': name the folder as the user sees it
        root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.")
    root_real = os.path.realpath(root)
    names, labels, loaders, sources, skipped = [], [], [], [], []
    class_dirs: list[Path] = []
    loose_images = False
    for entry in sorted(root.iterdir()):
        if is_hidden_name(entry.name):
            continue
        if entry.is_symlink():
            problem = _link_problem(entry, root_real)
            if problem in (OUTSIDE, FOLDER_LINK):  # a linked "class folder" is never read
                skipped.append((entry.name, problem))
                continue
        if entry.is_dir():
            class_dirs.append(entry)
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            loose_images = True
    if not class_dirs:
        hint = " It holds images directly: put them in one sub-folder per class." if loose_images else ""
        raise DataError(f"{root.name} has no class folders.{hint}")
    lowered: dict[str, str] = {}
    for d in class_dirs:
        if d.name.lower() in lowered:
            raise DataError(f"Class folders '{lowered[d.name.lower()]}' and '{d.name}' differ only by case; merge them.")
        lowered[d.name.lower()] = d.name
    for label, d in enumerate(class_dirs):
        names.append(d.name)
        for path in _class_files(d, root, root_real, skipped):
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((rel, "not an image file type"))
                continue
            if verify:
                problem = check_image(path)
                if problem:
                    skipped.append((rel, problem))
                    continue
            labels.append(label)
            loaders.append(FileLoader(path, rel, root_real))
            sources.append(str(path))
    return ImageSet(name=root.name, class_names=names, labels=labels, loaders=loaders,
                    sources=sources, skipped=skipped)


def _class_files(folder: Path, root: Path, root_real: str, skipped: list[tuple[str, str]]) -> list[Path]:
    """Every non-hidden file under a class folder, sorted; links that leave the dataset, point to
    folders or are broken are listed in ``skipped`` instead. os.walk(followlinks=False) never
    enters a linked folder, so a link loop cannot make it spin."""
    found: list[Path] = []

    def unreadable(exc: OSError) -> None:
        where = Path(exc.filename or folder)
        skipped.append((where.relative_to(root).as_posix(), f"folder cannot be read ({exc.strerror})"))

    for here, dirs, files in os.walk(folder, followlinks=False, onerror=unreadable):
        base = Path(here)
        kept = []
        for n in dirs:  # links to folders are listed here (os.walk still does not enter them)
            if is_hidden_name(n):
                continue
            if (base / n).is_symlink():
                link = base / n
                skipped.append((link.relative_to(root).as_posix(), _link_problem(link, root_real) or FOLDER_LINK))
                continue
            kept.append(n)
        dirs[:] = kept
        for n in files:
            path = base / n
            if is_hidden_name(n):
                continue
            problem = _link_problem(path, root_real) if path.is_symlink() else None
            if problem:
                skipped.append((path.relative_to(root).as_posix(), problem))
                continue
            found.append(path)
    return sorted(found)


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

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": [list(pair) for pair in self.skipped], "ok": self.ok}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        return cls(n_images=data["n_images"], counts=dict(data["counts"]),
                   skipped=[(str(a), str(b)) for a, b in data["skipped"]], problems=list(data["problems"]),
                   warnings=list(data["warnings"]))


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


class TransformDataset(torch.utils.data.Dataset):
    """The torch Dataset: decode (reduced to what the transform needs) + transform one sample.

    A file can change after the folder was checked (deleted, truncated, replaced). A training must
    not die mid-epoch for that: the sample is recorded in ``failed`` as (source, reason) and the next
    readable sample of this split stands in (deterministic, so a seeded epoch stays reproducible);
    ``substituted`` maps the position asked for to the index that stood in (evaluation drops those
    rows). With DataLoader workers, both fill in each worker's own copy.
    """

    def __init__(self, ds: ImageSet, indices: Sequence[int], transform: Callable[[Image.Image], torch.Tensor],
                 target: int | None = None):
        self.ds, self.indices, self.transform = ds, list(indices), transform
        self.target = target if target is not None else resize_target(transform)
        self.failed: list[tuple[str, str]] = []
        self.substituted: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.indices)
        for step in range(n):
            j = self.indices[(i + step) % n]
            try:
                image = self.ds.image(j, target=self.target)
            except ImageError as exc:
                if not any(src == self.ds.sources[j] for src, _ in self.failed):
                    self.failed.append((self.ds.sources[j], str(exc)))
                continue
            if step:
                self.substituted[i] = j
            return self.transform(image), self.ds.labels[j]
        raise DataError("None of the images of this split can be read any more: "
                        + "; ".join(reason for _, reason in self.failed[:3]))


def load_cifar10_set(root: str | Path | None = None, download: bool = True) -> ImageSet:
    """torchvision's CIFAR-10 (train split) from ``root``; downloaded when missing and reachable."""
    from torchvision.datasets import CIFAR10


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
    """'digits' | 'lfw' | 'cifar10' | a folder | a .zip (extracted under ``work_dir``).

    An empty or blank source is refused: Path("") is the current folder, never what was meant.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError("No data given: use digits, lfw, cifar10, a folder with one sub-folder per class, "
                        "or a .zip of such a folder.")
    if source in BUILTIN:
        return load_digits_set() if source == "digits" else load_lfw_set()
    if source == "cifar10":
        return load_cifar10_set()
    path = Path(source)
    if path.suffix.lower() == ".zip":
        if not path.is_file():
            raise DataError(f"Zip file not found: {path}")
        # a run's own folder, or a hidden one beside the zip: never a folder of the user's, since
        # extract_once replaces whatever it finds there that is not this zip's complete extraction
        target = Path(work_dir) / "extracted" if work_dir else path.parent / f".{path.name}.extracted"
        root = extract_once(path, target, display_name=path.name)
        try:
            return load_folder(root)
        except DataError as exc:  # "<internal folder> has no class folders": name the user's zip instead
            text = str(exc)
            if text.startswith(root.name + " "):
                raise DataError(f"{path.name}:{text[len(root.name):]}") from exc
            raise
    if path.is_dir():
        return load_folder(path)
    raise DataError(f"Unknown data '{source}': use {', '.join(BUILTIN + TORCHVISION_SETS)}, a folder with one sub-folder "
                    "per class, or a .zip of such a folder.")
