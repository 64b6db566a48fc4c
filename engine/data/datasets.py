"""Image datasets: built-in real data, image folders and zip uploads, validated and split.

An ImageSet is a list of (how to load one image, label) plus class names; nothing is decoded
until a sample is asked for (the Dataset pattern: decode + transform at access time).

"""
from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from engine.core.errors import DataError, ImageError, printable
from engine.core.files import read_json, resolves_inside
from engine.core.paths import data_root
from engine.data.archive import extract_once, is_hidden_name
from engine.data.balance import IMBALANCE_WARN, class_imbalance
from engine.data.images import IMAGE_SUFFIXES, check_image
from engine.data.imageset import BROKEN_LINK, FOLDER_LINK, OUTSIDE, FileLoader, ImageSet
from engine.data.layouts import (
    BUILTIN,
    MAX_LABEL,
    SPLITS,
    TORCHVISION_SETS,
    Layout,
    detect_layout,
    read_labels_csv,
    split_note,
    usable_class_name,
)
from engine.data.transforms import resize_target

if TYPE_CHECKING:
    from engine.data.overrides import Overrides


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
MIN_PER_CLASS = 2  # fewer images than this in a class cannot be split into train and val
BUILTIN_NOTE = "built-in dataset {}: a random stratified split."
CLASSES_NOTE = "one folder per class: a random stratified split."


def _array_loader(arr: np.ndarray, scale: float) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8)).convert("RGB")
    return load


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as scikit-learn ships them (datasets/data/digits.csv.gz: 64 pixels, then the label,
    per row), read without importing scikit-learn: that import (SciPy with it) costs ~0.9 s and ~150 MB
    of RSS in every process that trains on digits, a shared server's memory for nothing. Falls back to
    ``load_digits`` should the file ever move."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    places = list(spec.submodule_search_locations or []) if spec else []
    table = Path(places[0]) / "datasets" / "data" / "digits.csv.gz" if places else None
    if table is not None and table.is_file():
        with gzip.open(table) as f:
            rows = np.loadtxt(f, delimiter=",")
        if rows.ndim == 2 and rows.shape[1] == 65:
            return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def load_digits_set() -> ImageSet:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels), 10 classes."""
    images, target = digits_arrays()
    return ImageSet(
        name="digits", class_names=[str(i) for i in range(10)], labels=[int(t) for t in target],
        loaders=[_array_loader(img, 255.0 / 16.0) for img in images],
        sources=[f"digits[{i}]" for i in range(len(target))], layout_note=BUILTIN_NOTE.format("digits"),
    )


def load_lfw_set() -> ImageSet:
    """scikit-image's lfw_subset: 100 faces and 100 non-faces, 25x25 grey."""
    from skimage.data import lfw_subset

    faces = lfw_subset()
    labels = [1] * 100 + [0] * 100
    return ImageSet(
        name="lfw", class_names=["non-face", "face"], labels=labels,
        loaders=[_array_loader(img, 255.0) for img in faces],
        sources=[f"lfw[{i}]" for i in range(len(labels))], layout_note=BUILTIN_NOTE.format("lfw"),
    )


def _link_problem(path: Path, root_real: str) -> str | None:
    """Why a symlink at ``path`` is not used: it leaves the dataset, or it is a link to a folder
    (never followed: following could loop or list the same images twice), or it is broken."""
    if not resolves_inside(path, root_real):
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
    root = _dataset_folder(root)
    root_real = os.path.realpath(root)
    names, labels, loaders, sources, skipped = [], [], [], [], []
    class_dirs, loose_images = _class_dirs(root, root, root_real, skipped)
    if not class_dirs:
        hint = " It holds images directly: put them in one sub-folder per class." if loose_images else ""
        raise DataError(f"{root.name} has no class folders.{hint}")
    _refuse_case_twins([d.name for d in class_dirs], "Class folders")
    for label, d in enumerate(class_dirs):
        names.append(d.name)
        for path, rel in _images_in(d, root, root_real, skipped, verify):
            labels.append(label)
            loaders.append(FileLoader(path, rel, root_real))
            sources.append(str(path))
    return ImageSet(name=root.name, class_names=names, labels=labels, loaders=loaders,
                    sources=sources, skipped=skipped, layout_note=CLASSES_NOTE)


def _dataset_folder(root: str | Path) -> Path:
    root = Path(root)
    if not root.name:  # '.', './': name the folder as the user sees it
        root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.")
    return root


def _refuse_case_twins(names: list[str], what: str) -> None:
    lowered: dict[str, str] = {}
    for name in names:
        if name.lower() in lowered and lowered[name.lower()] != name:
            raise DataError(f"{what} '{lowered[name.lower()]}' and '{name}' differ only by case; merge them.")
        lowered[name.lower()] = name


