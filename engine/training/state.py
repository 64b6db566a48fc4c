"""Where a run stands between epochs, and when to stop early.

TrainState is exactly what the per-epoch commit saves and a resume restores: the last finished
epoch, the optimizer step count, the metrics of every finished epoch and the early-stopping
tracker. Keeping it in one object is what lets a resumed run continue the same curves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.runs.events import EpochEnded


@dataclass
class EarlyStopping:
    """Stop when the monitored metric has not improved by ``min_delta`` for ``patience`` epochs."""

    monitor: str = "val_acc"  # or "val_loss"
    min_delta: float = 0.0
    patience: int | None = None  # None: never stop early
    best_value: float | None = None
    best_epoch: int | None = None
    best_val_acc: float | None = None
    stale: int = 0

    def update(self, ended: EpochEnded) -> bool:
        """Record an epoch; True when it is the best so far (its weights become ``best``)."""
        value = ended.val_acc if self.monitor == "val_acc" else ended.val_loss
        if self.best_value is None:
            improved = True
        elif self.monitor == "val_acc":
            improved = value > self.best_value + self.min_delta
        else:
            improved = value < self.best_value - self.min_delta
        if improved:
            self.best_value, self.best_epoch, self.best_val_acc, self.stale = value, ended.epoch, ended.val_acc, 0
        else:
            self.stale += 1
        return improved

    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def reason(self) -> str:
        return f"early stopped: no {self.monitor} improvement for {self.stale} epochs"

    def tracking(self) -> dict[str, Any]:
        """The fields the commit stores (flat, as runs have always stored them)."""
        return dict(best_value=self.best_value, best_epoch=self.best_epoch, best_val_acc=self.best_val_acc,
                    stale=self.stale)


@dataclass
class TrainState:
    """Counters of a run: epochs are 1-based and ``epoch`` is the last one that finished."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    early: EarlyStopping = field(default_factory=EarlyStopping)

    @classmethod
    def start(cls, monitor: str, min_delta: float, patience: int | None,
              commit: dict[str, Any] | None = None) -> TrainState:
        """A fresh state, or the one a commit (``last_state.pt``) saved."""
        early = EarlyStopping(monitor, min_delta, patience)
        if not commit:
            return cls(early=early)
        early.best_value, early.best_epoch = commit.get("best_value"), commit.get("best_epoch")
        early.best_val_acc, early.stale = commit.get("best_val_acc"), int(commit.get("stale", 0))
        return cls(epoch=int(commit.get("epoch", 0)), step=int(commit.get("step", 0)),
                   history=list(commit.get("history") or []), early=early)

    def finish_epoch(self, ended: EpochEnded, steps: int) -> bool:
        """Count a finished epoch; True when it is the best so far."""
        self.epoch, self.step = ended.epoch, self.step + steps
        self.history.append(ended.to_dict())
        return self.early.update(ended)
