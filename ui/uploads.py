"""Uploads stored under the data folder by content hash, written atomically.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def save_upload(data: bytes, name: str, folder: str) -> Path:
    """Store an upload under the data directory by content hash (same file -> same path)."""
    import os
    import tempfile

    from engine.core.paths import data_root

    digest = hashlib.sha256(data).hexdigest()[:12]
    safe = "".join(ch for ch in Path(name).name if ch.isalnum() or ch in "._-")[-100:] or "upload"  # end: suffix
    target = data_root() / "uploads" / folder / f"{digest}_{safe}"
    if not (target.is_file() and target.stat().st_size == len(data)):  # a torn copy (old code, crash) is redone
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)  # atomic: two users uploading the same file never see half of it
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target
