"""One lifecycle for everything that trains on this machine's device: a run, a race, an LR sweep.

    take the device now, or wait in its queue   ->  hold it, with a heartbeat, while the work runs
    ->  a final state however the work ends      ->  the device released the moment it ends

The CLI, the pages (through the background processes they start), the race, comparisons and the LR
finder all go through here: it is the only module that takes the device lock (engine/runs/locks.py)
or joins its queue (engine/runs/queue.py), so a lock is never held past the work that took it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from engine.core.errors import EngineError, RunError
from engine.runs.locks import DeviceLock, device_lock
from engine.runs.process import Heartbeat
from engine.runs.queue import CancelledInQueue, device_queue, in_line, wait_for_device

__all__ = ["CancelledInQueue", "final_status", "holding_the_device", "in_line", "recorded_end", "sigterm_as_interrupt",
           "take_the_device_now"]


def take_the_device_now(device: str, holder: str) -> DeviceLock:
    """The device, now, for work in the foreground: refused when busy or when others wait in line for it
    (a background start joins the line instead). ``holder``: who holds it, as the others are told."""
    waiting = len(device_queue(device).line())
    if waiting:
        raise RunError(f"{waiting} training{'s wait' if waiting > 1 else ' waits'} in line for this device; "
                       "add --background to join the queue.")
    lock = device_lock(device, holder=holder)
    lock.acquire()
    return lock


@contextmanager
def holding_the_device(device: str, holder: str, line_name: str, *, lock: DeviceLock | None = None,
                       wait: bool = False, cancelled: Callable[[], bool] = lambda: False,
                       report: Callable[[int, str], None] = lambda _position, _ahead: None) -> Iterator[DeviceLock]:
    """The device for the body of the ``with``, released when it ends however it ends.

    ``lock``: one the caller already holds (the CLI takes it before it writes anything, so a refused
    start leaves nothing on disk). Else ``wait``: join the device's queue as ``line_name``, ``report``
    saying the place in line (1: next) and the work ahead; ``cancelled()`` leaves the line with
    CancelledInQueue. Without ``wait`` a busy device is refused (RunError) before the body runs."""
    held = lock or device_lock(device, holder=holder)
    if lock is None and wait:
        wait_for_device(held, device_queue(device), line_name, cancelled=cancelled, report=report)
    elif lock is None:
        held.acquire()
    try:
        yield held
    finally:
        held.release()


@contextmanager
def recorded_end(end: Callable[[str, str], None], heartbeat: Callable[..., Any],
                 translate: Callable[[OSError], EngineError] | None = None) -> Iterator[None]:
    """While the work runs: a heartbeat (``heartbeat(heartbeat=now)`` every few seconds), and SIGTERM
    ends it as Ctrl-C does. However it ends early, ``end(state, reason)`` records why, once: cancelled
    (Ctrl-C, a termination signal), failed (an engine error; ``translate``: an OSError said as one, e.g.
    a full disk; anything else as an internal error). The error goes on to the caller."""
    try:
        with sigterm_as_interrupt(), Heartbeat(heartbeat):
            yield
    except KeyboardInterrupt:
        end("cancelled", "stopped by Ctrl-C or a termination signal")
        raise
    except EngineError as exc:
        end("failed", str(exc))
        raise
    except OSError as exc:
        if translate is None:
            end("failed", f"internal error ({type(exc).__name__}); see log.txt")
            raise
        error = translate(exc)
        end("failed", str(error))
        raise error from exc
    except BaseException as exc:
        end("failed", f"internal error ({type(exc).__name__}); see log.txt")
        raise


def final_status(write: Callable[..., Any], **fields: Any) -> None:
    """Record how work ended, with the time; best effort (a full disk must not hide the original error)."""
    try:
        write(finished_at=time.time(), **fields)
    except OSError:
        pass


class sigterm_as_interrupt:
    """SIGTERM (a stop from the OS or a process manager) ends the work like Ctrl-C: cancelled."""

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
