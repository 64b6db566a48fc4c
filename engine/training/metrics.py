"""Scores beside accuracy that a minority class cannot hide behind, from a confusion matrix (plain torch).

- **balanced accuracy**: the mean per-class recall, ``recall_c = TP_c / (TP_c + FN_c)``, over the classes
  that have true samples (as sklearn's ``balanced_accuracy_score``).
- **macro-F1**: the mean per-class ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)`` over the classes that occur
  in the true labels or in the predictions (as sklearn's ``f1_score(average="macro")``); a class the data
  never shows and the model never predicts is left out rather than counted as 0.

On balanced data both sit near accuracy; on imbalanced data accuracy can stay high while a small class
is never recognised, and these drop.
"""
from __future__ import annotations

import torch


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (int64, on the CPU): rows are true classes, columns predicted ones."""
    t, p = targets.reshape(-1).long().cpu(), predictions.reshape(-1).long().cpu()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def balanced_scores(confusion: torch.Tensor) -> tuple[float, float]:
    """(macro-F1, balanced accuracy) of a confusion matrix; (0.0, 0.0) when it is empty."""
    c = torch.as_tensor(confusion).double()
    tp = c.diagonal()
    support, predicted = c.sum(1), c.sum(0)
    if support.sum() == 0:
        return 0.0, 0.0
    has_true = support > 0
    balanced_acc = (tp[has_true] / support[has_true]).mean().item()
    seen = has_true | (predicted > 0)
    f1 = 2 * tp[seen] / (support[seen] + predicted[seen])  # 2TP / (2TP + FP + FN); never 0/0 on seen classes
    return f1.mean().item(), balanced_acc