def _class_dirs(folder: Path, root: Path, root_real: str, skipped: list[tuple[str, str]]) -> tuple[list[Path], bool]:
    """The class folders directly in ``folder`` (links to folders, or to outside, skipped and listed),
    and whether it also holds images directly."""
    class_dirs: list[Path] = []
    loose_images = False
    for entry in sorted(folder.iterdir()):
        if is_hidden_name(entry.name):
            continue
        if entry.is_symlink():
            problem = _link_problem(entry, root_real)
            if problem in (OUTSIDE, FOLDER_LINK):  # a linked "class folder" is never read
                skipped.append((entry.relative_to(root).as_posix(), problem))
                continue
        if entry.is_dir():
            if not usable_class_name(entry.name):
                skipped.append((printable(entry.relative_to(root).as_posix()),
                                f"a class folder name over {MAX_LABEL} characters or with control characters "
                                "(an escape, a newline): not read as a class; rename the folder"))
                continue
            class_dirs.append(entry)
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            loose_images = True
    return class_dirs, loose_images


def _images_in(folder: Path, root: Path, root_real: str, skipped: list[tuple[str, str]],
               verify: bool) -> list[tuple[Path, str]]:
    """(path, name inside the dataset) of every usable image under a class folder; the rest listed."""
    found = []
    for path in _class_files(folder, root, root_real, skipped):
        rel = path.relative_to(root).as_posix()
        problem = _image_problem(path, verify)
        if problem:
            skipped.append((rel, problem))
            continue
        found.append((path, rel))
    return found


def _image_problem(path: Path, verify: bool) -> str | None:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return "not an image file type"
    return check_image(path) if verify else None


def _file_problem(root: Path, rel: str, root_real: str) -> str | None:
    """Why the file ``rel`` (a checked relative path: no '..', not absolute) of a labels file is not
    read: a folder on the way that is a link (links to folders are never followed, as when a folder
    is scanned), a link leading out or broken, a missing file, not a file."""
    here = root
    for part in rel.split("/")[:-1]:
        here = here / part
        if here.is_symlink():
            return _link_problem(here, root_real) or FOLDER_LINK
    path = root / rel
    if path.is_symlink():
        problem = _link_problem(path, root_real)
        if problem:
            return problem
    if not os.path.lexists(path):
        return "file not found"
    if not path.is_file():
        return "not a file"
    if not resolves_inside(path, root_real):
        return OUTSIDE
    return None


def load_dataset(root: str | Path, verify: bool = True) -> ImageSet:
    """A dataset folder in any of its layouts (engine.data.layouts): a labels CSV, train/ val/ test/
    folders, or one folder per class (``load_folder``)."""
    root = _dataset_folder(root)
    layout = detect_layout(root)
    if layout.kind == "csv":
        ds = _load_csv(root, layout, verify)
    elif layout.kind == "splits":
        ds = _load_split_folders(root, layout, verify)
    else:
        ds = load_folder(root) if verify else load_folder(root, verify=False)
    listed = {name for name, _ in ds.skipped}  # a link at the top is listed once, by the scan's reason
    ds.skipped[:0] = [(name, why) for name, why in layout.ignored if name not in listed]
    return ds


def _load_split_folders(root: Path, layout: Layout, verify: bool) -> ImageSet:
    """train/ (val/, test/) each with class folders; classes are the union, in name order."""
    root_real = os.path.realpath(root)
    skipped: list[tuple[str, str]] = []
    found: list[tuple[str, str, Path, str]] = []  # (split, class, path, rel)
    names_found: set[str] = set()
    for split, folder in layout.split_dirs.items():
        class_dirs, loose = _class_dirs(folder, root, root_real, skipped)
        names_found |= {d.name for d in class_dirs}
        if loose:
            skipped += [(p.relative_to(root).as_posix(), f"not in a class folder of {folder.name}/")
                        for p in sorted(folder.iterdir()) if p.is_file() and not is_hidden_name(p.name)]
        for d in class_dirs:
            found += [(split, d.name, path, rel) for path, rel in _images_in(d, root, root_real, skipped, verify)]
    names = sorted(names_found)
    _refuse_case_twins(names, "Class folders")
    index = {n: i for i, n in enumerate(names)}
    return ImageSet(name=root.name, class_names=names, labels=[index[c] for _, c, _, _ in found],
                    loaders=[FileLoader(path, rel, root_real) for _, _, path, rel in found],
                    sources=[str(path) for _, _, path, _ in found], skipped=skipped,
                    splits=[s for s, _, _, _ in found],
                    layout_note=split_note(layout.why, {s for s, _, _, _ in found}))


