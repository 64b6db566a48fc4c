"""How much memory a training may use: the container's limit, not the host's RAM.

Why the cgroup first: on Streamlit Community Cloud (and in Docker, Kubernetes ...) the process
sees the host's RAM through ``/proc/meminfo`` but is killed at its container's limit, which only
the cgroup files tell. Why an app share: the Streamlit process itself (torch, one cached model,
the session state) lives inside the same limit, so a training started from the app gets what is
left after it.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from engine.core.errors import EngineError

GB = 1_000_000_000
# The Streamlit process with torch, timm and one small cached model, measured with the app open on
# the Training page and then predicting (1.19-1.23 GB RSS in tests/test_browser_shared.py): what a training started from the app leaves to the app.
APP_SHARE = 1_200_000_000
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
# a cgroup v1 "no limit" is a page-rounded 2**63; anything beyond a petabyte is no limit either
_NO_LIMIT = 2**50
MAX_SIZE = 10**18  # an exabyte: a bound, so no figure overflows on its way to bytes

CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_size(text: str | int | float) -> int:
    """'1.5GB', '1500MB', '1.4GiB', '2g' or a plain number of bytes -> bytes (decimal units unless 'i')."""
    shown = _shown_size(text)
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = (float(text) if abs(text) < MAX_SIZE else math.inf), ""  # float(10**400): OverflowError
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text)[:200])
        if not match or match.group(2).lower() not in _UNITS:
            raise EngineError(f"memory size '{shown}' is not understood; write it like 1.5GB, 1500MB or 1.4GiB")
        value, unit = float(match.group(1)), match.group(2).lower()  # 400 nines: inf, never an error here
    if not math.isfinite(value) or value * _UNITS[unit] > MAX_SIZE:
        raise EngineError(f"memory size '{shown}' is beyond any machine (at most {MAX_SIZE // 10**15} PB); write "
                          "it like 1.5GB")
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise EngineError(f"memory size '{shown}' must be more than zero")
    return size


def _shown_size(text: object) -> str:
    """A size as a message may echo it: a 400-digit number is cut, not printed whole."""
    shown = str(text) if not isinstance(text, float) or math.isfinite(text) else repr(text)
    return shown if len(shown) <= 24 else f"{shown[:12]}...({len(shown)} characters)"


def format_size(size: int | float) -> str:
    """Bytes as a person reads them: '1.50 GB', '640 MB'."""
    return f"{size / GB:.2f} GB" if size >= GB else f"{size / 10**6:.0f} MB"


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _NO_LIMIT else None


def _own_cgroup_dirs(root: Path) -> list[Path]:
    """This process's cgroup folders (v2 unified path, v1 memory controller), then the root."""
    dirs = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _id, controllers, rel = line.split(":", 2)
            if controllers in ("", "memory") or "memory" in controllers.split(","):
                for base in (root, root / "memory"):
                    candidate = base / rel.lstrip("/")
                    if candidate.is_dir():
                        dirs.append(candidate)
    except (OSError, ValueError):
        pass
    return list(dict.fromkeys(dirs + [root, root / "memory"]))  # in order, each once


def cgroup_limit(root: Path = CGROUP_ROOT) -> tuple[int, str] | None:
    """(bytes, which file) of the tightest memory limit on this process's cgroup, or None."""
    found: list[tuple[int, str]] = []
    for folder in _own_cgroup_dirs(root):
        for name in ("memory.max", "memory.high", "memory.limit_in_bytes"):
            value = _read_limit(folder / name)
            if value is not None:
                found.append((value, f"cgroup {name}"))
    return min(found) if found else None


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        import psutil

        return int(psutil.virtual_memory().total)


