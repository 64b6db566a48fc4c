"""The freezing advisor's matrix: data amount x task similarity -> a strategy, with the evidence.

The matrix (CONCEPTS.md section 3):

|             | similar to pretraining             | different task                          |
|-------------|------------------------------------|-----------------------------------------|
| enough data | feature extraction (fine-tune ok)  | fine-tune the whole network             |
| little data | feature extraction (head only)     | risky: last stages, low LR, gradually   |

Similarity can be said by the user or *estimated*: a linear probe on frozen features of a small
sample. If frozen ImageNet features already separate the classes, the task is similar.

Here: the matrix (``recommend``) and the probe on features already computed; engine/lab/advisor.py
computes them from images for the Model page, engine/training/auto_plan.py from a run's sample.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from engine.core.errors import EngineError
from engine.data.balance import class_imbalance
from engine.freeze.plan import FreezePlan

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


PROBE_C = 0.5  # inverse L2 strength, as scikit-learn's LogisticRegression(C=0.5) spells it


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Accuracy on (test_x, test_y) of a standardised, L2-regularised multinomial logistic regression fit
    to (train_x, train_y): scikit-learn's ``LogisticRegression(C=PROBE_C)`` objective (the sum of the
    log-losses + ||W||^2 / 2C), solved by L-BFGS in torch. Why not scikit-learn: importing it costs a
    training process 1.7 s, and its solver took 0.3-0.6 s on 160 x 1280 features where this takes
    0.1-0.2 s, before the first epoch of an automatic plan (engine/training/auto_plan.py)."""
    import torch

    x = torch.as_tensor(train_x, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    x = (x - mean) / std
    classes, y = np.unique(np.asarray(train_y), return_inverse=True)
    target, n = torch.as_tensor(y), len(y)
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    solver = torch.optim.LBFGS([weight, bias], lr=1, max_iter=200, tolerance_grad=1e-5,
                               line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        solver.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, target) + (weight ** 2).sum() / (2 * PROBE_C * n)
        loss.backward()
        return loss

    solver.step(objective)
    with torch.no_grad():
        test = (torch.as_tensor(test_x, dtype=torch.float32) - mean) / std
        predicted = classes[(test @ weight + bias).argmax(1).numpy()]
    return float((predicted == np.asarray(test_y)).mean()) if len(test_y) else 0.0


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` test folds, each class's images dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=int)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (np.arange(len(members)) + rng.integers(k)) % k
    return [np.flatnonzero(fold == i) for i in range(k)]


def similarity_from_features(feats: np.ndarray, labels: Sequence[int], head: str, folds: int = 5,
                             seed: int = 0) -> SimilarityEvidence:
    """The probe's cross-validated accuracy on features already computed (what enters ``head``): the
    automatic plan (engine/training/auto_plan.py) computes them once for this and for its own scores."""
    y = np.asarray(labels)
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise EngineError("Similarity needs images of at least two classes.")
    k = int(min(folds, counts.min()))
    if k < 2:
        raise EngineError("Similarity needs at least two images of every class in the sample.")
    scores = []
    for test in stratified_folds(y, k, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        scores.append(probe_accuracy(feats[train], y[train], feats[test], y[test]))
    return similarity_evidence(float(np.mean(scores)), y,
                               f"logistic-regression probe on frozen '{head}' inputs, {k}-fold CV")


def similarity_evidence(accuracy: float, labels: Sequence[int], method: str) -> SimilarityEvidence:
    """The verdict of a probe's accuracy on ``labels`` (the images it was measured on): how far above
    chance (the largest class's share) it is."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    chance = float(counts.max() / counts.sum())
    score = max(0.0, (accuracy - chance) / (1 - chance)) if chance < 1 else 0.0
    return SimilarityEvidence(probe_accuracy=accuracy, chance=chance, score=score,
                              verdict=similarity_verdict(score), n_images=len(labels), n_classes=len(classes),
                              method=method)


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
