"""Which images train and which validate: per-class subsampling and a stratified split.

One split path serves training and evaluation, so an evaluation sees exactly the images
its run was validated on.
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


def split_indices(ds: ImageSet, config: SplitSettings) -> tuple[list[int], list[int]]:
    """(train, val) indices into ``ds``: the one split a run trains on and is evaluated with."""
    keep = subsample_per_class(ds.labels, config.max_per_class, config.split_seed)
    tr, va, _ = stratified_split([ds.labels[i] for i in keep], config.val_fraction, config.test_fraction,
                                 config.split_seed)
    return [keep[i] for i in tr], [keep[i] for i in va]