def _load_csv(root: Path, layout: Layout, verify: bool) -> ImageSet:
    """The images a labels CSV lists, each checked like a scanned file (links, boundary, decode)."""
    assert layout.csv is not None
    root_real = os.path.realpath(root)
    table = read_labels_csv(layout.csv)
    skipped = list(table.skipped)
    names = sorted({r.label for r in table.rows})
    index = {n: i for i, n in enumerate(names)}
    labels, loaders, sources, splits = [], [], [], []
    for row in table.rows:
        path = root / row.path
        problem = _file_problem(root, row.path, root_real) or _image_problem(path, verify)
        if problem:
            skipped.append((row.path, problem))
            continue
        labels.append(index[row.label])
        loaders.append(FileLoader(path, row.path, root_real))
        sources.append(str(path))
        splits.append(row.split)
    extra = f" (columns {', '.join(table.ignored_columns)} not used)" if table.ignored_columns else ""
    if table.has_split:
        note = split_note(f"{layout.why} with a split column{extra}", set(splits))
    else:
        note = f"{layout.why}, no split column{extra}: a random stratified split."
    return ImageSet(name=root.name, class_names=names, labels=labels, loaders=loaders, sources=sources,
                    skipped=skipped, splits=splits if table.has_split else None, layout_note=note)


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
    layout_note: str = ""  # which layout was found, and the split it gives
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images (given splits)
    # the training images' largest/smallest class and their ratio (engine.data.balance.class_imbalance); {}: < 2 classes
    imbalance: dict[str, Any] = field(default_factory=dict)
    # relabelled / excluded / unmatched by the overrides file (engine.data.overrides); {}: none
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON gives it (the layout's sentence under "layout", as it always was)."""
        data = asdict(self)
        data["layout"] = data.pop("layout_note")
        return {**data, "skipped": [list(pair) for pair in self.skipped], "ok": self.ok}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        return cls(n_images=data["n_images"], counts=dict(data["counts"]),
                   skipped=[(str(a), str(b)) for a, b in data["skipped"]], problems=list(data["problems"]),
                   warnings=list(data["warnings"]), layout_note=str(data.get("layout") or ""),
                   split_counts={str(k): dict(v) for k, v in (data.get("split_counts") or {}).items()},
                   imbalance=dict(data.get("imbalance") or {}),
                   overrides=dict(data.get("overrides") or {}))


def split_counts(ds: ImageSet) -> dict[str, dict[str, int]]:
    """Images per class in each split the data names ({} for a random split)."""
    if ds.splits is None:
        return {}
    out = {s: {c: 0 for c in ds.class_names} for s in SPLITS if s in set(ds.splits)}
    for y, s in zip(ds.labels, ds.splits):
        out[s][ds.class_names[y]] += 1
    return out


def validate(ds: ImageSet, min_per_class: int = MIN_PER_CLASS) -> DataReport:
    counts = ds.counts()
    per_split = split_counts(ds)
    problems, warnings = [], []
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        problems.append(f"{len(empty)} class(es) have no images: {', '.join(empty)}.")
    populated = [c for c, n in counts.items() if n > 0]
    if not populated:
        problems.append("No class has images: a classifier needs images of at least two classes.")
    elif len(populated) < 2:
        problems.append("Only one class has images: a classifier needs at least two classes.")
    # the images a class trains on: all of them (random split), or its given train split
    pool = per_split.get("train", {c: 0 for c in counts}) if per_split else counts
    if per_split:
        untrained = [c for c in populated if pool[c] == 0]
        if untrained:
            where = " and ".join(s for s in ("val", "test") if any(per_split.get(s, {}).get(c) for c in untrained))
            problems.append(f"Class(es) with images only in {where}, none in train: {', '.join(untrained)}; "
                            "a model cannot learn a class it never trains on.")
    need = min_per_class if not per_split or "val" not in per_split else 1
    few = [c for c, n in pool.items() if 0 < n < need]
    if few:
        what = "training images" if per_split else "images"
        problems.append(f"Classes with fewer than {need} {what}: {', '.join(few)}.")
    for split in ("val", "test"):
        missing = [c for c in populated if pool.get(c) and split in per_split and not per_split[split][c]]
        if missing:
            warnings.append(f"No {split} images for: {', '.join(missing)}; its {split} scores leave "
                            f"{'this class' if len(missing) == 1 else 'these classes'} out.")
    if ds.skipped:
        warnings.append(f"{len(ds.skipped)} file(s) skipped (listed below).")
    if ds.overrides:
        from engine.data.overrides import describe

        warnings.append(describe(ds.overrides))
    small = [c for c, n in pool.items() if need <= n < 10]
    if small:
        warnings.append(f"Very few images (<10) in: {', '.join(small)}; expect noisy results.")
    imbalance = class_imbalance(pool) or {}  # a random split is stratified: the training images keep these ratios
    if imbalance.get("imbalanced"):
        what = "training images" if per_split else "images"
        warnings.append(f"Imbalanced classes: '{imbalance['largest']}' has {imbalance['largest_images']} {what}, "
                        f"'{imbalance['smallest']}' {imbalance['smallest_images']} ({imbalance['ratio']:.1f}:1, the "
                        f"warning starts at {IMBALANCE_WARN:g}:1). Accuracy can stay high while a small class is "
                        "missed: watch macro-F1 and balanced accuracy, and consider balancing (--balance weights "
                        "or sampler).")
    return DataReport(n_images=len(ds), counts=counts, skipped=list(ds.skipped),
                      problems=problems, warnings=warnings, layout_note=ds.layout_note, split_counts=per_split,
                      imbalance=imbalance, overrides={k: v for k, v in ds.overrides.items() if k != "decisions"})


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


def load_source(source: str, work_dir: str | Path | None = None, overrides: Overrides | None = None,
                verify: bool = True) -> ImageSet:
    """'digits' | 'lfw' | 'cifar10' | a folder | a .zip (extracted under ``work_dir``), with the decisions
    about single images applied (engine.data.overrides): ``overrides`` when given; else, for a run's
    ``work_dir``, those the run trained with (its split stays its own); else the dataset's current ones.

    An empty or blank source is refused: Path("") is the current folder, never what was meant.
    ``verify=False`` lists a folder's or zip's images without decoding each (what a decision about one
    image needs; a training decodes every one, and skips what does not decode).
    """
    from engine.data.overrides import apply_overrides, read_overrides, run_overrides, with_zipped

    ds = _read_source(source, work_dir, verify)
    if overrides is None:
        overrides = run_overrides(work_dir) if work_dir is not None else read_overrides(source)
    if Path(source).suffix.lower() == ".zip":
        overrides = with_zipped(ds, overrides)
    return apply_overrides(ds, overrides)


def _imported(work_dir: str | Path) -> bool:
    """Whether a run folder holds a run imported from a bundle: its data path was written on another
    machine, so it is untrusted here (engine.runs.bundle)."""
    status = read_json(Path(work_dir) / "status.json", {})
    return isinstance(status, dict) and bool(status.get("imported_from"))


def _read_source(source: str, work_dir: str | Path | None, verify: bool = True) -> ImageSet:
    """The data as delivered (see ``load_source``)."""
    if not isinstance(source, str) or not source.strip():
        raise DataError("No data given: use digits, lfw, cifar10, a folder with one sub-folder per class, "
                        "or a .zip of such a folder.")
    if source in BUILTIN:
        return load_digits_set() if source == "digits" else load_lfw_set()
    if source == "cifar10":
        return load_cifar10_set()
    if "://" in source:  # engine/cluster/fetch.py: the job that trains on it fetches it, never this server
        raise DataError(f"Data named by URL ({printable(source)[:80]}) is fetched by the Ray cluster that trains on "
                        "it, not by this machine: train with --cluster (Training page: Where to train), or download "
                        "the zip and choose it here.")
    path = Path(source)
    if work_dir is not None and _imported(work_dir) and not resolves_inside(path, os.path.realpath(data_root())):
        shown = printable(source)[-80:]
        raise DataError(f"This run was imported from another machine, and its data path ({shown}) is outside "
                        f"this app's data folder ({data_root()}), so it is not read. Its predictions and exports "
                        "need no data.")
    if path.suffix.lower() == ".zip" and not path.is_dir():  # a folder named like a zip is read as a folder
        if not path.exists():
            raise DataError(f"Zip file not found: {path}")
        if not path.is_file():
            raise DataError(f"{path.name} is not a regular file (a pipe or a device): a zip upload must be a file.")
        # a run's own folder, or a hidden one beside the zip: never a folder of the user's, since
        # extract_once replaces whatever it finds there that is not this zip's complete extraction
        target = Path(work_dir) / "extracted" if work_dir else path.parent / f".{path.name}.extracted"
        root = extract_once(path, target, display_name=path.name)
        try:
            ds = load_dataset(root, verify)
            ds.name = path.name  # messages name the user's zip, never the hidden folder it is unpacked into
            return ds
        except DataError as exc:  # "<internal folder> has no class folders": name the user's zip instead
            text = str(exc)
            if text.startswith(root.name + " "):
                raise DataError(f"{path.name}:{text[len(root.name):]}") from exc
            raise
    if path.is_dir():
        return load_dataset(path, verify)
    raise DataError(f"Unknown data '{source}': use {', '.join(BUILTIN + TORCHVISION_SETS)}, a folder with one sub-folder "
                    "per class, or a .zip of such a folder.")
