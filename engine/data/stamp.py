"""A dataset source's change stamp: the cache key of every cached view of a dataset.

Pages cache what they read from a dataset (its overview, a sample, a feature map); keyed by this
stamp they show a change at once (an image added, a class renamed, a relabel or exclusion decided)
and never re-read a dataset that did not change.
"""
from __future__ import annotations

from pathlib import Path


def source_stamp(source: str | None) -> tuple:
    """What changes when a folder dataset changes (a file added or removed in a class, a class renamed,
    an overrides file written beside it): the folder's and its sub-folders' modification times.

    Cached views of a dataset are keyed by it, so a built dataset shows its new images at once while
    an unchanged one is never re-read. Built-in sources have no folder: only their overrides file counts.
    """
    if not source:
        return ()
    from engine.data.overrides import overrides_stamp

    decided = (("overrides", overrides_stamp(source)),)  # built-ins and zips keep theirs outside any folder
    root = Path(source)
    if not root.is_dir():
        return decided
    stamp = []
    try:
        stamp.append(root.stat().st_mtime_ns)
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.is_symlink():
                stamp.append((child.name, child.stat().st_mtime_ns))
                stamp.extend((f"{child.name}/{g.name}", g.stat().st_mtime_ns) for g in sorted(child.iterdir())
                             if g.is_dir() and not g.is_symlink())
    except OSError:  # a folder removed or renamed while read: what was read still keys the change
        pass
    return tuple(stamp) + decided
