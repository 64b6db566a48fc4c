"""A run's calibration record: what ``status.json`` (and ``best.json``) say about its temperature.

The fitting itself is engine/training/calibration.py (the end of a run) and engine/outputs/calibration.py
(``python -m engine calibrate RUN``); this module writes and reads the record, so status
readers, bundles and predictions can use it from this layer.

A record is ``{"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "method", "bins",
"images", "epoch"}`` or, when calibrating failed, ``{"error": "..."}``.

The record is checked by ``clean_calibration`` (engine/runs/status.py: every status reader gets it checked).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.core.files import atomic_write_json, read_json
from engine.runs.status import METHOD, T_RANGE, clean_calibration

if TYPE_CHECKING:
    from engine.runs.store import RunDir

__all__ = ["METHOD", "T_RANGE", "clean_calibration", "record_calibration", "run_calibration", "run_temperature"]


def record_calibration(run: RunDir, record: dict[str, Any]) -> None:
    """Into status.json, and into best.json (the JSON copy of the best checkpoint's meta) when that
    describes the same epoch: bundles and exports carry it from there too. The weights file's own
    meta is not rewritten (that would rewrite the weights)."""
    run.write_status(calibration=record)
    if "error" in record:
        return
    sidecar = run.checkpoint("best").with_suffix(".json")
    meta = read_json(sidecar)
    if isinstance(meta, dict) and meta.get("epoch") == record.get("epoch"):
        atomic_write_json(sidecar, {**meta, "calibration": record})


def run_calibration(run: RunDir) -> dict[str, Any] | None:
    """The run's calibration of its current best checkpoint (status.json, else best.json), or None:
    never calibrated, failed, or fitted on an earlier best epoch than the checkpoint's now."""
    best = run.checkpoint_meta("best") or {}
    sidecar = read_json(run.checkpoint("best").with_suffix(".json"))
    status = read_json(run.status_path, {})
    for source in (status, sidecar):
        record = clean_calibration(source.get("calibration")) if isinstance(source, dict) else None
        if record and "error" not in record and record.get("epoch") in (None, best.get("epoch")):
            return record
    return None


def run_temperature(run: RunDir) -> float | None:
    """The temperature to divide the run's logits by before the softmax; None: not calibrated."""
    record = run_calibration(run)
    return record["temperature"] if record else None
