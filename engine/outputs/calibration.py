"""Calibrate a run that already ended (``python -m engine calibrate RUN``): its best checkpoint on its
validation split, read as evaluation reads it (engine/outputs/evaluate.py), temperature scaling fitted
and measured as at the end of a run (engine/training/calibration.py), recorded in status.json and
best.json (engine/runs/calibration.py). The "unknown" threshold (issue 28, point 2) is not part of it yet.
"""
from __future__ import annotations

from typing import Any

import torch

from engine.core.errors import RunError
from engine.outputs.evaluate import validation_predictions
from engine.runs.calibration import record_calibration
from engine.runs.store import RunDir
from engine.training.calibration import calibration_record


def calibrate_run(run: RunDir) -> dict[str, Any]:
    """Fit the temperature of ``run``'s best checkpoint on its validation split, measure the ECE (15
    bins) before and after, record it; returns the record. A run still training, or without a best
    checkpoint, is refused with a one-line RunError."""
    status = run.status()
    if status.active:
        raise RunError(f"The run {run.run_id} is still {status.state}; it is calibrated when it finishes.")
    if not run.checkpoint("best").is_file():
        raise RunError(f"The run {run.run_id} has no best checkpoint (no epoch finished); nothing to calibrate.")
    preds = validation_predictions(run, "best", "val")
    # log-probabilities are the logits less a per-image constant: the same softmax at every temperature
    logits = preds["probs"].clamp_min(torch.finfo(torch.float32).tiny).log()
    record = calibration_record(logits, preds["labels"], (run.checkpoint_meta("best") or {}).get("epoch"))
    record_calibration(run, record)
    return record


def describe_calibration(record: dict[str, Any]) -> str:
    """'temperature 1.84: ECE 0.121 -> 0.034 on 240 validation images (epoch 3)'"""
    if "error" in record:
        return f"not calibrated: {record['error']}"
    epoch = f" (epoch {record['epoch']})" if record.get("epoch") is not None else ""
    return (f"temperature {record['temperature']:.3f}: ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f} "
            f"on {record.get('images', 0)} validation images{epoch}")
