"""Where the workbench keeps runs and user data (overridable by environment variables).

The app only ever reads user-given paths inside ``data_root()``: ``resolve_data_path`` refuses
anything that escapes it (``..``, absolute paths elsewhere, symlinks pointing out).
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.errors import EngineError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def runs_root() -> Path:
    return Path(os.environ.get("WORKBENCH_RUNS", PROJECT_ROOT / "runs"))


def data_root() -> Path:
    return Path(os.environ.get("WORKBENCH_DATA", PROJECT_ROOT / "data"))


def lock_dir() -> Path:
    """Machine-wide locks (one training per device), shared by every runs folder and user.

    Not under a runs folder: two ``--out`` folders on one machine still share one CPU/GPU.
    """
    import tempfile

    return Path(os.environ.get("WORKBENCH_LOCKS", Path(tempfile.gettempdir()) / "transfer-workbench-locks"))


def resolve_data_path(user_path: str, root: Path | None = None) -> Path:
    """A path typed by a user, resolved inside the data directory or refused."""
    base = (root or data_root()).resolve()
    candidate = (base / user_path).resolve()
    if candidate != base and base not in candidate.parents:
        raise EngineError(f"'{user_path}' is outside the data folder {base}; only folders inside it can be used.")
    return candidate
