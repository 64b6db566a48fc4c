"""Zip uploads: extracted with path, type and size checks, once, atomically, even under concurrency.

An upload is untrusted: members may point outside the archive, be links or devices, lie about their
size, be encrypted, damaged or use a compression this Python cannot read, or simply not be laid out
as one folder per class. Every such case ends in one DataError that names the user's file
("flowers.zip: ..."), never a traceback, a server path or a half-extracted folder.

Extraction is published by one atomic rename of a private temp folder whose completion marker was
written last, so a folder at the destination is either complete or not ours to use.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import uuid
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from engine.core.errors import DataError
from engine.core.faults import fault_point
from engine.core.files import loads_bounded

try:
    import fcntl
except ImportError:  # Windows: no flock; the rename protocol alone still never publishes half a folder
    fcntl = None  # type: ignore[assignment]

try:
    from lzma import LZMAError
except ImportError:  # a Python built without lzma cannot read LZMA members at all
    LZMAError = zlib.error  # type: ignore[misc,assignment]

IGNORED_NAMES = {"__MACOSX", ".ipynb_checkpoints", "__pycache__", ".git", ".DS_Store"}
MARKER = ".extracted"  # written last inside an extraction: which archive it holds (size, mtime, sha256)
STALE_AFTER_S = 15 * 60  # without a lock, a temp folder this old belongs to a dead extractor
MAX_NAME_CHARS = 1024  # a whole member path; more is never a real dataset
MAX_PART_BYTES = 255  # one file or folder name (NAME_MAX on Linux, macOS and Windows)
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA,
                    getattr(zipfile, "ZIP_ZSTANDARD", zipfile.ZIP_STORED)}
METHOD_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 10: "PKWARE Implode", 18: "IBM TERSE",
                19: "IBM LZ77", 93: "Zstandard", 95: "XZ", 96: "JPEG", 97: "WavPack", 98: "PPMd"}
AES_METHOD = 99  # WinZip AES: the member is encrypted
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar")


def is_hidden_name(part: str) -> bool:
    """Folders and files a dataset never means: dot-files and tool droppings."""
    return part.startswith(".") or part in IGNORED_NAMES


@dataclass(frozen=True)
class ZipLimits:
    max_files: int = 20_000
    max_total_bytes: int = 2 * 1024**3
    max_ratio: float = 200.0  # uncompressed / compressed: beyond this it looks like a zip bomb


# ------------------------------------------------------------------ public API
def extract_once(archive: str | Path, dest: str | Path, *, display_name: str | None = None,
                 limits: ZipLimits = ZipLimits()) -> Path:
    """Extract ``archive`` into ``dest`` once and return the dataset root inside it.

    ``dest`` is reserved for this archive: whatever is there without a marker matching the archive
    (a crash's leftovers, the old extractor's output, another zip of the same name) is moved aside
    and redone, never used. The zip is unpacked into a private temp folder beside ``dest``, the
    marker is written last and one rename publishes it, so a reader sees all of it or none, whatever
    is killed when. A flock beside ``dest`` makes concurrent callers (threads or processes) wait for
    the first instead of extracting twice; crash safety does not rest on it (the OS drops a dead
    process's lock, and the rename alone decides what is published). ``display_name`` is the name
    the user knows the file by, used in every message (uploads are stored under another name).
    """
    archive, dest = Path(archive), Path(dest)
    shown = Path(display_name or archive.name).name
    try:
        stamp = _stamp(archive)
        if _is_complete(dest, archive, stamp):
            return _dataset_root(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(dest.parent / f".{dest.name}.lock") as exclusive:
            if _is_complete(dest, archive, stamp):
                return _dataset_root(dest)  # another caller finished while we waited
            _remove_leftovers(dest, min_age_s=0 if exclusive else STALE_AFTER_S)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.part-", dir=dest.parent))
            try:
                _extract_checked(archive, tmp, shown, limits)
                (tmp / MARKER).write_text(json.dumps({**stamp, "sha256": _sha256(archive)}))
                fault_point(MARKER, "before-rename")
                _publish(tmp, dest, archive, stamp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    except OSError as exc:  # the disk, not the zip: still one line, without server paths
        raise DataError(f"{shown}: could not be extracted ({exc.strerror or type(exc).__name__}).") from exc
    return _dataset_root(dest)


def extract_upload(archive: str | Path, limits: ZipLimits = ZipLimits(), *,
                   display_name: str | None = None) -> Path:
    """Extract an uploaded zip once, beside it (``x.zip`` -> ``x/``); later calls reuse it."""
    archive = Path(archive)
    dest = archive.with_suffix("") if archive.suffix else archive.with_name(archive.name + ".d")
    return extract_once(archive, dest, display_name=display_name, limits=limits)


def safe_extract_zip(archive: str | Path, dest: str | Path, limits: ZipLimits = ZipLimits(), *,
                     display_name: str | None = None) -> Path:
    """The checked extraction under its older name; the same as ``extract_once``."""
    return extract_once(archive, dest, display_name=display_name, limits=limits)


# ------------------------------------------------------------------ checks
def _parts(m: zipfile.ZipInfo) -> tuple[str, ...]:
    """A member's path as parts; Windows tools write backslashes, so they separate folders too."""
    return PurePosixPath(m.filename.replace("\\", "/")).parts


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _check_sizes(files: list[zipfile.ZipInfo], shown: str, limits: ZipLimits) -> None:
    """Refuse from the directory alone: too many files, too big, a bomb's ratio."""
    if len(files) > limits.max_files:
        raise DataError(f"{shown}: the zip holds {len(files)} files; the limit is {limits.max_files}.")
    total = sum(m.file_size for m in files)
    packed = sum(m.compress_size for m in files) or 1
    if total > limits.max_total_bytes:
        raise DataError(f"{shown}: the zip unpacks to {_size(total)}; the limit is {_size(limits.max_total_bytes)}.")
    if total / packed > limits.max_ratio and total > 10 * 1024**2:
        raise DataError(f"{shown}: the zip's compression ratio is implausible (a zip bomb?); refused.")


def _check_member(m: zipfile.ZipInfo, shown: str) -> None:
    """One entry: a name this system can hold, inside the archive, a plain file, readable."""
    name, parts = m.filename, _parts(m)
    mode = m.external_attr >> 16
    if len(name) > MAX_NAME_CHARS:
        raise DataError(f"{shown}: the entry '{name[:40]}...' has a path too long (more than {MAX_NAME_CHARS} "
                        "characters); shorten it.")
    if any(len(p.encode("utf-8", "surrogateescape")) > MAX_PART_BYTES for p in parts):
        raise DataError(f"{shown}: the entry '{name[:40]}...' has a name too long for this system "
                        f"(at most {MAX_PART_BYTES} bytes per name); shorten it.")
    path = PurePosixPath(name.replace("\\", "/"))
    if (not parts and not m.is_dir()) or path.is_absolute() or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"{shown}: the entry '{name}' points outside the archive; refused.")
    if stat.S_ISLNK(mode):
        raise DataError(f"{shown}: the entry '{name}' is a link; refused.")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise DataError(f"{shown}: the entry '{name}' is a device, pipe or socket, not a file; refused.")
    if m.is_dir():
        return
    if m.flag_bits & 0x1 or m.compress_type == AES_METHOD:
        raise DataError(f"{shown}: '{name}' is encrypted; password-protected zips are not supported. "
                        "Zip the folder again without a password.")
    if m.compress_type not in READABLE_METHODS:
        raise _unsupported(shown, name, m.compress_type)


