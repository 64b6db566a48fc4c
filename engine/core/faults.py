"""Fault injection for crash-consistency tests: kill -9 or a full disk at a named write point.

Off unless ``WORKBENCH_FAULT`` is set, e.g. ``kill:last_state.pt:before-rename:2`` (SIGKILL this
process the 2nd time last_state.pt reaches the point just before its atomic rename) or
``enospc:last.safetensors:before:1`` (that write fails as if the disk were full). Points: ``before``
(nothing written yet), ``mid`` (half the bytes written), ``before-rename`` (temp file complete),
``after`` (target replaced). Writers call ``fault_point``; it costs one dict lookup when off.
"""
from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_hits: Counter = Counter()


def _spec() -> tuple[str, str, str, int] | None:
    raw = os.environ.get("WORKBENCH_FAULT", "")
    if not raw:
        return None
    parts = raw.split(":")
    kind, target, point = parts[0], parts[1], parts[2] if len(parts) > 2 else "before"
    nth = int(parts[3]) if len(parts) > 3 else 1
    return kind, target, point, nth


def fault_point(file_name: str, point: str) -> None:
    """Called by writers at each point; acts only when the spec names this file and point."""
    spec = _spec()
    if spec is None:
        return
    kind, target, want, nth = spec
    if file_name != target or point != want:
        return
    _hits[(file_name, point)] += 1
    if _hits[(file_name, point)] != nth:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device", file_name)
