"""The few things a training run says while it runs, as plain dataclasses.

One ``emit`` sink receives them: the run directory writes them to disk, the CLI draws a progress
bar, a test collects them in a list. Nothing else couples the loop to its observers.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass
class Event:
    def to_dict(self) -> dict[str, Any]:
        return {"event": type(self).__name__, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclass
class RunStarted(Event):
    run_id: str
    device: str
    epochs: int
    steps_per_epoch: int
    train_images: int
    val_images: int
    trainable_params: int
    feature_cache: bool
    skipped: list = field(default_factory=list)  # [file, reason] pairs the data check left out
    micro_batch: int = 0  # images per forward/backward slice (training/micro.py)
    batches: str = ""  # the same in words, with the predicted peak memory and the budget
    precision: str = ""  # the steps' precision and why (engine/training/precision.py)


@dataclass
class PlanChosen(Event):
    """``--strategy auto`` chose the freeze plan (engine/training/auto_plan.py), before the first epoch."""

    plan: str  # a race plan name: fe | last-1 | last-2 | full
    summary: str  # one line: the pick, why, the sample race's scores
    # config.json's ``auto_plan`` (with the plan it trains): a run folder's recorder writes it into the run's
    # config, wherever the choice was made (this process, rank 0, a Ray cluster's job)
    record: dict = field(default_factory=dict)


@dataclass
class StepLogged(Event):
    epoch: int
    step: int  # within the epoch, 1-based
    steps: int
    loss: float
    images_per_s: float
    eta_s: float  # for the whole run


@dataclass
class EpochEnded(Event):
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: dict[str, float] = field(default_factory=dict)  # group name -> learning rate
    epoch_s: float = 0.0
    images_per_s: float = 0.0
    trainable_params: int = 0
    elapsed_s: float = 0.0
    val_macro_f1: float | None = None  # mean per-class F1 (engine.training.metrics)
    val_balanced_acc: float | None = None  # mean per-class recall


@dataclass
class CheckpointSaved(Event):
    epoch: int
    kind: str  # last | best
    path: str
    val_loss: float
    val_acc: float


@dataclass
class RunFinished(Event):
    status: str  # finished | cancelled | failed | diverged
    reason: str
    best_epoch: int | None
    best_val_acc: float | None
    epochs_done: int
    seconds: float


Emit = Callable[[Event], None]


def no_emit(_event: Event) -> None:
    return None
