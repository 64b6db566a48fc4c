"""Calibrate a run that already ended (``python -m engine calibrate RUN``): its best checkpoint on its
validation split, read as evaluation reads it (engine/outputs/evaluate.py), temperature scaling fitted
and measured as at the end of a run (engine/training/calibration.py), recorded in status.json and
best.json (engine/runs/calibration.py), with the open-set rule fitted as at the end of a run
(engine/training/open_set.py: its bank of training images, its threshold on the validation images).
"""
from __future__ import annotations

from typing import Any

import torch

from engine.core.errors import RunError
from engine.data.splits import split_all
from engine.outputs.evaluate import validation_predictions
from engine.runs.calibration import record_calibration
from engine.runs.store import RunDir
from engine.training.calibration import calibration_record
from engine.training.feature_cache import embed
from engine.training.open_set import bank_picks, record_open_set


def calibrate_run(run: RunDir) -> dict[str, Any]:
    """Fit the temperature of ``run``'s best checkpoint on its validation split, measure the ECE (15
    bins) before and after, record it; returns the record. A run still training, or without a best
    checkpoint, is refused with a one-line RunError."""
    status = run.status()
    if status.active:
        raise RunError(f"The run {run.run_id} is still {status.state}; it is calibrated when it finishes.")
    if not run.checkpoint("best").is_file():
        raise RunError(f"The run {run.run_id} has no best checkpoint (no epoch finished); nothing to calibrate.")
    preds = validation_predictions(run, "best", "val", features=True)
    # log-probabilities are the logits less a per-image constant: the same softmax at every temperature
    logits = preds["probs"].clamp_min(torch.finfo(torch.float32).tiny).log()
    epoch = (run.checkpoint_meta("best") or {}).get("epoch")
    record = calibration_record(logits, preds["labels"], epoch)
    ds, config = preds["dataset"], preds["config"]
    train, _val, _test = split_all(ds, config)
    picked = bank_picks(train, ds.labels)
    if picked:
        record_open_set(run, record, embed(preds["handle"], ds, picked),
                        torch.as_tensor([ds.labels[i] for i in picked]), preds["features"], epoch)
    record_calibration(run, record)
    return record


def describe_calibration(record: dict[str, Any]) -> str:
    """'temperature 1.84: ECE 0.121 -> 0.034 on 240 validation images (epoch 3)'"""
    if "error" in record:
        return f"not calibrated: {record['error']}"
    epoch = f" (epoch {record['epoch']})" if record.get("epoch") is not None else ""
    if record.get("note"):  # nothing fitted: say why instead of a "before -> after" that did not happen
        return f"temperature 1: {record['note']}, on {record.get('images', 0)} images{epoch}" + _unknown_line(record)
    return (f"temperature {record['temperature']:.3f}: ECE {record['ece_before']:.4f} -> {record['ece_after']:.4f} "
            f"on {record.get('images', 0)} validation images{epoch}" + _unknown_line(record))


def _unknown_line(record: dict[str, Any]) -> str:
    rule = record.get("open_set")
    if record.get("unknown_threshold") is None or not isinstance(rule, dict):
        return ""
    return (f"; unknown above distance {record['unknown_threshold']:.3f} ({rule.get('text', 'open-set rule')}, "
            f"k={rule.get('k')}, {rule.get('images')} training images; "
            f"{100 * (1 - rule.get('quantile', 0.95)):.0f}% of validation images above it)")
