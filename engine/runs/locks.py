"""One training per device per machine, whatever runs folder it writes to."""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from engine.core.errors import RunError

ACQUIRE_TRIES = 3  # over ~40 ms, so a probe of the lock never refuses a real start


class DeviceLock:
    """One training per device on this machine: an exclusive flock in the machine-wide lock folder
    (``paths.lock_dir()``), whatever runs folder a training writes to. The OS drops a flock when
    its process dies, so a crashed holder's lock is simply taken over by the next training."""

    def __init__(self, lock_dir: str | Path | None, device: str, holder: str = ""):
        from engine.core.paths import lock_dir as default_lock_dir

        self.path = Path(lock_dir or default_lock_dir()) / f"train-{device.replace(':', '_')}.lock"
        self.holder = holder
        self._fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        for attempt in range(ACQUIRE_TRIES):
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if attempt + 1 < ACQUIRE_TRIES:
                    time.sleep(0.02)  # a probe (is_free, busy) holds it for microseconds: look again
                    continue
                fh.seek(0)
                holder = fh.read().strip()
                fh.close()
                raise RunError(f"Another training is using this device ({holder or 'unknown run'}); "
                               "wait for it or cancel it.") from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"{self.holder + ', ' if self.holder else ''}pid {os.getpid()}")
        fh.flush()
        self._fh = fh

    def is_free(self) -> bool:
        """Could a training start now?"""
        return not self.busy()

    def busy(self) -> bool:
        """Is a training holding it now? A shared-lock probe that writes nothing (the app asks at
        every rerun)."""
        try:
            with open(self.path) as fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                return False
        except OSError:  # never taken on this machine
            return False

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "DeviceLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def device_lock(device: str = "auto", holder: str = "") -> DeviceLock:
    """The machine-wide lock of the device a setting names ("auto", "cpu", "cuda:1")."""
    from engine.core.device import resolve_device

    return DeviceLock(None, resolve_device(device).type, holder)


def ensure_device_free(device: str = "auto") -> None:
    """Refuse now, before anything is written, when another training holds the device."""
    if not device_lock(device).is_free():
        raise RunError("Another training is using this device; wait for it to finish or cancel it.")
