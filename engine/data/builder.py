"""Datasets built image by image (the browser's dataset builder, and `python -m engine dataset`).

A built dataset is an ordinary folder in the data directory with one sub-folder per class, so it is
trainable at once by everything that reads folders, and it survives a page refresh because the
disk is its only state. A hidden marker file says the builder made it: only such folders are
changed here (a dataset a user copied into the data folder is never renamed or deleted by a click).

Every added file is untrusted, exactly like a zip member: its size, type and pixel count are checked
before anything is decoded, and a refused file is reported with its reason and never written.
Images are stored under a name that ends with a hash of their bytes, so adding the same file twice
(a rerun, a double click, two teammates) keeps one copy, and the same photo cannot sit in two classes.
"""
from __future__ import annotations

import hashlib
import io
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from engine.core.errors import DataError
from engine.core.files import atomic_write_bytes, atomic_write_json, file_lock
from engine.core.paths import data_root
from engine.data.archive import is_hidden_name
from engine.data.images import IMAGE_SUFFIXES, check_image

MARKER = ".workbench-dataset.json"  # hidden, so no scan lists it; its presence makes a folder editable here
LOCK = ".workbench-dataset.lock"
SPLIT_NAMES = {"train", "val", "valid", "validation", "test"}  # class folders so named would read as a split layout
RESERVED = {"uploads", "overrides"}  # the data folder's own sub-folders
MAX_NAME = 64
_HASH = 10  # hex digits of sha256 in a stored file name: "<stem>-<hash>.<ext>"
_FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif",
                  "TIFF": ".tif"}


@dataclass(frozen=True)
class BuilderLimits:
    """What one built dataset may hold: sized for a shared 2.7 GB box whose disk is wiped on restart."""
    max_file_bytes: int = 25 * 1024**2
    max_images: int = 10_000
    max_total_bytes: int = 1024**3


@dataclass
class AddResult:
    """What became of each file offered to a class (by the name the user gave it)."""
    added: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)  # the same bytes are already in this class
    refused: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): never written

    def summary(self) -> str:
        parts = [f"{len(self.added)} added"]
        if self.already:
            parts.append(f"{len(self.already)} already there")
        if self.refused:
            parts.append(f"{len(self.refused)} refused")
        return ", ".join(parts)


def check_name(text: str, what: str) -> str:
    """A class or dataset name that is safe as one folder name, or a DataError saying why not.

    Names are NFC-normalised (a name typed on a Mac and on Linux is the same folder) and trimmed.
    """
    name = unicodedata.normalize("NFC", str(text or "")).strip()
    if not name:
        raise DataError(f"Give the {what} a name.")
    if len(name) > MAX_NAME:
        raise DataError(f"{what.capitalize()} names are at most {MAX_NAME} characters.")
    if name in (".", "..") or name.startswith("."):
        raise DataError(f"A {what} name cannot start with a dot.")
    if re.search(r"[/\\\x00-\x1f\x7f:*?\"<>|]", name):
        raise DataError(f"'{name}': a {what} name cannot contain / \\ : * ? \" < > | or control characters.")
    if what == "class" and name.lower() in SPLIT_NAMES:
        raise DataError(f"'{name}' cannot be a class name: a folder so named marks a train/val/test split.")
    if what == "dataset" and name.lower() in RESERVED:
        raise DataError(f"'{name}' is a folder the app keeps for itself; choose another dataset name.")
    return name


def built_datasets(root: Path | None = None) -> list[str]:
    """The datasets the builder made in the data folder, by name."""
    base = root or data_root()
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir()
                  if p.is_dir() and not p.is_symlink() and (p / MARKER).is_file())


def _stem(name: str) -> str:
    stem = unicodedata.normalize("NFC", Path(name).stem)
    stem = re.sub(r"[^\w\-]+", "-", stem).strip("-_")[:40]
    return stem or "image"


