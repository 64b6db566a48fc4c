"""Evaluate a run's checkpoint on the validation split it was trained with, or on its held-out test split."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from engine.config import TrainConfig
from engine.core.device import resolve_device
from engine.core.errors import EngineError
from engine.core.files import read_json
from engine.core.memory import inference_batch
from engine.data.splits import split_all
from engine.outputs.predict import class_probs
from engine.runs.load import check_same_classes, load_run_model
from engine.runs.store import RunDir
from engine.training.metrics import balanced_scores


@dataclass
class TTAChange:
    """Accuracy and loss on one split without and with test-time augmentation (the image and its
    horizontal mirror, probabilities averaged: ``predict.class_probs``), from the same forward passes."""

    plain_acc: float
    tta_acc: float
    plain_loss: float
    tta_loss: float
    images: int
    points: float = 0.0  # tta_acc - plain_acc, in percentage points

    def __post_init__(self) -> None:
        self.points = round(100 * (self.tta_acc - self.plain_acc), 4)

    def line(self) -> str:
        """'TTA: 0.912 -> 0.925 (+1.3 points), loss 0.3101 -> 0.2950'"""
        return (f"TTA: {self.plain_acc:.3f} -> {self.tta_acc:.3f} ({self.points:+.1f} points), "
                f"loss {self.plain_loss:.4f} -> {self.tta_loss:.4f}")

    @classmethod
    def of(cls, value: TTAChange | dict[str, Any] | None) -> TTAChange | None:
        if value is None or isinstance(value, TTAChange):
            return value
        return cls(**{k: value[k] for k in ("plain_acc", "tta_acc", "plain_loss", "tta_loss", "images")})


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()


def _tta_change(preds: dict[str, Any]) -> TTAChange | None:
    """With and without TTA side by side, or None when ``preds`` were made without it."""
    if not preds.get("tta"):
        return None
    labels, plain, tta = preds["labels"], preds["plain_probs"], preds["probs"]
    return TTAChange(plain_acc=float((plain.argmax(-1) == labels).float().mean()),
                     tta_acc=float((tta.argmax(-1) == labels).float().mean()),
                     plain_loss=_nll(plain, labels), tta_loss=_nll(tta, labels), images=int(labels.numel()))


@dataclass
class EvalSummary:
    """What ``python -m engine eval`` reports: accuracy and loss on the run's own validation split
    (``val_*``), or with ``--split test`` on its held-out test split (``test_*``; ``val_*`` are then None).
    With ``--tta`` the scores are those with test-time augmentation, and ``tta`` holds both side by side."""

    run_id: str
    checkpoint: str
    val_acc: float | None
    val_loss: float | None
    val_images: int | None
    per_class_acc: dict[str, float]
    unreadable: list[dict[str, str]] = field(default_factory=list)  # files broken since training, left out
    split: str = "val"
    changed: str | None = None  # the split is not the one the run was measured on (its data changed)
    test_acc: float | None = None
    test_loss: float | None = None
    test_images: int | None = None
    tta: TTAChange | None = None  # accuracy and loss without and with TTA, when evaluated with it

    def __post_init__(self) -> None:
        self.tta = TTAChange.of(self.tta)

    def to_dict(self) -> dict[str, Any]:
        other = "test" if self.split == "val" else "val"  # the split not evaluated: left out
        return {k: v for k, v in asdict(self).items() if not k.startswith(other + "_")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalSummary:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class EvaluationReport:
    """The Evaluate page's evidence: confusion, per-class scores, the misclassified images ranked by
    confidence (a top-loss gallery) and how confident right and wrong answers are."""

    run_id: str
    checkpoint: str
    class_names: list[str]
    accuracy: float
    confusion: list[list[int]]  # rows: true class, columns: predicted
    per_class: list[dict[str, Any]]  # class, precision, recall, f1, support
    # index, source, image (its name inside the dataset, what a decision names), true, predicted, confidence, true_prob
    misclassified: list[dict[str, Any]]
    confidence: dict[str, list[float]]  # "correct" / "wrong" -> the top-1 probabilities
    unreadable: list[dict[str, str]] = field(default_factory=list)
    changed: str | None = None  # the split is not the one the run was measured on (its data changed)
    # beside accuracy, the scores a small class cannot hide behind (engine.training.metrics)
    macro_f1: float = 0.0  # mean per-class F1 over the classes that occur in the labels or predictions
    balanced_accuracy: float = 0.0  # mean per-class recall over the classes with images
    # with TTA: everything above is of the averaged predictions, and this compares them with the plain ones
    tta: TTAChange | None = None
    # a calibrated run: its temperature, the ECE and reliability bins (engine/training/calibration.py)
    # before and after; every confidence above is then the calibrated one. None: not calibrated.
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.tta = TTAChange.of(self.tta)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


SPLIT_CHOICES = ("val", "test")


def validation_predictions(run: RunDir, kind: str = "best", split: str = "val", tta: bool = False,
                           features: bool = False) -> dict[str, Any]:
    """Labels, probabilities and sources of every validation image (or, with ``split="test"``, every
    held-out test image), in eval + inference mode.

    ``tta``: ``probs`` are averaged with the horizontal mirror's (``predict.class_probs``) and
    ``plain_probs`` are those without, from the same forward passes; without it both are the same tensor.
    ``features``: also the features entering the head (``features``), from the same forwards, plus the
    ``dataset`` and ``config`` they were read with.
    """
    from engine.data.datasets import TransformDataset, load_source
    from engine.data.overrides import image_key
    from engine.data.transforms import eval_transform

    config = TrainConfig.from_dict(run.config())
    handle = load_run_model(run.path, kind)
    ds = load_source(config.data, work_dir=str(run.path))
    check_same_classes(run, handle.spec.class_names, ds.class_names, "it cannot be evaluated on that data")
    if split not in SPLIT_CHOICES:
        raise EngineError(f"Unknown split '{split}': use {' or '.join(SPLIT_CHOICES)}.")
    _, val, test = split_all(ds, config)
    indices = val if split == "val" else test
    if not indices:
        raise EngineError(f"Run {run.run_id} has no {split} split: its data has no test/ folder and no test rows "
                          "in a labels CSV, and its test fraction is 0." if split == "test" else
                          f"Run {run.run_id} has no validation images.")
    dataset = TransformDataset(ds, indices, eval_transform(handle.spec))  # decodes reduced to the model's need
    device = resolve_device(config.device)
    module = handle.module.to(device)
    # slices sized to the model and image size (core/memory.py); no workers: ``dataset.failed`` is
    # filled in this process
    loader = DataLoader(dataset, batch_size=inference_batch(module, handle.spec.input_size))
    plain, averaged, labels, kept = [], [], [], []
    for x, y in loader:
        p, t = class_probs(module, x.to(device), tta=tta, max_batch=loader.batch_size,
                           head=handle.spec.head if features else None, features=kept if features else None)
        plain.append(p.cpu())
        averaged.append((t if tta else p).cpu())
        labels.append(y)
    # a file unreadable since training: its stand-in row is dropped, and the file listed
    keep = [p for p in range(len(indices)) if p not in dataset.substituted]
    indices = [indices[p] for p in keep]
    probs = torch.cat(averaged)[keep]
    extra = {"features": torch.cat(kept).cpu()[keep], "dataset": ds, "config": config} if features else {}
    return {**extra, "handle": handle, "probs": probs, "plain_probs": torch.cat(plain)[keep] if tta else probs,
            "tta": tta, "labels": torch.cat(labels)[keep], "indices": indices,
            "sources": [ds.sources[i] for i in indices], "images": [image_key(ds, i) for i in indices],
            "class_names": handle.spec.class_names,
            "unreadable": list(dataset.failed), "changed": _split_changed(run, split, len(indices))}


def _split_changed(run: RunDir, split: str, evaluated: int) -> str | None:
    """A sentence when the run was measured on another number of ``split`` images than are evaluated
    now (its status records the split it trained with): images removed, added or unreadable since, so
    these scores are not the ones it had."""
    status = read_json(run.status_path, {})
    counts = status.get("split") if isinstance(status, dict) else None
    recorded = counts.get(split) if isinstance(counts, dict) else None
    if isinstance(recorded, bool) or not isinstance(recorded, int) or recorded == evaluated:
        return None
    return (f"the run was measured on {recorded} {split} images and {evaluated} are evaluated now: its data "
            "has changed since it trained (images removed, added or no longer readable), so these scores are "
            "not the ones it had")


def evaluate_run(run: RunDir, kind: str = "best", split: str = "val", tta: bool = False) -> EvalSummary:
    """Accuracy, loss and per-class accuracy; with ``tta`` those with test-time augmentation, and
    ``tta`` on the summary compares them with the plain ones."""
    preds = validation_predictions(run, kind, split, tta=tta)
    probs, labels = preds["probs"], preds["labels"]
    loss = _nll(probs, labels)
    correct = probs.argmax(-1) == labels
    per_class = {}
    for c, name in enumerate(preds["class_names"]):
        mask = labels == c
        per_class[name] = float(correct[mask].float().mean()) if mask.any() else float("nan")
    scores = {f"{split}_acc": float(correct.float().mean()), f"{split}_loss": loss, f"{split}_images": int(labels.numel())}
    if split == "test":
        scores.update(val_acc=None, val_loss=None, val_images=None)
    return EvalSummary(run_id=run.run_id, checkpoint=kind, per_class_acc=per_class, split=split,
                       unreadable=[{"file": f, "reason": r} for f, r in preds["unreadable"]],
                       tta=_tta_change(preds), changed=preds["changed"], **scores)


def evaluation_report(run: RunDir, kind: str = "best", split: str = "val", tta: bool = False) -> EvaluationReport:
    """The Evaluate page's evidence; with ``tta`` of the averaged predictions, compared in ``tta``."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    preds = validation_predictions(run, kind, split, tta=tta)
    probs, calibration = _calibrated(run, kind, preds["probs"], preds["labels"])
    labels, names = preds["labels"].numpy(), preds["class_names"]
    predicted = probs.argmax(-1).numpy()
    confidence = probs.max(-1).values.numpy()
    classes = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0)
    wrong = [
        {"index": int(preds["indices"][i]), "source": preds["sources"][i], "image": preds["images"][i],
         "true": names[int(labels[i])],
         "predicted": names[int(predicted[i])], "confidence": float(confidence[i]),
         "true_prob": float(probs[i, int(labels[i])])}
        for i in range(len(labels)) if predicted[i] != labels[i]
    ]
    wrong.sort(key=lambda r: -r["confidence"])
    confusion = confusion_matrix(labels, predicted, labels=classes).tolist()
    macro_f1, balanced_accuracy = balanced_scores(torch.tensor(confusion)) if len(labels) else (0.0, 0.0)
    return EvaluationReport(
        run_id=run.run_id, checkpoint=kind, class_names=list(names),
        accuracy=float((predicted == labels).mean()) if len(labels) else 0.0,
        confusion=confusion, macro_f1=macro_f1, balanced_accuracy=balanced_accuracy,
        per_class=[{"class": n, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                   for n, p, r, f, s in zip(names, precision, recall, f1, support)],
        misclassified=wrong,
        confidence={"correct": confidence[predicted == labels].tolist(),
                    "wrong": confidence[predicted != labels].tolist()},
        unreadable=[{"file": f, "reason": r} for f, r in preds["unreadable"]],
        tta=_tta_change(preds), changed=preds["changed"], calibration=calibration,
    )


def _calibrated(run: RunDir, kind: str, probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """The probabilities as the run's predictions show them (divided by its temperature, when the best
    checkpoint is calibrated) and the reliability before and after; ``probs`` and None otherwise. The
    log-probabilities stand for the logits (the same softmax at every temperature); with TTA those of
    the averaged probabilities."""
    from engine.runs.calibration import run_calibration
    from engine.training.calibration import expected_calibration_error, reliability

    record = run_calibration(run) if kind == "best" else None
    if record is None:
        return probs, None
    temperature = record["temperature"]
    calibrated = (probs.clamp_min(torch.finfo(torch.float32).tiny).log() / temperature).softmax(-1)
    return calibrated, {"temperature": temperature,
                        "ece_before": expected_calibration_error(probs, labels),
                        "ece_after": expected_calibration_error(calibrated, labels),
                        "before": reliability(probs, labels), "after": reliability(calibrated, labels),
                        **({"note": record["note"]} if record.get("note") else {})}
