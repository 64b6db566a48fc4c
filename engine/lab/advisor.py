"""The freezing advisor on images: task similarity estimated by a linear probe on the frozen features of
a small labelled sample (if frozen ImageNet features already separate the classes, the task is similar),
and the BatchNorm train/eval gap. The data amount x similarity matrix itself is engine/training/advice.py
(CONCEPTS.md section 3), re-exported here for the pages.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from engine.core.errors import EngineError
from engine.freeze.plan import is_batchnorm, release_frozen_eval
from engine.models.factory import ModelHandle
from engine.training.advice import (  # noqa: F401 - the advisor's matrix, where the app and tests look for it
    DIFFERENT_BELOW,
    ENOUGH_PER_CLASS,
    SIMILAR_ABOVE,
    Advice,
    SimilarityEvidence,
    probe_accuracy,
    recommend,
    similarity_from_features,
    similarity_verdict,
)
from engine.training.feature_cache import extract_features, head_inputs


def estimate_similarity(
    handle: ModelHandle,
    images: Sequence[Image.Image],
    labels: Sequence[int],
    image_size: int | None = None,
    folds: int = 5,
    seed: int = 0,
) -> SimilarityEvidence:
    """Linear-probe accuracy on frozen backbone features of a small labelled sample."""
    from engine.data.transforms import eval_transform

    if len(np.unique(np.asarray(labels))) < 2:
        raise EngineError("Similarity needs images of at least two classes.")
    feats = extract_features(handle.module, handle.spec.head, list(images),
                             eval_transform(handle.spec, image_size)).numpy()
    return similarity_from_features(feats, labels, handle.spec.head, folds=folds, seed=seed)


@dataclass
class BatchNormGap:
    """How much features differ when BatchNorm runs in train mode instead of eval mode."""

    max_abs: float
    mean_abs: float
    relative: float  # mean |train - eval| / mean |eval|
    bn_layers: int

    def to_dict(self) -> dict:
        return asdict(self)


def batchnorm_train_eval_gap(handle: ModelHandle, batch: torch.Tensor) -> BatchNormGap:
    """Backbone features of one batch in train vs eval mode, computed on a copy.

    This is the number behind the classic pitfall: a "frozen" backbone left in train mode
    normalises with batch statistics, so its features are not the pretrained ones.
    """
    model = copy.deepcopy(handle.module)  # train mode would move the original's running stats
    bn_layers = sum(1 for m in model.modules() if is_batchnorm(m))
    with torch.no_grad():
        model.eval()
        eval_feats = head_inputs(model, handle.spec.head, batch)
        release_frozen_eval(model)  # measure plain train mode, whatever plan the original has
        model.train()
        train_feats = head_inputs(model, handle.spec.head, batch)
    diff = (train_feats - eval_feats).abs()
    scale = eval_feats.abs().mean().item() or 1.0
    return BatchNormGap(max_abs=diff.max().item(), mean_abs=diff.mean().item(),
                        relative=diff.mean().item() / scale, bn_layers=bn_layers)