class BuiltDataset:
    """One built dataset: its classes are its sub-folders, its images their files."""

    def __init__(self, root: Path, limits: BuilderLimits = BuilderLimits()):
        self.root = root
        self.limits = limits

    # ------------------------------------------------------------ finding one
    @classmethod
    def create(cls, name: str, root: Path | None = None) -> BuiltDataset:
        """A new, empty dataset; a folder of that name already there (built or not) is refused."""
        name = check_name(name, "dataset")
        base = root or data_root()
        folder = base / name
        if folder.exists() or folder.is_symlink() or any(p.name.lower() == name.lower() for p in _listing(base)):
            raise DataError(f"A dataset or folder named '{name}' already exists in the data folder.")
        folder.mkdir(parents=True)
        atomic_write_json(folder / MARKER, {"version": 1, "created": time.time()})
        return cls(folder)

    @classmethod
    def open(cls, name: str, root: Path | None = None) -> BuiltDataset:
        """An existing built dataset; a folder the builder did not make is refused, never changed."""
        name = check_name(name, "dataset")
        folder = (root or data_root()) / name
        if folder.is_symlink() or not folder.is_dir():
            raise DataError(f"There is no dataset named '{name}' in the data folder.")
        if not (folder / MARKER).is_file():
            raise DataError(f"'{name}' was not made with the dataset builder, so it is not changed here: "
                            "edit its folder directly.")
        return cls(folder)

    @property
    def name(self) -> str:
        return self.root.name

    # ------------------------------------------------------------ reading
    def classes(self) -> dict[str, list[str]]:
        """Class name -> its image files (sorted), in folder order."""
        out: dict[str, list[str]] = {}
        for folder in sorted(_listing(self.root)):
            if folder.is_dir() and not folder.is_symlink() and not is_hidden_name(folder.name):
                out[folder.name] = sorted(p.name for p in folder.iterdir()
                                          if p.is_file() and not p.is_symlink() and not is_hidden_name(p.name))
        return out

    def image_path(self, cls_name: str, file: str) -> Path:
        """The stored file ``file`` of class ``cls_name`` (names checked: nothing outside the dataset)."""
        folder = self._class_dir(cls_name)
        if Path(file).name != file or is_hidden_name(file):
            raise DataError(f"'{file}' is not an image of class '{cls_name}'.")
        path = folder / file
        if path.is_symlink() or not path.is_file():
            raise DataError(f"'{file}' is not an image of class '{cls_name}'.")
        return path

    # ------------------------------------------------------------ changing
    def add_class(self, name: str) -> str:
        name = check_name(name, "class")
        with self._lock():
            if any(c.lower() == name.lower() for c in self.classes()):
                raise DataError(f"There is already a class named '{name}'.")
            (self.root / name).mkdir()
        return name

    def rename_class(self, old: str, new: str) -> str:
        folder = self._class_dir(old)
        new = check_name(new, "class")
        if new == old:
            return new
        with self._lock():
            if any(c.lower() == new.lower() and c != old for c in self.classes()):
                raise DataError(f"There is already a class named '{new}'.")
            folder.rename(self.root / new)  # one rename: a reader sees the old name or the new, never half
        return new

    def delete_class(self, name: str) -> int:
        """Delete a class and its images (copies the builder stored); returns how many images went."""
        folder = self._class_dir(name)
        with self._lock():
            n = sum(1 for p in folder.iterdir() if p.is_file())
            hidden = self.root / f".deleting-{name}-{time.time_ns()}"
            folder.rename(hidden)  # gone from every scan at once; a crash leaves only a hidden folder
            shutil.rmtree(hidden, ignore_errors=True)
        return n

    def remove_image(self, cls_name: str, file: str) -> None:
        self.image_path(cls_name, file).unlink()

    def add_images(self, cls_name: str, files: Iterable[tuple[str, bytes]]) -> AddResult:
        """Check and store each (name, bytes) in class ``cls_name``; refused files are listed, never written."""
        folder = self._class_dir(cls_name)
        result = AddResult()
        with self._lock():
            known = self._hashes()
            count = sum(len(v) for v in self.classes().values())
            total = sum(p.stat().st_size for p in self.root.glob("*/*") if p.is_file() and not p.is_symlink())
            for shown, data in files:
                shown = Path(str(shown)).name or "upload"
                reason = self._refusal(shown, data)
                if reason:
                    result.refused.append((shown, reason))
                    continue
                digest = hashlib.sha256(data).hexdigest()[:_HASH]
                if digest in known:
                    where = known[digest]
                    if where == cls_name:
                        result.already.append(shown)
                    else:
                        result.refused.append((shown, f"the same image is already in class '{where}'"))
                    continue
                if count + 1 > self.limits.max_images:
                    result.refused.append((shown, f"the dataset is full ({self.limits.max_images:,} images)"))
                    continue
                if total + len(data) > self.limits.max_total_bytes:
                    result.refused.append((shown, f"the dataset is full ({_mb(self.limits.max_total_bytes)})"))
                    continue
                atomic_write_bytes(folder / f"{_stem(shown)}-{digest}{_suffix(data)}", data)
                known[digest] = cls_name
                count += 1
                total += len(data)
                result.added.append(shown)
        return result

    def zip_bytes(self) -> bytes:
        """The dataset as a zip of its class folders: what to keep when a hosted disk is wiped, and
        what "upload a zip" reads back. Images are already compressed, so they are stored as they are."""
        import zipfile

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for cls_name, files in self.classes().items():
                for f in files:
                    zf.write(self.root / cls_name / f, f"{self.name}/{cls_name}/{f}")
        return buf.getvalue()

    def add_files(self, cls_name: str, paths: Iterable[Path]) -> AddResult:
        """``add_images`` for files on this machine (the CLI): a folder, a device or a file over the size
        limit is refused by its name without being read."""
        readable, refused = [], []
        for path in map(Path, paths):
            if not path.is_file():
                refused.append((path.name, "not a file"))
            elif (too_big := self._size_refusal(path.stat().st_size)):
                refused.append((path.name, too_big))
            else:
                readable.append((path.name, path.read_bytes()))
        result = self.add_images(cls_name, readable)
        result.refused[:0] = refused
        return result

    # ------------------------------------------------------------ internals
    def _class_dir(self, name: str) -> Path:
        if not isinstance(name, str) or Path(name).name != name or is_hidden_name(name):
            raise DataError(f"There is no class named '{name}'.")
        folder = self.root / name
        if folder.is_symlink() or not folder.is_dir():
            raise DataError(f"There is no class named '{name}'.")
        return folder

    def _hashes(self) -> dict[str, str]:
        """Hash in a stored name -> its class (what makes adding idempotent)."""
        found = {}
        for cls_name, files in self.classes().items():
            for f in files:
                m = re.search(r"-([0-9a-f]{%d})\.[a-z]+$" % _HASH, f)
                if m:
                    found[m.group(1)] = cls_name
        return found

    def _refusal(self, shown: str, data: bytes) -> str | None:
        if not isinstance(data, (bytes, bytearray)) or not data:
            return "empty file"
        if (too_big := self._size_refusal(len(data))):
            return too_big
        if Path(shown).suffix and Path(shown).suffix.lower() not in IMAGE_SUFFIXES:
            return "not an image file type"
        return check_image(bytes(data))  # header limits (pixels, aspect), a reduced decode, verify()

    def _size_refusal(self, size: int) -> str | None:
        """One wording for a file over the limit, whether its bytes came in an upload or sit on disk."""
        if size <= self.limits.max_file_bytes:
            return None
        return f"{_mb(size)} is over the {_mb(self.limits.max_file_bytes)} a file may have"

    def _lock(self) -> file_lock:
        """One change at a time per dataset (two sessions adding to one class count and hash correctly)."""
        return file_lock(self.root / LOCK)


def _listing(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def _suffix(data: bytes) -> str:
    """The stored suffix from what the bytes are (a .png that is a JPEG is stored as .jpg)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return _FORMAT_SUFFIX.get(img.format or "", ".png")


def _mb(n: int) -> str:
    return f"{n / 1024**2:.0f} MB" if n < 1024**3 else f"{n / 1024**3:.0f} GB"
