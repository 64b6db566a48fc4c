"""Files written so a crash never corrupts them: atomic replace, tolerant reads, a file lock.

A reader (or a kill) sees the old file or the new one, never a mix.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from engine.core.faults import fault_point


def _new_temp(path: Path) -> tuple[int, str]:
    """A new temp file beside ``path`` with the permissions a rewrite keeps: the file's own, or, for a
    new file, what open() gives (mode 0666 less the umask, applied by the kernel). mkstemp's are
    private: a dataset's overrides file turned unreadable to the rest of a team."""
    try:
        keep: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        keep = None
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if keep is not None:
            os.fchmod(fd, keep)
        return fd, str(tmp)
    raise FileExistsError(f"no free temp name beside {path}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target.

    A reader (or a crash) sees the old file or the new one, never a mix. A failed write (full
    disk) removes its temp file and leaves the old target as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(path)
    fault_point(path.name, "before")
    fd, tmp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            half = len(data) // 2
            fh.write(data[:half])
            fh.flush()
            fault_point(path.name, "mid")
            fh.write(data[half:])
            fh.flush()
            os.fsync(fh.fileno())
        fault_point(path.name, "before-rename")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fault_point(path.name, "after")


def _sweep_stale_temps(path: Path, older_than_s: float = 120.0) -> None:
    """Temp files left by a killed writer of ``path`` (old enough not to be in flight)."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:
            pass


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def is_plain_file(path: Path) -> bool:
    """A regular file, not a link, pipe, device or folder: what may be opened and read to its end
    (reading a FIFO blocks until someone writes to it: forever)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# What any JSON read from a file, an upload or a run may hold. Python's parser recurses once per
# nesting level (100,000 levels: RecursionError) and reads 1e999 as inf and 400 nines as a 400-digit
# int (OverflowError wherever either becomes a float or an int of fixed size). No file the workbench
# writes nests beyond a dozen levels or holds a number outside a 64-bit integer.
MAX_JSON_DEPTH = 64
MAX_JSON_INT = 2**63
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


class JsonBoundsError(ValueError):
    """JSON too deep, or a number out of range: refused before (or while) it is parsed."""


def _depth_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than ``limit``: counted, not parsed (cheap: most
    files have fewer brackets than the limit; the rest are summed by numpy, not a Python loop)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    import numpy as np

    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub('""', text)).encode("ascii")
    steps = np.where(np.frombuffer(brackets, dtype=np.uint8) <= ord("["), 1, -1)  # '[' 91, '{' 123: only '[' <= 91
    steps[np.frombuffer(brackets, dtype=np.uint8) == ord("{")] = 1
    return bool(steps.size) and int(np.cumsum(steps).max()) > limit


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19 or abs(value := int(text)) >= MAX_JSON_INT:
        raise JsonBoundsError(f"the number {text[:12]}{'...' if len(text) > 12 else ''} is out of range "
                              f"(at most {MAX_JSON_INT:.2g} in size)")
    return value


def _bounded_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonBoundsError(f"the number {text[:12]}{'...' if len(text) > 12 else ''} is out of range "
                              "(too large to be a finite number)")
    return value


def loads_bounded(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for untrusted text: nesting deeper than ``max_depth`` or a number outside a 64-bit
    integer / a finite float raises JsonBoundsError (a ValueError, as malformed JSON does), never
    RecursionError or a later OverflowError. NaN and Infinity written as such stay readable: the
    workbench's own files use them for a diverged loss."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    if _depth_exceeds(text, max_depth):
        raise JsonBoundsError(f"it nests deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_int=_bounded_int, parse_float=_bounded_float)
    except RecursionError:  # a bracket hidden from the pre-check (it cannot be, but never a traceback)
        raise JsonBoundsError(f"it nests deeper than {max_depth} levels") from None


def parse_json(text: str | bytes, what: str) -> Any:
    """JSON from an untrusted source as one line a person can act on: ``what`` names the file or the
    setting (e.g. "the overrides file faces.json")."""
    from engine.core.errors import EngineError

    try:
        return loads_bounded(text)
    except JsonBoundsError as exc:
        raise EngineError(f"{what} is refused: {exc}.") from None
    except UnicodeDecodeError:
        raise EngineError(f"{what} is not UTF-8 text.") from None
    except ValueError as exc:
        raise EngineError(f"{what} is not valid JSON ({getattr(exc, 'msg', exc)}).") from None


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in a plain file, else ``default`` (missing, unreadable, not JSON, too deep, a number out of
    range, or not a plain file)."""
    if not is_plain_file(path):
        return default
    try:
        return loads_bounded(path.read_text())
    except (OSError, ValueError):
        return default


class file_lock:
    """``with file_lock(path):`` an exclusive flock on a small lock file (blocking, short holds only)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+")
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()


def resolves_inside(path: Path, root_real: str) -> bool:
    """Whether ``path`` resolves (every link followed, loops included) to ``root_real`` or below it."""
    real = os.path.realpath(path)  # never raises on loops, unlike Path.resolve on Python 3.11
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def check_output_file(target: Path, runs_folder: Path) -> None:
    """A file an export is about to write: new, or a plain file to replace. Never a link, device or pipe
    (the atomic rename would replace the node itself: ``-o /dev/null`` run as root), and never inside the
    runs folder (``-o RUN/best.safetensors`` destroyed the run it exported)."""
    from engine.core.errors import EngineError

    if os.path.lexists(target) and not is_plain_file(target):
        raise EngineError(f"{target} exists and is not a plain file (a folder, link, device or pipe); name a new "
                          "file to write.")
    if resolves_inside(target.parent, os.path.realpath(runs_folder)):
        raise EngineError(f"{target} is inside the runs folder ({runs_folder}); write exports outside it, where "
                          "they cannot overwrite a run's own files.")
