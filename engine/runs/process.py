"""Is a run's process still alive? pid, the kernel's start time of that pid, and a heartbeat.

A run whose process died reads as interrupted, never as running forever.
"""
from __future__ import annotations

import errno
import os
import time
from typing import Any, Callable

HEARTBEAT_S = 5.0  # a training process refreshes status.json at least this often
HEARTBEAT_STALE_S = 90.0  # no heartbeat for this long: the process is gone (another host, pid reused)


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_gone(pid: int | None, pid_start: str | None, heartbeat: float | None) -> bool:
    """The process recorded for an active run is gone: dead, its pid reused, or its heartbeat stopped."""
    if not isinstance(pid, int) or pid <= 0:
        return False  # queued, process not started yet
    if not pid_alive(pid):
        return True
    if pid_start and process_start(pid) not in (None, pid_start):
        return True
    return isinstance(heartbeat, (int, float)) and time.time() - heartbeat > HEARTBEAT_STALE_S


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    # a zombie (exited child not yet reaped) is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


class Heartbeat:
    """Refreshes status.json's heartbeat from a daemon thread while a run trains.

    Readers (any process) treat a run as interrupted once the beat is older than HEARTBEAT_STALE_S,
    even where they cannot see its pid. ``write_status`` is the run's (``RunDir.write_status``).
    """

    def __init__(self, write_status: Callable[..., None], every_s: float = HEARTBEAT_S):
        import threading

        self.write_status, self.every_s = write_status, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.write_status(heartbeat=time.time())
            except OSError:
                pass  # a full disk must not kill the training from this thread

    def __enter__(self) -> "Heartbeat":
        self.write_status(heartbeat=time.time(), pid=os.getpid(), pid_start=process_start(os.getpid()))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
