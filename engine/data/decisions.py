"""Taking decisions about single images (relabel, exclude, restore, undo), checked against the data.

The file, its place and how it is applied are engine.data.overrides; a decision must name one of the
data's own images, and a relabel one of its classes, so deciding reads the data as delivered (which
is why this is a module above engine.data.datasets, not part of the file format below it).
"""
from __future__ import annotations

import time

from engine.core.errors import DataError
from engine.data.datasets import ImageSet, load_source
from engine.data.overrides import (
    ACTIONS,
    Decision,
    Overrides,
    decisions_lock,
    image_key,
    overrides_path,
    read_file,
    write_file,
)


def _raw_set(source: str) -> ImageSet:
    """The data as delivered (no decisions applied), read without decoding every image: a decision
    is one click, and decoding a 2,000-photo zip took 1.2 s of it."""
    return load_source(source, overrides=Overrides(), verify=False)


def _known_image(ds: ImageSet, image: str) -> str:
    """The key of ``image`` (its name inside the dataset, or the full path a gallery showed), or a DataError."""
    keys = [image_key(ds, i) for i in range(len(ds))]
    if image in keys:
        return image
    for i, src in enumerate(ds.sources):
        if src == image:
            return keys[i]
    shown = image if len(image) <= 80 else image[:77] + "..."
    example = f" (e.g. {keys[0]})" if keys else ""
    raise DataError(f"'{shown}' is not an image of {ds.name}: name it by its path inside the dataset{example}.")


def decide(source: str, image: str, action: str, label: str | None = None) -> Decision:
    """Record one decision about one image of ``source`` and return it. The image must be one of the
    data's own images and a relabel must name one of its classes (new classes are not made here: a
    class needs images to train on; make its folder)."""
    if action not in ACTIONS:
        raise DataError(f"Unknown decision '{action}': use {', '.join(ACTIONS)}.")
    ds = _raw_set(source)
    key = _known_image(ds, image)
    if action == "relabel":
        if label not in ds.class_names:
            shown = ", ".join(ds.class_names[:10]) + (" ..." if len(ds.class_names) > 10 else "")
            raise DataError(f"'{str(label)[:40]}' is not a class of {ds.name} (its classes: {shown}); an image can "
                            "only be relabelled as an existing class.")
    else:
        label = None
    decision = Decision(image=key, action=action, label=label,
                        at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    path = overrides_path(source)
    with decisions_lock(path):  # two sessions deciding at once: both decisions kept, in order
        current = read_file(path)
        current.decisions.append(decision)
        write_file(path, current)
    return decision


def relabel(source: str, image: str, label: str) -> Decision:
    return decide(source, image, "relabel", label)


def exclude(source: str, image: str) -> Decision:
    return decide(source, image, "exclude")


def restore(source: str, image: str) -> Decision:
    return decide(source, image, "restore")


def current(source: str) -> Overrides:
    """The decisions about ``source``, which must be data the workbench reads (a built-in set, a dataset
    folder or a zip): '' would be the current folder's file, a folder that is no dataset someone's."""
    _raw_set(source)
    return read_file(overrides_path(source))


def undo(source: str) -> Decision | None:
    """Take back the last decision (None: there was none)."""
    _raw_set(source)  # data the workbench reads, as ``current`` says
    path = overrides_path(source)
    with decisions_lock(path):
        current = read_file(path)
        if not current.decisions:
            return None
        last = current.decisions.pop()
        write_file(path, current)
    return last
