"""What status.json says about a run, as a typed record.

status.json is written by two processes (the training and the app) and read by many; a reader
must survive anything in it (a field of the wrong type, garbage, a file from an older version),
so ``RunStatus.from_dict`` keeps what it can use and drops the rest.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ACTIVE_STATES = ("queued", "running")
STATES = ("queued", "running", "finished", "cancelled", "failed", "diverged", "interrupted", "damaged", "unknown")


@dataclass
class Progress:
    """Where a training is inside its current epoch (refreshed a few times a second)."""

    epoch: int = 0
    step: int = 0
    steps: int = 0
    eta_s: float = 0.0
    loss: float | None = None

    def fraction(self, epochs: int) -> float:
        """How much of the whole run is done (0..1)."""
        steps = max(1, self.steps)
        return min(1.0, max(0.0, ((self.epoch - 1) * steps + self.step) / (max(1, epochs) * steps)))

    def describe(self, epochs: int) -> str:
        return f"epoch {self.epoch}/{epochs}, step {self.step}/{self.steps}, ETA {self.eta_s:.0f}s"


@dataclass
class RunStatus:
    state: str = "unknown"
    reason: str = ""
    epoch: int = 0  # last finished epoch
    epochs: int | None = None  # how many the run trains to
    device: str | None = None
    micro_batch: int | None = None  # images per forward/backward slice (the batch is one step)
    batches: str | None = None  # the same in words, with the predicted peak and the memory budget
    precision: str | None = None  # the training steps' precision and why (engine/training/precision.py)
    auto_plan: str | None = None  # --strategy auto: the plan it chose and why, one line (engine/training/auto_plan.py)
    pid: int | None = None  # the training process, with its kernel start time and a heartbeat
    pid_start: str | None = None
    heartbeat: float | None = None
    progress: Progress | None = None
    queue_position: int | None = None  # while queued behind another training: 1 is next
    val_acc: float | None = None
    val_loss: float | None = None
    best_epoch: int | None = None
    best_val_acc: float | None = None
    unreadable: list[dict[str, str]] = field(default_factory=list)  # files that broke during training
    created_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    # a run that came in as a bundle (engine/runs/bundle.py): file name, original id, when exported/imported
    imported_from: dict[str, Any] | None = None
    # the best checkpoint's temperature scaling, fitted on the validation split (engine/runs/calibration.py)
    calibration: dict[str, Any] | None = None
    # a run trained on a Ray cluster (engine/cluster/): its dashboard address, job id, attempt, Ray version
    cluster: dict[str, Any] | None = None

    @property
    def on_cluster(self) -> bool:
        """Trained on a Ray cluster (engine/cluster/): it never holds this machine's device nor waits in its
        queue, so the pages count it apart from the trainings here."""
        return isinstance(self.cluster, dict) and bool(self.cluster.get("address"))

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> RunStatus:
        """Tolerant: a value of the wrong type falls back to the default; unknown keys are dropped."""
        if not isinstance(data, dict):
            return cls()
        defaults = cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value, default = data[f.name], getattr(defaults, f.name)
            if f.name == "progress":
                value = _progress(value)
            elif f.name == "unreadable":
                value = [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []
            elif f.name == "state":
                value = value if value in STATES else "unknown"
            elif f.name in ("imported_from", "cluster"):
                value = _origin(value)
            elif f.name == "calibration":
                value = clean_calibration(value)
            elif not _fits(value, f.type):
                value = default
            values[f.name] = value
        return cls(**values)


FIELDS = frozenset(f.name for f in fields(RunStatus))


def _origin(value: Any) -> dict[str, Any] | None:
    """Where an imported run came from: plain text and number values only, anything else dropped."""
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if isinstance(k, str) and (v is None or isinstance(v, (str, int, float)))
            and not isinstance(v, bool)}


def _progress(value: Any) -> Progress | None:
    if not isinstance(value, dict):
        return None
    try:
        return Progress(**{k: v for k, v in value.items() if k in Progress.__dataclass_fields__})
    except TypeError:
        return None


def _fits(value: Any, annotation: str) -> bool:
    """Does a JSON value fit a field's annotation (as written: 'int | None', 'str', 'float | None')?"""
    if value is None:
        return "None" in annotation
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return "int" in annotation or "float" in annotation
    if isinstance(value, float):
        return "float" in annotation
    if isinstance(value, str):
        return "str" in annotation
    return False


# ------------------------------------------------------------------ calibration (engine/runs/calibration.py)
METHOD = "temperature scaling (NLL, validation split)"
T_RANGE = (0.05, 20.0)  # the temperatures a fit may give (engine/training/calibration.py clamps to it)
MAX_DISTANCE = 2.0  # the open-set rule's distances are cosine distances, in [0, 2] (engine/runs/open_set.py)
_NUMBERS = ("temperature", "ece_before", "ece_after", "nll_before", "nll_after")
_COUNTS = ("bins", "images", "epoch")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def clean_calibration(value: Any) -> dict[str, Any] | None:
    """The record as a reader may trust it: finite numbers, a temperature in ``T_RANGE``, ECEs in [0, 1];
    anything else None (a status.json edited by hand, a bundle from elsewhere). An error record keeps
    its message only."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("error"), str):
        return {"error": value["error"][:500]}
    if not all(_number(value.get(k)) for k in ("temperature", "ece_before", "ece_after")):
        return None
    if not T_RANGE[0] <= value["temperature"] <= T_RANGE[1] or \
            not all(0.0 <= value[k] <= 1.0 for k in ("ece_before", "ece_after")):
        return None
    clean: dict[str, Any] = {k: float(value[k]) for k in _NUMBERS if _number(value.get(k))}
    clean.update({k: int(value[k]) for k in _COUNTS if _number(value.get(k)) and int(value[k]) == value[k]})
    clean["method"] = value["method"][:200] if isinstance(value.get("method"), str) else METHOD
    if isinstance(value.get("note"), str):  # why the temperature was not fitted (every image right)
        clean["note"] = value["note"][:300]
    threshold, rule = value.get("unknown_threshold"), value.get("open_set")
    if _number(threshold) and 0.0 <= threshold <= MAX_DISTANCE and isinstance(rule, dict):
        clean["unknown_threshold"] = float(threshold)
        clean["open_set"] = {k: rule[k][:200] for k in ("rule", "text") if isinstance(rule.get(k), str)}
        clean["open_set"].update({k: rule[k] for k in ("k", "images", "dims") if _number(rule.get(k))
                                  and int(rule[k]) == rule[k] and rule[k] >= 0})
        if _number(rule.get("quantile")) and 0.0 < rule["quantile"] <= 1.0:
            clean["open_set"]["quantile"] = float(rule["quantile"])
    return clean
