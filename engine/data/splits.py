"""Which images train, which validate and which are held out for a test: per-class subsampling and
a stratified split, or the split the data names (train/ val/ test/ folders, a CSV's split column).

One split path (``split_all``) serves training and evaluation, so an evaluation sees exactly the
images its run was validated (or tested) on.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from engine.core.errors import DataError

if TYPE_CHECKING:
    from engine.data.datasets import ImageSet


def subsample_per_class(labels: Sequence[int], per_class: int | None, seed: int = 0) -> list[int]:
    """At most ``per_class`` seeded random indices of every class (all of them when None), sorted."""
    if not per_class:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    keep: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep += rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()
    return sorted(keep)


def stratified_split(labels: Sequence[int], val_fraction: float = 0.2, test_fraction: float = 0.0,
                     seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Per-class shuffled split, same seed -> same split; every class keeps >= 1 training image."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError("Split fractions must be in (0, 1) and sum to less than 1.")
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    train, val, test = [], [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n = len(idx)
        n_val = max(1, int(round(n * val_fraction))) if n >= 2 else 0
        n_test = int(round(n * test_fraction)) if test_fraction else 0
        n_test = min(n_test, max(0, n - n_val - 1))
        val += idx[:n_val].tolist()
        test += idx[n_val:n_val + n_test].tolist()
        train += idx[n_val + n_test:].tolist()
    return sorted(train), sorted(val), sorted(test)


class SplitSettings(Protocol):
    """The settings a split depends on (a TrainConfig has them)."""

    max_per_class: int | None
    val_fraction: float
    test_fraction: float
    split_seed: int


def split_all(ds: ImageSet, config: SplitSettings) -> tuple[list[int], list[int], list[int]]:
    """(train, val, test) indices into ``ds``: the one split a run trains on and is evaluated with.

    A random stratified split of the (per-class capped) images, or, when the data names a split
    (``ds.splits``), that split with ``max_per_class`` applied to each part; without given validation
    images, validation is a stratified share of the given train images (and so is a test share, by
    ``test_fraction``, when no test images are given either).
    """
    given = getattr(ds, "splits", None)
    if given is None:
        keep = subsample_per_class(ds.labels, config.max_per_class, config.split_seed)
        tr, va, te = stratified_split([ds.labels[i] for i in keep], config.val_fraction, config.test_fraction,
                                      config.split_seed)
        return [keep[i] for i in tr], [keep[i] for i in va], [keep[i] for i in te]
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, split in enumerate(given):
        parts[split].append(i)

    def capped(idx: list[int]) -> list[int]:
        return [idx[j] for j in subsample_per_class([ds.labels[i] for i in idx], config.max_per_class,
                                                    config.split_seed)]

    train, val, test = capped(parts["train"]), capped(parts["val"]), capped(parts["test"])
    if not val and train:
        tr, va, te = stratified_split([ds.labels[i] for i in train], config.val_fraction,
                                      0.0 if test else config.test_fraction, config.split_seed)
        train, val, test = [train[i] for i in tr], [train[i] for i in va], test or [train[i] for i in te]
    return train, val, test


def split_indices(ds: ImageSet, config: SplitSettings) -> tuple[list[int], list[int]]:
    """(train, val) indices into ``ds`` (``split_all`` without its held-out test part)."""
    train, val, _ = split_all(ds, config)
    return train, val


def evenly_by_class(indices: list[int], labels: Sequence[int], limit: int) -> list[int]:
    """At most ``limit`` of ``indices``, taken round-robin over classes (every class keeps its share),
    in ascending order."""
    if len(indices) <= limit:
        return indices
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(labels[i], []).append(i)
    picked: list[int] = []
    queues = [iter(v) for v in by_class.values()]
    while len(picked) < limit and queues:
        for q in list(queues):
            nxt = next(q, None)
            if nxt is None:
                queues.remove(q)
            elif len(picked) < limit:
                picked.append(nxt)
    return sorted(picked)
