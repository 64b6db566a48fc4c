"""Where the workbench keeps runs and user data (overridable by environment variables).

The app only ever reads user-given paths inside ``data_root()``: ``resolve_data_path`` refuses
anything that escapes it (``..``, absolute paths elsewhere, symlinks pointing out).
"""
from __future__ import annotations

import os
from pathlib import Path

from engine.core.errors import EngineError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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


def machine_cache_dir() -> Path:
    """What the engine measured about this machine and keeps for the next run (the CPU precision probe):
    per machine and user, not per runs folder."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "transfer-workbench"))


def resolve_data_path(user_path: str, root: Path | None = None) -> Path:
    """A path typed by a user, resolved inside the data directory or refused.

    Links are followed before the check, so ``..``, an absolute path elsewhere and a link pointing
    out are all refused; an empty name would be the data folder itself and is refused too. The
    message does not show the server's data folder.
    """
    if not isinstance(user_path, str) or not user_path.strip():
        raise EngineError("No folder given: pick a folder inside the data folder.")
    if "\0" in user_path:
        raise EngineError("That folder name is not valid.")
    base = (root or data_root()).resolve()
    try:
        candidate = Path(os.path.realpath(base / user_path))  # a link loop resolves without raising
    except (OSError, ValueError) as exc:
        raise EngineError(f"'{user_path}' cannot be used ({exc.__class__.__name__}).") from exc
    if candidate != base and base not in candidate.parents:
        raise EngineError(f"'{user_path}' is outside the data folder; only folders inside it can be used.")
    return candidate