def _unsupported(shown: str, name: str, method: int) -> DataError:
    what = f"{METHOD_NAMES[method]} compression" if method in METHOD_NAMES else "a compression method"
    return DataError(f"{shown}: '{name}' uses {what} (method {method}), which cannot be read here; "
                     "zip the folder again with standard (deflate) compression.")


def _check_layout(members: list[zipfile.ZipInfo], shown: str) -> list[zipfile.ZipInfo]:
    """The whole tree: no duplicates, no file that is also a folder, class folders with files.

    Returns the members to extract: files outside hidden folders (__MACOSX, .git, dot-files).
    """
    if not members:
        raise DataError(f"{shown}: the zip is empty.")
    files: dict[tuple[str, ...], zipfile.ZipInfo] = {}
    folders: set[tuple[str, ...]] = set()
    for m in members:
        parts = _parts(m)
        folders.update(parts[:i] for i in range(1, len(parts)))
        if m.is_dir():
            folders.add(parts)
        elif parts in files:
            raise DataError(f"{shown}: '{'/'.join(parts)}' appears twice in the zip; make the zip again "
                            "without duplicates.")
        else:
            files[parts] = m
    both = sorted(set(files) & folders)
    if both:
        raise DataError(f"{shown}: '{'/'.join(both[0])}' is both a file and a folder in the zip; rename one of them.")
    if not files:
        raise DataError(f"{shown}: the zip holds only folders, no files.")
    visible = {p: m for p, m in files.items() if not any(is_hidden_name(part) for part in p)}
    if not visible:
        raise DataError(f"{shown}: the zip holds only hidden or system files (such as __MACOSX or .DS_Store), "
                        "no images.")
    if all(p[-1].lower().endswith(ARCHIVE_SUFFIXES) for p in visible):
        inner = "/".join(min(visible))
        raise DataError(f"{shown}: the zip holds only other archives ('{inner}'); unzip it first and use the "
                        "folder of images inside (zips inside a zip are not opened).")
    if all(len(p) == 1 for p in visible) and not any(p[0].lower().endswith(".csv") for p in visible):
        raise DataError(f"{shown}: no class folders: its files are all at the top level; put the images in "
                        "one folder per class (e.g. cats/, dogs/) and zip those folders.")
    return list(visible.values())