def current_rss() -> int:
    """This process's resident memory now, in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class MemoryBudget:
    """What one training may take (``bytes``), and where the figure comes from (shown in the UI)."""

    bytes: int
    source: str

    def __str__(self) -> str:
        return f"{format_size(self.bytes)} ({self.source})"


def detect_budget(given: str | int | None = None, *, app_share: int = APP_SHARE,
                  root: Path = CGROUP_ROOT) -> MemoryBudget:
    """The user's figure if given; else the container's limit (or total RAM) minus the app's share."""
    if given not in (None, "", "auto"):
        return MemoryBudget(parse_size(given), "as set")
    limit = cgroup_limit(root)
    total, where = limit if limit else (total_ram(), "total RAM")
    budget = max(total - app_share, total // 4)  # a tiny box still gets a quarter of itself
    return MemoryBudget(budget, f"{where} {format_size(total)} minus {format_size(total - budget)} for the app")


_ALLOCATOR_TUNED = False


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
TUNED_MMAP_THRESHOLD = 32 * 2**20


def _mallopt():
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to serve tensors of up to 32 MB from its heap and to keep what a step frees
    for the next step, instead of handing it back to the kernel and faulting it in again.

    Why: a training step allocates and frees the same activation sizes again and again. With glibc's
    defaults most of them are fresh ``mmap`` regions, each page zeroed by the kernel on first touch.
    Measured (efficientnet_lite0, 224 px, micro-batches of 6, 2 cores): page faults 1.7 M -> 0.6 M,
    23.5 -> 26.2 img/s, and a *lower* peak (1.60 -> 1.49 GiB) because sizes are reused, not
    re-mapped. A training process only: freed memory stays with it until it ends. False where the
    C library is not glibc (macOS, musl) - nothing changes there.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_arena_max = -1, -2, -8
    # one heap for every thread: kept as the main heap is, a thread's own heap (glibc gives each thread one
    # up to 8 x cores) would keep its peak apart. The feature pass's read-ahead thread (engine/data/ahead.py)
    # decoding 680 photos: a peak of 1.33-1.38 GB with a heap of its own, 1.11-1.17 GB sharing one
    _ALLOCATOR_TUNED = bool(mallopt(M_MMAP_THRESHOLD, TUNED_MMAP_THRESHOLD) and mallopt(m_trim_threshold, 2**31 - 1)
                            and mallopt(m_top_pad, 64 * 2**20) and mallopt(m_arena_max, 1))
    return _ALLOCATOR_TUNED


@contextlib.contextmanager
def large_buffers_mapped(threshold: int = 256 * 2**10) -> Iterator[None]:
    """Within: buffers from ``threshold`` up are the kernel's pages (mmap), handed back when freed; after:
    the training's setting again (reuse_freed_memory). Nothing changes where it was not made.

    Why: a frozen pass decodes and frees a batch of image tensors per step while its outputs stay; in a heap
    that never gives memory back, those two interleave and the heap only grows. Measured on the feature pass
    of 2,000 photos at 224 px (efficientnet_lite0, 2 cores): +660-960 MB over the pass with ONNX Runtime or
    a read-ahead thread, +16-80 MB within this; the pass is no slower.
    """
    mallopt = _mallopt() if _ALLOCATOR_TUNED else None
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, TUNED_MMAP_THRESHOLD)


# What one inference slice may hold in activations. Inference keeps only the tensors a layer is
# working on, so small slices lose nothing: measured on 2 cores, evaluating efficientnet_lite0 at
# 224 px on 400 photos (model load included), slices of 8 ran 32 img/s at a 1.05 GiB peak, slices of
# 64 ran 22 img/s at 1.74 GiB.
INFERENCE_SLICE_BYTES = 250_000_000
_inference_batches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_batch(model, input_shape: tuple[int, ...], cap: int = 64) -> int:
    """Images per inference forward for ``model`` at ``input_shape``: as many as keep the largest
    layer's input + output (x3, for what else is alive) within INFERENCE_SLICE_BYTES, 1..cap.

    Measured by one forward of one image with hooks on the leaf modules, in eval mode; remembered
    per model and shape.
    """
    import torch

    known = _inference_batches.setdefault(model, {})
    if (tuple(input_shape), cap) in known:
        return known[(tuple(input_shape), cap)]

    from engine.core.modes import evaluating

    largest = [0]

    def hook(_m, inputs, output) -> None:
        size = sum(t.numel() * t.element_size() for t in (*inputs, output) if isinstance(t, torch.Tensor))
        largest[0] = max(largest[0], size)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with evaluating(model):  # the model's lock: the hooks see this forward only
        handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
        try:
            with torch.inference_mode():
                model(torch.zeros(1, *input_shape, device=device))
        finally:
            for h in handles:
                h.remove()
    known[(tuple(input_shape), cap)] = n = max(1, min(cap, INFERENCE_SLICE_BYTES // max(1, 3 * largest[0])))
    return n
