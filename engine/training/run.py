"""Train a run folder: under the device lock, with a heartbeat, and a final status however
it ends (finished, cancelled, diverged, failed).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.runs.events import no_emit
from engine.runs.locks import DeviceLock, device_lock
from engine.runs.process import Heartbeat
from engine.runs.queue import CancelledInQueue, device_queue, in_line, wait_for_device
from engine.runs.store import sweep_temps
from engine.training.checkpoint import disk_error
from engine.training.loop import RunResult, fit

if TYPE_CHECKING:
    from engine.runs.events import Emit
    from engine.runs.store import RunDir


def train_run(run: RunDir, *, resume: bool = False, emit: Emit = no_emit,
              lock: DeviceLock | None = None, wait: bool = False) -> RunResult:
    """Train a run directory under the machine's device lock, recording how it ended in its status.

    ``lock``: one the caller already holds (the CLI takes it before creating a run folder, so a
    refused start leaves nothing on disk). ``wait``: when the device is busy, wait in the machine's
    queue (status "queued" with its position) instead of being refused; a cancel while waiting
    ends the run as "cancelled" with nothing trained. Ctrl-C and SIGTERM end the run as "cancelled".
    """
    config = TrainConfig.from_dict(run.config())
    held = lock or device_lock(config.device, holder=f"run {run.run_id}")
    if lock is None and wait:
        try:
            _wait_in_line(run, held, config.device)
        except CancelledInQueue as exc:
            _final_status(run, state="cancelled", reason=str(exc), queue_position=None)
            run.cancel_path.unlink(missing_ok=True)
            return RunResult(status="cancelled", reason=str(exc), run_dir=str(run.path), best_epoch=None,
                             best_val_acc=None, epochs_done=len(run.metrics()), seconds=0.0,
                             history=run.metrics(), feature_cache=False)
    elif lock is None:
        held.acquire()  # refused: raises before anything is written
    try:
        run.cancel_path.unlink(missing_ok=True)
        sweep_temps(run)
        with sigterm_as_interrupt(), Heartbeat(run.write_status):
            run.write_status(state="running", reason="", queue_position=None)
            if config.nproc > 1:  # this process keeps the lock and the heartbeat; the ranks train
                from engine.training.launch import launch_ranks

                return launch_ranks(run, config, resume)
            return fit(config, run, resume=resume, emit=emit)
    except KeyboardInterrupt:
        _final_status(run, state="cancelled", reason="stopped by Ctrl-C or a termination signal")
        raise
    except EngineError as exc:
        _final_status(run, state="failed", reason=str(exc))
        raise
    except OSError as exc:  # the run folder's disk: full, gone read-only
        error = disk_error(exc)
        _final_status(run, state="failed", reason=str(error))
        raise error from exc
    except BaseException as exc:
        _final_status(run, state="failed", reason=f"internal error ({type(exc).__name__}); see log.txt")
        raise
    finally:
        held.release()


def _wait_in_line(run: RunDir, lock: DeviceLock, device: str) -> None:
    """Queue for the device, saying the position in the run's status (with a heartbeat)."""
    def report(position: int, ahead: str) -> None:
        run.write_status(state="queued", queue_position=position, heartbeat=time.time(),
                         reason=in_line(position, ahead))

    wait_for_device(lock, device_queue(device), str(run.path), cancelled=run.cancel_requested, report=report)


def _final_status(run: RunDir, **fields: Any) -> None:
    """Record how a run ended; best effort (a full disk must not hide the original error)."""
    try:
        run.write_status(finished_at=time.time(), **fields)
    except OSError:
        pass


class sigterm_as_interrupt:
    """SIGTERM (a stop from the OS or a process manager) ends the run like Ctrl-C: cancelled."""

    def __enter__(self) -> None:
        import signal
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(_signum, _frame):
                raise KeyboardInterrupt
            self._previous = signal.signal(signal.SIGTERM, handler)

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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
