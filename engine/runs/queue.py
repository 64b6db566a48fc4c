"""A first-come queue for the device: a second training waits its turn instead of being refused.

One ticket file per waiting process in the machine-wide lock folder (``queue-<device>/``), named by
the time it joined, so every runs folder and every user on the machine shares one line. A ticket
names its process (pid and kernel start time): a waiter that was killed leaves the line by itself,
since readers skip tickets whose process is gone. Only the first live ticket may take the device
lock, so the line is served in order; a training started in the foreground from the command line
never jumps it (it is refused while others wait).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import RunError
from engine.core.files import loads_bounded
from engine.runs.locks import DeviceLock
from engine.runs.process import process_start

POLL_S = 0.5  # how often a waiter looks at the line (a freed device is taken within this)
BEAT_S = 5.0  # a waiter refreshes its run's status at least this often (its heartbeat)


class CancelledInQueue(RunError):
    """The run was cancelled while it waited; nothing was trained."""


@dataclass(frozen=True)
class Ticket:
    path: Path
    pid: int
    pid_start: str | None
    run: str  # the run folder it is for (shown to the others in line)

    @property
    def alive(self) -> bool:
        from engine.runs.process import pid_alive

        return pid_alive(self.pid) and process_start(self.pid) in (None, self.pid_start)


class DeviceQueue:
    """The line of trainings waiting for one device (``device``: "cpu", "cuda")."""

    def __init__(self, device: str, lock_dir: str | Path | None = None):
        from engine.core.paths import lock_dir as default_lock_dir

        self.folder = Path(lock_dir or default_lock_dir()) / f"queue-{device.replace(':', '_')}"

    def join(self, run: str) -> Ticket:
        """Enter at the back of the line (the ticket's name sorts by the time it was taken)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        ticket = Ticket(self.folder / f"{time.time_ns():020d}-{pid}.json", pid, process_start(pid), run)
        tmp = ticket.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": ticket.pid, "pid_start": ticket.pid_start, "run": run}))
        os.replace(tmp, ticket.path)  # a reader never sees half a ticket
        return ticket

    def line(self) -> list[Ticket]:
        """The live tickets, first come first; tickets of dead processes are removed on the way."""
        tickets = []
        try:
            names = sorted(p for p in self.folder.glob("*.json"))
        except OSError:
            return []
        for path in names:
            ticket = _read_ticket(path)
            if ticket is None:
                continue
            if ticket.alive:
                tickets.append(ticket)
            else:
                path.unlink(missing_ok=True)  # its process died while waiting
        return tickets

    def ahead_of(self, ticket: Ticket) -> list[Ticket]:
        return [t for t in self.line() if t.path.name < ticket.path.name]

    def leave(self, ticket: Ticket) -> None:
        ticket.path.unlink(missing_ok=True)


def _read_ticket(path: Path) -> Ticket | None:
    try:
        data = loads_bounded(path.read_text())
        return Ticket(path, int(data["pid"]), data.get("pid_start"), str(data.get("run", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # being written, or not ours: ignored


def device_queue(device: str = "auto") -> DeviceQueue:
    """The machine-wide line for the device a setting names ("auto", "cpu", "cuda:1")."""
    from engine.core.device import resolve_device

    return DeviceQueue(resolve_device(device).type)


def in_line(position: int, ahead: str) -> str:
    """A waiter's place, as its status says it (a run's, a background LR sweep's)."""
    return f"number {position} in line for the device, behind {ahead}"


def wait_for_device(lock: DeviceLock, queue: DeviceQueue, run_name: str, *,
                    cancelled: Callable[[], bool], report: Callable[[int, str], None],
                    poll_s: float = POLL_S) -> None:
    """Wait in line until ``lock`` is ours; returns holding it.

    ``report(position, ahead)`` is called when the position changes and every BEAT_S seconds
    (1: next; ``ahead``: the run in front, in words). ``cancelled()`` is checked at every poll:
    a cancel leaves the line and raises CancelledInQueue.
    """
    ticket = queue.join(run_name)
    try:
        last: tuple[int, str] | None = None
        last_beat = 0.0
        while True:
            if cancelled():
                raise CancelledInQueue("cancelled while waiting in the queue; nothing was trained")
            ahead = queue.ahead_of(ticket)
            if not ahead:
                try:
                    lock.acquire()
                    return
                except RunError:
                    pass  # the device is still busy with the training in front of the line
            now = time.monotonic()
            position = (len(ahead) + 1, _holder(lock) if not ahead else Path(ahead[-1].run).name)
            if position != last or now - last_beat >= BEAT_S:
                report(*position)
                last, last_beat = position, now
            time.sleep(poll_s)
    finally:
        queue.leave(ticket)


def _holder(lock: DeviceLock) -> str:
    """Who holds the device, as its lock file says (e.g. "run 2026...-ab12, pid 123")."""
    try:
        return lock.path.read_text().strip() or "another training"
    except OSError:
        return "another training"
