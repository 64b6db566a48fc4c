"""Train a run folder: under the device lock, with a heartbeat, and a final status however
it ends (finished, cancelled, diverged, failed), through the one lifecycle of engine/runs/lifecycle.py.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.runs.events import no_emit
from engine.runs.lifecycle import CancelledInQueue, final_status, holding_the_device, in_line, recorded_end
from engine.runs.store import sweep_temps
from engine.training.checkpoint import disk_error
from engine.training.loop import RunResult, fit

if TYPE_CHECKING:
    from engine.runs.events import Emit
    from engine.runs.locks import DeviceLock
    from engine.runs.store import RunDir


def train_run(run: RunDir, *, resume: bool = False, emit: Emit = no_emit,
              lock: DeviceLock | None = None, wait: bool = False) -> RunResult:
    """Train a run directory under the machine's device lock, recording how it ended in its status
    (engine/runs/lifecycle.py).

    ``lock``: one the caller already holds (the CLI takes it before creating a run folder, so a
    refused start leaves nothing on disk). ``wait``: when the device is busy, wait in the machine's
    queue (status "queued" with its position) instead of being refused; a cancel while waiting
    ends the run as "cancelled" with nothing trained. Ctrl-C and SIGTERM end the run as "cancelled".
    """
    config = TrainConfig.from_dict(run.config())

    def queued(position: int, ahead: str) -> None:
        run.write_status(state="queued", queue_position=position, heartbeat=time.time(),
                         reason=in_line(position, ahead))

    def ended(state: str, reason: str) -> None:
        final_status(run.write_status, state=state, reason=reason)

    try:
        with holding_the_device(config.device, f"run {run.run_id}", str(run.path), lock=lock, wait=wait,
                                cancelled=run.cancel_requested, report=queued):
            with recorded_end(ended, run.write_status, translate=disk_error):
                run.cancel_path.unlink(missing_ok=True)
                sweep_temps(run)
                run.write_status(state="running", reason="", queue_position=None)
                if config.nproc > 1:  # this process keeps the lock and the heartbeat; the ranks train
                    from engine.training.launch import launch_ranks

                    return launch_ranks(run, config, resume)
                return fit(config, run, resume=resume, emit=emit)
    except CancelledInQueue as exc:
        final_status(run.write_status, state="cancelled", reason=str(exc), queue_position=None)
        run.cancel_path.unlink(missing_ok=True)
        return RunResult(status="cancelled", reason=str(exc), run_dir=str(run.path), best_epoch=None,
                         best_val_acc=None, epochs_done=len(run.metrics()), seconds=0.0,
                         history=run.metrics(), feature_cache=False)


def check_resumable(run: RunDir, epochs: int) -> None:
    """What resuming ``run`` to ``epochs`` needs, checked before the run is touched: a refused resume
    leaves its config and its state as they were. Its last commit readable; more epochs than it has
    trained; a shared server's caps; its data readable, with the classes its checkpoint predicts."""
    from engine.data.datasets import load_source
    from engine.runs.load import check_same_classes
    from engine.training.checkpoint import read_commit

    commit = read_commit(run)
    done = int(commit.get("epoch") or 0)
    if epochs <= done:
        raise EngineError(f"Run {run.run_id} has trained {done} epoch(s): resuming it needs more than {done} "
                          f"(got {epochs}).")
    config = TrainConfig.from_dict({**run.config(), "epochs": epochs})
    config.check_hosted()
    trained = (commit.get("meta") or {}).get("class_names")
    if trained:
        names = load_source(config.data, work_dir=str(run.path), verify=False).class_names
        check_same_classes(run, list(trained), list(names), "it cannot be resumed on that data; start a new run")
