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


def upload_limit_mb() -> int:
    """The builder's per-image limit in MB (engine.data.builder.BuilderLimits), for ``st.file_uploader``'s
    ``max_upload_size``: the uploader then says "Limit 25MB per file", the limit that holds, where it said
    the server's 100MB (.streamlit/config.toml) and a 30 MB photo was refused only after its upload."""
    from engine.data.builder import BuilderLimits

    return max(1, BuilderLimits().max_file_bytes // 1024**2)


def upload_help() -> str:
    """What the builder's uploader accepts, said in its tooltip."""
    from engine.data.builder import BuilderLimits

    limits = BuilderLimits()
    return (f"JPEG, PNG, WebP, BMP, GIF or TIFF, up to {upload_limit_mb()} MB each; a dataset holds at most "
            f"{limits.max_images:,} images and {limits.max_total_bytes / 1024**3:.0f} GB.")
