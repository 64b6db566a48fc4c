"""The emit sink of a run folder: events to disk, status.json refreshed (throttled), TensorBoard files."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from engine.runs.events import EpochEnded, PlanChosen, RunFinished, RunStarted, StepLogged, no_emit
from engine.runs.tensorboard import TensorBoardLog

if TYPE_CHECKING:
    from engine.runs.events import Emit, Event
    from engine.runs.store import RunDir


STATUS_EVERY_S = 0.5


class RunRecorder:
    """The emit sink of a run directory: events to disk, status.json refreshed (throttled), and the
    run's TensorBoard event files (runs/tensorboard.py; they never fail a training)."""

    def __init__(self, run: RunDir, forward: Emit = no_emit):
        self.run, self.forward, self._last = run, forward, 0.0
        self.tensorboard = TensorBoardLog(run)

    def __call__(self, event: Event) -> None:
        if not isinstance(event, StepLogged):
            self.run.record(event)
        now = time.monotonic()
        if isinstance(event, StepLogged):
            if now - self._last >= STATUS_EVERY_S or event.step == event.steps:
                self._last = now
                self.run.write_status(progress={"epoch": event.epoch, "step": event.step,
                                                "steps": event.steps, "eta_s": round(event.eta_s, 1),
                                                "loss": event.loss})
        elif isinstance(event, RunStarted):
            self.run.write_status(state="running", epochs=event.epochs, device=event.device,
                                  micro_batch=event.micro_batch or None, batches=event.batches or None,
                                  precision=event.precision or None)
        elif isinstance(event, PlanChosen):
            self._adopt_plan(event)
        elif isinstance(event, EpochEnded):
            self.run.write_status(epoch=event.epoch, val_acc=event.val_acc, val_loss=event.val_loss)
        elif isinstance(event, RunFinished):
            self.run.write_status(state=event.status, reason=event.reason, best_epoch=event.best_epoch,
                                  best_val_acc=event.best_val_acc, finished_at=time.time())
        if not isinstance(event, StepLogged):
            self.tensorboard(event)
        self.forward(event)

    def _adopt_plan(self, event: PlanChosen) -> None:
        """--strategy auto chose: config.json takes the plan and how it was chosen (a resume, an export and
        the exported script train that plan), only as a valid config (a cluster job's log is read here)."""
        from engine.config import TrainConfig
        from engine.core.errors import EngineError
        from engine.core.files import atomic_write_json

        record = event.record if isinstance(event.record, dict) else {}
        config = self.run.config_or_empty()
        try:
            adopted = TrainConfig.from_dict({**config, "plan": record.get("plan"), "auto_plan": record})
        except (EngineError, TypeError, ValueError):  # ConfigError included
            return
        atomic_write_json(self.run.config_path, {**config, "plan": adopted.plan, "auto_plan": record})
        self.run.write_status(auto_plan=event.summary)
