"""The freezing advisor: data amount x task similarity -> a strategy, with the evidence.

The matrix (CONCEPTS.md section 3):

|             | similar to pretraining             | different task                          |
|-------------|------------------------------------|-----------------------------------------|
| enough data | feature extraction (fine-tune ok)  | fine-tune the whole network             |
| little data | feature extraction (head only)     | risky: last stages, low LR, gradually   |

Similarity can be said by the user or *estimated*: a linear probe on frozen features of a small
sample. If frozen ImageNet features already separate the classes, the task is similar.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from engine.core.errors import EngineError
from engine.data.balance import class_imbalance
from engine.freeze.plan import FreezePlan, is_batchnorm, release_frozen_eval
from engine.models.factory import ModelHandle
from engine.training.feature_cache import extract_features, head_inputs

ENOUGH_PER_CLASS = 100  # images per class from which "enough data" starts
SIMILAR_ABOVE = 0.85  # probe score (0 = chance, 1 = perfect) from which the task counts as similar
DIFFERENT_BELOW = 0.60


@dataclass
class SimilarityEvidence:
    probe_accuracy: float  # cross-validated accuracy of a linear probe on frozen features
    chance: float
    score: float  # (accuracy - chance) / (1 - chance)
    verdict: str  # similar | in between | different
    n_images: int
    n_classes: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def similarity_verdict(score: float) -> str:
    if score >= SIMILAR_ABOVE:
        return "similar"
    if score < DIFFERENT_BELOW:
        return "different"
    return "in between"


def estimate_similarity(
    handle: ModelHandle,
    images: Sequence[Image.Image],
    labels: Sequence[int],
    image_size: int | None = None,
    folds: int = 5,
    seed: int = 0,
) -> SimilarityEvidence:
    """Linear-probe accuracy on frozen backbone features of a small labelled sample."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from engine.data.transforms import eval_transform

    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise EngineError("Similarity needs images of at least two classes.")
    k = int(min(folds, counts.min()))
    if k < 2:
        raise EngineError("Similarity needs at least two images of every class in the sample.")
    feats = extract_features(handle.module, handle.spec.head, list(images),
                             eval_transform(handle.spec, image_size)).numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    accuracy = float(cross_val_score(probe, feats, y, cv=cv).mean())
    chance = float(counts.max() / counts.sum())
    score = max(0.0, (accuracy - chance) / (1 - chance)) if chance < 1 else 0.0
    return SimilarityEvidence(
        probe_accuracy=accuracy, chance=chance, score=score, verdict=similarity_verdict(score),
        n_images=len(y), n_classes=len(classes),
        method=f"logistic-regression probe on frozen '{handle.spec.head}' inputs, {k}-fold CV",
    )


@dataclass
class Advice:
    strategy: str
    plan: dict
    data_amount: str  # enough | little
    similarity: str  # similar | in between | different
    explanation: str
    evidence: dict | None = None
    imbalance: dict | None = None  # engine.data.balance.class_imbalance of the counts, when they were given

    def to_dict(self) -> dict:
        return asdict(self)


def recommend(
    images_per_class: float,
    n_classes: int,
    similarity: str | float | SimilarityEvidence,
    counts: dict[str, int] | None = None,
) -> Advice:
    """Pick a freeze strategy from data amount and task similarity, and say why.

    ``counts`` (training images per class, e.g. the data report's): when the largest class has at least
    ``IMBALANCE_WARN`` times the images of the smallest, the advice says so and suggests ``--balance``.
    """
    if n_classes < 2:
        raise EngineError("A classifier needs at least two classes.")
    evidence = similarity if isinstance(similarity, SimilarityEvidence) else None
    if evidence is not None:
        verdict = evidence.verdict
    elif isinstance(similarity, (int, float)):
        verdict = similarity_verdict(float(similarity))
    else:
        verdict = str(similarity).strip().lower()
        if verdict not in ("similar", "in between", "different"):
            raise EngineError("similarity must be 'similar', 'in between', 'different' or a score 0..1.")
    enough = images_per_class >= ENOUGH_PER_CLASS
    amount = "enough" if enough else "little"
    per = f"{images_per_class:.0f} images per class"
    if verdict == "similar":
        plan = FreezePlan.feature_extraction(head_lr=1e-3)
        why = (f"Pretrained features already fit this task and you have {per}. Train only the new "
               "head (feature extraction): fastest, cannot damage the backbone"
               + (", and fine-tuning would also be fine with this much data." if enough
                  else "; with little data, training more would overfit."))
    elif enough:
        plan = FreezePlan.full(head_lr=1e-3, backbone_lr_ratio=0.3 if verdict == "different" else 0.1)
        why = (f"With {per}, fine-tune the whole network: the task "
               + ("differs from ImageNet, so the backbone's features must adapt. "
                  if verdict == "different" else "is only partly like ImageNet. ")
               + "Pretrained weights still start far ahead of training from scratch; the backbone "
               "gets a smaller learning rate than the new head.")
    else:
        plan = FreezePlan.last(1, head_lr=1e-3, backbone_lr_ratio=0.1,
                               unfreeze_schedule=((2, 2),) if verdict == "different" else ())
        why = (f"Only {per} and a task " + ("unlike" if verdict == "different" else "partly like")
               + " ImageNet: the risky corner. Train the head and the last stage with a low "
               "learning rate" + (", unfreeze one more stage later," if verdict == "different" else "")
               + " and watch validation loss for overfitting.")
    imbalance = class_imbalance(counts) if counts else None
    if imbalance and imbalance["imbalanced"]:
        why += (f" The classes are imbalanced ('{imbalance['largest']}' {imbalance['largest_images']} images, "
                f"'{imbalance['smallest']}' {imbalance['smallest_images']}: {imbalance['ratio']:.1f}:1): balance "
                "the training (--balance weights, or --balance sampler; 'Class balance' on the Training page) "
                "and judge runs by macro-F1 and balanced accuracy, which a missed small class pulls down.")
    return Advice(strategy=plan.strategy, plan=plan.to_dict(), data_amount=amount,
                  similarity=verdict, explanation=why,
                  evidence=evidence.to_dict() if evidence else None, imbalance=imbalance)


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
