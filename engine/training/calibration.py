"""Calibration of a classifier's probabilities: expected calibration error, reliability bins and
temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One scalar T > 0 divides the logits before the softmax; it is fitted by minimising the negative
log-likelihood on the validation split, so the top-1 class never changes, only how sure it reads.
At the end of every finished run the best checkpoint is calibrated (``calibrate_best``); an older
run is calibrated by ``python -m engine calibrate RUN`` (engine/outputs/calibration.py). The record
lands in status.json and best.json (engine/runs/calibration.py). The same pass sets the open-set rule's
threshold (engine/training/open_set.py), kept in the record as ``unknown_threshold``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engine.runs.calibration import METHOD, T_RANGE, record_calibration
from engine.training.epoch import evaluate_scores
from engine.training.open_set import bank_features, bank_picks, record_open_set

if TYPE_CHECKING:
    from engine.runs.store import RunDir
    from engine.training.setup import Prepared
    from engine.training.trainer import Trainer

BINS = 15


def _bin_of(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: its top-1 confidence, whether the top-1 is right, and its bin (equal-width bins
    (lo, hi] over [0, 1], a confidence of 0 in the first)."""
    probs = probs.detach().float()
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels.to(predicted.device)).float()
    index = (confidence * bins).ceil().long().sub(1).clamp(0, bins - 1)
    return confidence, correct, index


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> list[dict[str, Any]]:
    """One row per confidence bin for a reliability diagram: its bounds, the mean top-1 confidence and
    the accuracy of its images (None for an empty bin), and how many images fell in it."""
    rows = []
    if probs.numel():
        confidence, correct, index = _bin_of(probs, labels, bins)
    for b in range(bins):
        mask = index == b if probs.numel() else None
        count = int(mask.sum()) if mask is not None else 0
        rows.append({"lower": b / bins, "upper": (b + 1) / bins, "count": count,
                     "confidence": float(confidence[mask].mean()) if count else None,
                     "accuracy": float(correct[mask].mean()) if count else None})
    return rows


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """ECE: over equal-width bins of the top-1 confidence, |accuracy - mean confidence| weighted by
    the bin's share of the images (0.0 for no images)."""
    total = int(labels.numel())
    if not total:
        return 0.0
    return float(sum(abs(r["accuracy"] - r["confidence"]) * r["count"] / total
                     for r in reliability(probs, labels, bins) if r["count"]))


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits / temperature, labels))


NO_ERRORS = ("every validation image is right, so the likelihood only grows as T falls to 0: there is no "
             "temperature to fit and T stays 1")


def all_right(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    return bool(labels.numel()) and bool((logits.argmax(-1) == labels.to(logits.device)).all())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T): LBFGS on log T from T = 1, in float64
    (deterministic), clamped to ``T_RANGE``; 1.0 when there are no logits or the fit goes nowhere.
    1.0 too when every image is right: the NLL then has no minimum, the fit ran to the clamp (T = 0.05)
    and made every later prediction read ~100% sure, a new image's as much as a known one's."""
    if not logits.numel() or not labels.numel() or all_right(logits, labels):
        return 1.0
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().to("cpu", torch.float64).clone()
        y = labels.detach().to("cpu", torch.long).clone()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10,
                                      tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(z / log_t.clamp(-20, 20).exp(), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        temperature = float(log_t.detach().clamp(-20, 20).exp())
        if not math.isfinite(temperature):
            return 1.0
        temperature = min(max(temperature, T_RANGE[0]), T_RANGE[1])
        return temperature if _nll(z, y, temperature) <= _nll(z, y) else 1.0


def calibration_record(logits: torch.Tensor, labels: torch.Tensor, epoch: int | None) -> dict[str, Any]:
    """Fit T on these validation logits and measure before and after: the record status.json keeps."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    temperature = fit_temperature(logits, labels)
    empty = not labels.numel()
    return {"temperature": temperature,
            "ece_before": expected_calibration_error(logits.softmax(-1), labels),
            "ece_after": expected_calibration_error((logits / temperature).softmax(-1), labels),
            "nll_before": 0.0 if empty else _nll(logits.double(), labels),
            "nll_after": 0.0 if empty else _nll(logits.double(), labels, temperature),
            "method": METHOD, "bins": BINS, "images": int(labels.numel()), "epoch": epoch,
            **({"note": NO_ERRORS} if all_right(logits, labels) else {})}


def calibrate_best(prep: Prepared, runner: Trainer, run: RunDir | None, epoch: int | None) -> dict[str, Any] | None:
    """At the end of a finished run, with the best checkpoint's weights in ``runner.module``: temperature
    scaling and the open-set rule, both set on the validation split from one inference pass (in
    micro-batches), plus one pass over the rule's bank of training images; recorded. None: no run
    folder. Never raises: a failure is recorded as ``{"error": ...}`` and the run stays finished."""
    if run is None:
        return None
    try:
        cached = _cached_head_inputs(prep, runner)
        if cached is not None:  # feature extraction: the head on the features the run cached, no backbone pass
            val_features, bank, bank_labels = cached
            outputs = evaluate_scores(runner.model, runner.val_loader, runner.device, runner.dtype, keep=True).outputs
            outputs.features = val_features
        else:
            outputs = runner.last_val if runner.last_val_epoch == epoch else None  # the best was the last epoch
            if outputs is None:
                loader = DataLoader(prep.val_ds, shuffle=False, batch_size=runner.batches.micro_batch, num_workers=0)
                outputs = evaluate_scores(runner.module, loader, runner.device, runner.dtype, runner.channels_last,
                                          keep=True, head=prep.handle.spec.head).outputs
            bank, bank_labels = bank_features(prep, runner)
        keep = [p for p in range(len(outputs.labels)) if p not in prep.val_ds.substituted]  # stand-ins of broken files
        record = calibration_record(outputs.logits[keep], outputs.labels[keep], epoch)
        record_open_set(run, record, bank, bank_labels, outputs.features[keep], epoch)
    except Exception as exc:  # noqa: BLE001 - calibrating is a bonus: it never fails a finished run
        record = {"error": f"calibration failed: {type(exc).__name__}: {str(exc)[:300]}"}
    try:
        record_calibration(run, record)
    except OSError:
        return None
    return record


def _cached_head_inputs(prep: Prepared, runner: Trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(validation features, bank features, bank labels) from the run's feature cache when it cached
    exactly the head's input (feature extraction in one process); None otherwise. The cache holds the
    eval view of every image (a cached run is never augmented), as a prediction sees it."""
    head = prep.handle.module.get_submodule(prep.handle.spec.head)
    if not runner.cached or runner.ranks is not None or getattr(runner.model, "head", None) is not head:
        return None
    train, val = runner.train_loader.dataset, runner.val_loader.dataset
    if not hasattr(train, "tensors") or not hasattr(val, "tensors"):
        return None
    labels = train.tensors[1].tolist()
    picked = bank_picks(list(range(len(labels))), labels)
    return val.tensors[0].flatten(1), train.tensors[0][picked].flatten(1), train.tensors[1][picked]
