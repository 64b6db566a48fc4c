"""The device queue: first come first served, a dead waiter leaves the line, a cancel leaves it at once."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from engine.runs.locks import DeviceLock
from engine.runs.queue import CancelledInQueue, DeviceQueue, wait_for_device
from tests.conftest import ROOT


def _waiter(tmp_path, name: str, order: list[str], cancel: threading.Event, positions: dict[str, list[int]]):
    def run() -> None:
        lock = DeviceLock(tmp_path, "cpu", holder=name)
        try:
            wait_for_device(lock, DeviceQueue("cpu", tmp_path), name, cancelled=cancel.is_set,
                            report=lambda pos, _ahead: positions.setdefault(name, []).append(pos), poll_s=0.02)
        except CancelledInQueue:
            order.append(f"{name} cancelled")
            return
        order.append(name)
        time.sleep(0.1)  # "trains"
        lock.release()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_waiters_get_the_device_in_the_order_they_came_and_a_cancel_leaves_the_line(tmp_path):
    order: list[str] = []
    positions: dict[str, list[int]] = {}
    cancels = {n: threading.Event() for n in "abc"}
    queue = DeviceQueue("cpu", tmp_path)
    with DeviceLock(tmp_path, "cpu", holder="the training now"):
        threads = []
        for name in "abc":
            threads.append(_waiter(tmp_path, name, order, cancels[name], positions))
            deadline = time.monotonic() + 10
            while (len(queue.line()) < len(threads) or name not in positions) and time.monotonic() < deadline:
                time.sleep(0.01)  # each joins (and says its place) before the next, so the order is known
        assert [t.run for t in queue.line()] == ["a", "b", "c"]
        cancels["b"].set()
        deadline = time.monotonic() + 10
        while len(queue.line()) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [t.run for t in queue.line()] == ["a", "c"]
    for thread in threads:
        thread.join(timeout=20)
    assert order == ["b cancelled", "a", "c"]
    assert positions["a"][0] == 1 and positions["c"][0] == 3 and positions["c"][-1] in (1, 2)
    assert queue.line() == [] and not list(queue.folder.glob("*.json"))  # every ticket gone


def test_a_waiter_killed_in_line_does_not_hold_up_the_ones_behind_it(tmp_path):
    queue = DeviceQueue("cpu", tmp_path)
    code = (f"import sys, time; from engine.runs.queue import DeviceQueue; "
            f"DeviceQueue('cpu', {str(tmp_path)!r}).join('killed'); print('in line', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "in line"
        mine = queue.join("mine")
        assert [t.run for t in queue.ahead_of(mine)] == ["killed"]
    finally:
        proc.kill()
        proc.wait()
    assert queue.ahead_of(mine) == []  # its ticket is skipped and swept
    assert [json.loads(p.read_text())["run"] for p in queue.folder.glob("*.json")] == ["mine"]


def test_a_torn_or_foreign_ticket_is_ignored(tmp_path):
    queue = DeviceQueue("cpu", tmp_path)
    queue.folder.mkdir(parents=True)
    (queue.folder / "00000000000000000001-1.json").write_text("{not json")
    (queue.folder / "00000000000000000002-1.json").write_text(json.dumps({"pid": "x"}))
    mine = queue.join("mine")
    assert queue.ahead_of(mine) == []
    queue.leave(mine)
    lock = DeviceLock(tmp_path, "cpu")
    wait_for_device(lock, queue, "mine2", cancelled=lambda: False, report=lambda *_: None, poll_s=0.01)
    lock.release()  # it got the device at once: the torn tickets held nobody up


def test_cancel_before_the_turn_raises_and_leaves_no_ticket(tmp_path):
    queue = DeviceQueue("cpu", tmp_path)
    with DeviceLock(tmp_path, "cpu"), pytest.raises(CancelledInQueue, match="waiting in the queue"):
        wait_for_device(DeviceLock(tmp_path, "cpu"), queue, "x", cancelled=lambda: True, report=lambda *_: None)
    assert queue.line() == []


def test_a_waiter_that_exited_unreaped_holds_nobody_up_and_its_lock_is_free(tmp_path):
    """A process that took a ticket and the lock, then exited without leaving either, and was never
    waited on (a zombie, as an app that forgot to reap its child keeps it): the line skips it, the
    lock is free, and a run it was training reads as interrupted, not running."""
    import os

    from engine.runs.process import pid_alive, process_start
    from engine.runs.store import create_run

    code = (f"import time; from engine.runs.queue import DeviceQueue; from engine.runs.locks import DeviceLock; "
            f"DeviceQueue('cpu', {str(tmp_path)!r}).join('exited'); DeviceLock({str(tmp_path)!r}, 'cpu').acquire(); "
            f"print('holding', flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "holding"
        started = process_start(proc.pid)
        deadline = time.monotonic() + 30
        while _state(proc.pid) != "Z" and time.monotonic() < deadline:  # exited, not waited on
            time.sleep(0.05)
        assert _state(proc.pid) == "Z"
        assert not pid_alive(proc.pid)  # os.kill(pid, 0) alone would say alive
        assert DeviceQueue("cpu", tmp_path).line() == []
        assert DeviceLock(tmp_path, "cpu").is_free()  # the kernel dropped its flock when it exited
        run = create_run(tmp_path / "runs", {"model": "timm:test_resnet", "data": "digits"})
        run.write_status(state="running", pid=proc.pid, pid_start=started, heartbeat=time.time())
        assert run.status().state == "interrupted"
        assert os.path.exists(f"/proc/{proc.pid}")  # still a zombie all along
    finally:
        proc.wait()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][:1]
    except OSError:
        return ""