# ------------------------------------------------------------------ extraction
def _extract_checked(archive: Path, into: Path, shown: str, limits: ZipLimits) -> None:
    """Every check first, from the zip's directory alone; then unpack the files, counting real bytes."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise DataError(f"{shown}: not a readable zip file (damaged, cut short, or another format); "
                        "make the zip again.") from exc
    with zf:
        members = zf.infolist()
        _check_sizes([m for m in members if not m.is_dir()], shown, limits)
        for m in members:
            _check_member(m, shown)
        todo = _check_layout(members, shown)
        written = 0
        for i, m in enumerate(todo):
            if i == len(todo) // 2:  # crash tests: WORKBENCH_FAULT=kill:.extracted:mid:1 (engine/faults.py)
                fault_point(MARKER, "mid")
            with _unpacking(shown, m):
                target = into.joinpath(*_parts(m))
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "xb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > limits.max_total_bytes:
                            raise DataError(f"{shown}: the zip unpacks to more than it declares; refused.")
                        out.write(chunk)


@contextmanager
def _unpacking(shown: str, m: zipfile.ZipInfo) -> Iterator[None]:
    """What unpacking one member can raise, as the one message the user sees."""
    name = m.filename
    try:
        yield
    except zipfile.BadZipFile as exc:  # zipfile's word for a failed CRC or a broken local header
        what = "fails its checksum (CRC)" if "CRC" in str(exc) else "cannot be read"
        raise DataError(f"{shown}: the zip is damaged: '{name}' {what}; make the zip again.") from exc
    except (EOFError, zlib.error, LZMAError) as exc:
        raise DataError(f"{shown}: the zip is damaged or cut short: '{name}' cannot be unpacked; "
                        "make the zip again.") from exc
    except NotImplementedError as exc:  # a method zipfile knows by number but cannot decompress
        raise _unsupported(shown, name, m.compress_type) from exc
    except RuntimeError as exc:  # zipfile: "... is encrypted" or "... requires the (missing) ... module"
        if "encrypt" in str(exc) or "password" in str(exc):
            raise DataError(f"{shown}: '{name}' is encrypted; password-protected zips are not supported.") from exc
        raise DataError(f"{shown}: '{name}' uses a compression this Python was built without; "
                        "zip the folder again with standard (deflate) compression.") from exc
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise DataError(f"{shown}: the entry '{name[:40]}...' has a name too long for this system; "
                            "shorten it.") from exc
        if exc.errno is None:  # bz2's "Invalid data stream": the data, not the disk
            raise DataError(f"{shown}: the zip is damaged: '{name}' cannot be unpacked; make the zip again.") from exc
        raise  # a disk problem: extract_once words it


# ------------------------------------------------------------------ once, atomically
def _stamp(archive: Path) -> dict[str, int]:
    st = archive.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256(archive: Path) -> str:
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete(dest: Path, archive: Path, stamp: dict[str, int]) -> bool:
    """A published extraction of this very archive (same size and same mtime, or same sha256)."""
    try:
        mark = loads_bounded((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(mark, dict) or mark.get("size") != stamp["size"]:
        return False
    return mark.get("mtime_ns") == stamp["mtime_ns"] or mark.get("sha256") == _sha256(archive)


@contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """Exclusive flock on ``path`` (yields True), or nothing where the OS has no flock (False).

    The lock file is never deleted: deleting it would let two callers lock two different files.
    """
    if fcntl is None:
        yield False
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)


def _leftover_re(dest: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{dest.name}.") + r"(part|old)-[a-z0-9_]{8}")


def _remove_leftovers(dest: Path, min_age_s: float) -> None:
    """Temp and trash folders of dead extractors of ``dest``. Under the lock every one is dead."""
    pattern, now = _leftover_re(dest), time.time()
    for p in dest.parent.iterdir():
        if pattern.fullmatch(p.name):
            try:
                if now - p.lstat().st_mtime >= min_age_s:
                    _delete(p)
            except FileNotFoundError:
                pass


def _publish(tmp: Path, dest: Path, archive: Path, stamp: dict[str, int]) -> None:
    """Rename ``tmp`` to ``dest``; an incomplete or foreign ``dest`` is moved aside first."""
    for _ in range(5):
        try:
            os.rename(tmp, dest)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
        if _is_complete(dest, archive, stamp):
            return  # another extractor published the same archive first: keep theirs
        _discard(dest)
    raise OSError(errno.EEXIST, "the destination keeps being replaced")


def _discard(path: Path) -> None:
    """Move ``path`` aside atomically (no reader ever sees it half deleted), then delete it."""
    trash = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    _delete(trash)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _dataset_root(folder: Path) -> Path:
    """A zip of 'flowers/' holds one top folder: the classes are one level down."""
    entries = [p for p in folder.iterdir() if not is_hidden_name(p.name)]
    if len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if not is_hidden_name(p.name)
                 and (p.is_dir() or p.suffix.lower() == ".csv")]  # class or split folders, a labels CSV
        if inner:
            return entries[0]
    return folder
