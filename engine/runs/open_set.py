"""A run's open-set rule: when an image is none of the run's classes.

A classifier trained on a few classes calls any photo one of them, often with high confidence (a digits
model said "8, 97%" for the astronaut). The rule here is a stated choice, measured in docs/open-set.md:

    the distance of an image to its k-th nearest training image, in the features the head sees
    (cosine distance of L2-normalised head inputs; Sun et al. 2022, "Out-of-Distribution Detection with
    Deep Nearest Neighbors"); "unknown" above a threshold set on the run's own validation images, the
    ``quantile`` of their distances (0.95: about 5% of held-out images of known classes are flagged).

Why this rule and not the calibrated top probability: on a digits model both flag few held-out digits
(2% and 0%), but natural photos were flagged 100% by the distance and 11.5% by the probability, thresholded
the same way (bench/open_set.py, docs/open-set.md). The probability only says which known class an image
is most like; the distance says whether it is like any of them.

The rule needs its training features (the "bank": at most ``BANK_LIMIT`` training images, every class
keeping its share), kept beside the checkpoint in ``open-set.safetensors`` with the threshold in the
file's metadata, and recorded with the calibration (status.json ``calibration.unknown_threshold`` and
``calibration.open_set``). The bank belongs to one best epoch: a later best makes it stale (not used).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.runs.status import MAX_DISTANCE

if TYPE_CHECKING:
    from engine.runs.store import RunDir

OPEN_SET_FILE = "open-set.safetensors"
RULE = "knn-cosine"
RULE_TEXT = "distance to the k-th nearest training image in the head's input features"
BANK_LIMIT = 300  # training images kept: 300 x 1280 features of efficientnet_lite0 are 1.5 MB in float32; one
# inference pass over them ends every run that did not cache its features (about 5% of a 2000-image training
# epoch: forwards only, 15% of the images); the measured figures (docs/open-set.md) used banks of 120-300

QUANTILE = 0.95
MAX_FILE_BYTES = 64 * 1024**2  # a bank this engine writes is a few MB; a bigger file (a bundle from elsewhere) is no rule


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.detach().float().cpu(), dim=1)


def knn_distance(bank: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """Cosine distance of each row of ``features`` to its k-th nearest row of ``bank`` (unit rows),
    in slices so a large query never holds a (queries x bank) matrix of more than a few MB."""
    query = unit_rows(features)
    k = max(1, min(k, bank.shape[0]))
    out = []
    for start in range(0, query.shape[0], 256):
        similarity = query[start:start + 256] @ bank.T
        out.append((1.0 - similarity.topk(k, dim=1).values[:, -1]).clamp(0.0, MAX_DISTANCE))  # float error
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class OpenSetRule:
    """What deciding "unknown" needs: the bank (unit rows), its labels, k and the threshold."""

    bank: torch.Tensor
    labels: torch.Tensor
    k: int
    threshold: float
    quantile: float = QUANTILE
    epoch: int | None = None  # the best epoch whose features the bank holds

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Each image's distance (higher: less like any training image)."""
        return knn_distance(self.bank, features, self.k)

    def unknown(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold

    def summary(self) -> dict[str, Any]:
        """What the calibration record keeps of the rule (the bank itself stays in its file)."""
        return {"rule": RULE, "text": RULE_TEXT, "k": self.k, "quantile": self.quantile,
                "images": int(self.bank.shape[0]), "dims": int(self.bank.shape[1]) if self.bank.ndim == 2 else 0}


def save_open_set(run: RunDir, rule: OpenSetRule) -> Path:
    """The bank and its rule beside the checkpoint, written whole or not at all."""
    from safetensors.torch import save

    from engine.core.files import atomic_write_bytes

    path = run.path / OPEN_SET_FILE
    meta = {"rule": RULE, "k": str(rule.k), "threshold": repr(rule.threshold), "quantile": repr(rule.quantile),
            "epoch": json.dumps(rule.epoch)}
    atomic_write_bytes(path, save({"bank": rule.bank.contiguous().float(), "labels": rule.labels.long().contiguous()},
                                  metadata=meta))
    return path


def load_open_set(path: Path, num_classes: int | None = None) -> OpenSetRule | None:
    """The rule in ``path``, or None when it is missing or not a rule this engine wrote (wrong shapes,
    non-finite numbers, labels outside the classes): a damaged file turns the rule off, never a prediction."""
    from safetensors import safe_open

    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            bank, labels = f.get_tensor("bank"), f.get_tensor("labels")
        k, threshold = int(meta["k"]), float(meta["threshold"])
        quantile, epoch = float(meta.get("quantile", QUANTILE)), json.loads(meta.get("epoch", "null"))
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: no rule
        return None
    if meta.get("rule") != RULE or bank.ndim != 2 or labels.ndim != 1 or bank.shape[0] != labels.shape[0] \
            or not bank.shape[0] or not 1 <= k <= bank.shape[0] or not math.isfinite(threshold) \
            or not 0.0 <= threshold <= MAX_DISTANCE or not bool(torch.isfinite(bank).all()) \
            or (num_classes is not None and bool(((labels < 0) | (labels >= num_classes)).any())) \
            or not (epoch is None or isinstance(epoch, int)):
        return None
    return OpenSetRule(bank=unit_rows(bank), labels=labels.long(), k=k, threshold=threshold, quantile=quantile,
                       epoch=epoch)


def run_open_set(run: RunDir, num_classes: int | None = None) -> OpenSetRule | None:
    """The run's rule for its current best checkpoint, or None: never fitted, damaged, or of an earlier best."""
    rule = load_open_set(run.path / OPEN_SET_FILE, num_classes)
    if rule is None:
        return None
    best = run.checkpoint_meta("best") or {}
    return rule if rule.epoch in (None, best.get("epoch")) else None
