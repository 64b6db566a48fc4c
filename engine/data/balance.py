"""Class imbalance: how uneven the classes are, and the two ways a run can even them out.

A run's ``balance`` setting (TrainConfig) is one of:

- ``none``: every training image counts once (the plain mean cross-entropy).
- ``weights``: class-weighted cross-entropy on the training loss. The weight of class ``c`` is its
  inverse frequency in the TRAINING split, normalised to mean 1 over the classes that have training
  images::

      w_c = (1 / n_c) / ((1 / K) * sum_k (1 / n_k))

  (``n_c`` training images of class ``c``, ``K`` classes with n_k > 0; a class without training
  images gets weight 0). The validation loss stays the plain mean, so its curve stays comparable
  between balanced and unbalanced runs.
- ``sampler``: a ``WeightedRandomSampler`` over the training split (with replacement) that draws each
  class equally often in expectation: image ``i`` has weight ``1 / n_{y_i}``. An epoch draws as many
  samples as the split has images; the sampler draws from the run's generator, which is seeded per
  epoch, so a seeded run is reproducible (and a resumed one draws the same batches).

The standalone script (engine/outputs/script_template.py) has the same two functions, line for line.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import WeightedRandomSampler

BALANCE_CHOICES = ("none", "weights", "sampler")
IMBALANCE_WARN = 3.0  # largest/smallest class ratio from which the data report warns


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse class frequency of ``labels`` normalised to mean 1 over the classes present (float32)."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).double()
    present = counts > 0
    inverse = torch.where(present, 1.0 / counts.clamp_min(1.0), torch.zeros_like(counts))
    return (inverse / inverse[present].mean()).float()


def balanced_sampler(labels: Sequence[int], generator: torch.Generator) -> WeightedRandomSampler:
    """Draw each class equally often: image i has weight 1 / (training images of its class);
    len(labels) draws per epoch, with replacement, from ``generator``."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    counts = torch.bincount(y).double()
    return WeightedRandomSampler(1.0 / counts[y], num_samples=len(y), replacement=True, generator=generator)


def class_imbalance(counts: dict[str, int]) -> dict[str, Any] | None:
    """The largest and smallest class (of those with images) and their ratio; None with fewer than
    two classes that have images."""
    populated = {c: n for c, n in counts.items() if n > 0}
    if len(populated) < 2:
        return None
    largest = max(populated, key=lambda c: populated[c])
    smallest = min(populated, key=lambda c: populated[c])
    return {"ratio": populated[largest] / populated[smallest], "largest": largest,
            "largest_images": populated[largest], "smallest": smallest, "smallest_images": populated[smallest],
            "threshold": IMBALANCE_WARN, "imbalanced": populated[largest] / populated[smallest] >= IMBALANCE_WARN}
