"""Zip uploads: extracted with path, type and size checks, once, atomically, even under concurrency.

An upload is untrusted: members may point outside the archive, be links, lie about their size,
be encrypted or use a compression this Python cannot read. Every such case ends in one DataError
that names the user's file, never a traceback or a half-extracted folder.
"""
from __future__ import annotations

import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from engine.errors import DataError

IGNORED_NAMES = {"__MACOSX", ".ipynb_checkpoints", "__pycache__", ".git", ".DS_Store"}


def is_hidden_name(part: str) -> bool:
    """Folders and files a dataset never means: dot-files and tool droppings."""
    return part.startswith(".") or part in IGNORED_NAMES


@dataclass(frozen=True)
class ZipLimits:
    max_files: int = 20_000
    max_total_bytes: int = 2 * 1024**3
    max_ratio: float = 200.0  # uncompressed / compressed: beyond this it looks like a zip bomb


def safe_extract_zip(archive: str | Path, dest: str | Path, limits: ZipLimits = ZipLimits()) -> Path:
    """Extract a zip with path and size checks: no absolute paths, no '..', no links, no bombs."""
    dest = Path(dest).resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{Path(archive).name} is not a readable zip file ({exc}).") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > limits.max_files:
            raise DataError(f"The zip holds {len(members)} files; the limit is {limits.max_files}.")
        total = sum(m.file_size for m in members)
        packed = sum(m.compress_size for m in members) or 1
        if total > limits.max_total_bytes:
            raise DataError(f"The zip unpacks to {total / 1e6:.0f} MB; the limit is {limits.max_total_bytes / 1e6:.0f} MB.")
        if total / packed > limits.max_ratio and total > 10 * 1024**2:
            raise DataError("The zip's compression ratio is implausible (a zip bomb?); refused.")
        for m in members:
            name = PurePosixPath(m.filename.replace("\\", "/"))
            mode = m.external_attr >> 16
            if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
                raise DataError(f"The zip entry '{m.filename}' points outside the archive; refused.")
            if stat.S_ISLNK(mode):
                raise DataError(f"The zip entry '{m.filename}' is a link; refused.")
        dest.mkdir(parents=True, exist_ok=True)
        written = 0
        for m in members:
            target = (dest / m.filename.replace("\\", "/")).resolve()
            if not str(target).startswith(str(dest) + os.sep):
                raise DataError(f"The zip entry '{m.filename}' points outside the archive; refused.")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if written > limits.max_total_bytes:
                        raise DataError("The zip unpacks to more than it declares; refused.")
                    out.write(chunk)
    return _dataset_root(dest)


def extract_upload(archive: str | Path, limits: ZipLimits = ZipLimits()) -> Path:
    """Extract an uploaded zip once, beside it (``x.zip`` -> ``x/``); later calls reuse it."""
    archive = Path(archive)
    dest = archive.with_suffix("")
    done = dest / ".extracted"
    if done.is_file():
        return _dataset_root(dest)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)  # a half-finished earlier extraction
    root = safe_extract_zip(archive, dest, limits)
    done.write_text("ok")
    return root


def _dataset_root(folder: Path) -> Path:
    """A zip of 'flowers/' holds one top folder: the classes are one level down."""
    entries = [p for p in folder.iterdir() if not is_hidden_name(p.name)]
    if len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if p.is_dir() and not is_hidden_name(p.name)]
        if inner:
            return entries[0]
    return folder
