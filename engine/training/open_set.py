"""Fitting a run's open-set rule at the end of a finished run (the rule itself, its file and why this
rule: engine/runs/open_set.py).

The bank is the head-input features of at most ``BANK_LIMIT`` training images (every class keeping its
share) through the eval transform, never the augmented training view; the threshold is the ``QUANTILE``
of the validation images' distances to it, so about 5% of held-out images of known classes read
"unknown" by construction, whatever the data.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from engine.data.datasets import TransformDataset
from engine.data.splits import evenly_by_class
from engine.runs.open_set import BANK_LIMIT, QUANTILE, OpenSetRule, knn_distance, save_open_set, unit_rows
from engine.training.epoch import evaluate_scores

if TYPE_CHECKING:
    from engine.runs.store import RunDir
    from engine.training.setup import Prepared
    from engine.training.trainer import Trainer

K = 1  # the nearest training image: own-photo sets have a handful per class (bench/open_set.py compares k)


def bank_picks(candidates: list[int], labels) -> list[int]:
    """Which of ``candidates`` (indices into ``labels``) make the bank: at most ``BANK_LIMIT``, every
    class keeping its share."""
    return evenly_by_class(candidates, labels, BANK_LIMIT)


def record_open_set(run: RunDir, record: dict[str, Any], bank_features: torch.Tensor, bank_labels: torch.Tensor,
                    val_features: torch.Tensor, epoch: int | None) -> None:
    """Fit the rule, save its file beside the checkpoint and add it to the calibration ``record``
    (nothing when there is nothing to set a threshold on): the end of a run and ``calibrate`` alike."""
    rule = fit_open_set(bank_features, bank_labels, val_features, epoch=epoch)
    if rule is not None:
        save_open_set(run, rule)
        record.update(unknown_threshold=rule.threshold, open_set=rule.summary())


def fit_open_set(bank_features: torch.Tensor, bank_labels: torch.Tensor, val_features: torch.Tensor, *,
                 k: int = K, quantile: float = QUANTILE, epoch: int | None = None) -> OpenSetRule | None:
    """The rule for this bank, its threshold set on ``val_features`` (held-out images of the run's own
    classes). None without a bank or validation images (nothing to set a threshold on)."""
    if not len(bank_features) or not len(val_features):
        return None
    bank = unit_rows(bank_features)
    k = max(1, min(k, bank.shape[0]))
    distances = knn_distance(bank, val_features, k).double()
    threshold = float(torch.quantile(distances, quantile))
    return OpenSetRule(bank=bank, labels=bank_labels.long().cpu(), k=k, threshold=threshold, quantile=quantile,
                       epoch=epoch)


def bank_features(prep: Prepared, runner: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of the bank's training images, as the model now in ``runner`` sees them."""
    train = prep.train_ds
    picked = bank_picks(list(train.indices), train.ds.labels)
    dataset = TransformDataset(train.ds, picked, prep.val_ds.transform)
    loader = DataLoader(dataset, shuffle=False, batch_size=runner.batches.micro_batch, num_workers=0)
    outputs = evaluate_scores(runner.module, loader, runner.device, runner.dtype, runner.channels_last, keep=True,
                              head=prep.handle.spec.head).outputs
    keep = [p for p in range(len(picked)) if p not in dataset.substituted]  # stand-ins of broken files
    return outputs.features[keep], outputs.labels[keep]
