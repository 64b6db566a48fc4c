"""Calibration of a classifier's probabilities: expected calibration error, reliability bins and
temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One scalar T > 0 divides the logits before the softmax; it is fitted by minimising the negative
log-likelihood on the validation split, so the top-1 class never changes, only how sure it reads.
At the end of every finished run the best checkpoint is calibrated (``calibrate_best``); an older
run is calibrated by ``python -m engine calibrate RUN`` (engine/outputs/calibration.py). The record
lands in status.json and best.json (engine/runs/calibration.py). The threshold for "unknown" (issue
28, point 2) is not part of it yet.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from engine.core.modes import evaluating
from engine.runs.calibration import METHOD, T_RANGE, record_calibration
from engine.runs.checkpoint_file import load_weights

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


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T): LBFGS on log T from T = 1, in float64
    (deterministic), clamped to ``T_RANGE``; 1.0 when there are no logits or the fit goes nowhere."""
    if not logits.numel() or not labels.numel():
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
            "method": METHOD, "bins": BINS, "images": int(labels.numel()), "epoch": epoch}


def collect_logits(module: torch.nn.Module, loader: DataLoader, device: torch.device,
                   dtype: torch.dtype | None = None, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of every batch, float32 on the CPU, in eval mode under inference_mode."""
    outs, ys = [], []
    with evaluating(module), torch.inference_mode():
        for x, y in loader:
            x = x.to(device)
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = module(x)
            outs.append(logits.float().cpu())
            ys.append(y)
    if not outs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys)


def calibrate_best(prep: Prepared, runner: Trainer, run: RunDir | None) -> dict[str, Any] | None:
    """At the end of a finished run: its best checkpoint, calibrated on the validation split (one
    inference pass in micro-batches) and recorded. None: no run folder or no best checkpoint. Never
    raises: a failure is recorded as ``{"error": ...}`` and the run stays finished."""
    if run is None or not run.checkpoint("best").is_file():
        return None
    try:
        runner.module.load_state_dict(load_weights(run.checkpoint("best")))
        loader = DataLoader(prep.val_ds, shuffle=False, batch_size=runner.batches.micro_batch, num_workers=0)
        logits, labels = collect_logits(runner.module, loader, runner.device, runner.dtype, runner.channels_last)
        keep = [p for p in range(len(labels)) if p not in prep.val_ds.substituted]  # stand-ins of broken files
        record = calibration_record(logits[keep], labels[keep], (run.checkpoint_meta("best") or {}).get("epoch"))
    except Exception as exc:  # noqa: BLE001 - calibrating is a bonus: it never fails a finished run
        record = {"error": f"calibration failed: {type(exc).__name__}: {str(exc)[:300]}"}
    try:
        record_calibration(run, record)
    except OSError:
        return None
    return record
