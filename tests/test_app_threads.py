"""The app drops to one torch thread while a training holds the CPU, and gets the default back after."""
from __future__ import annotations

import fcntl
import os
import threading

import torch

from engine.runs.locks import DeviceLock, device_lock
from ui.threads import IDLE_THREADS, app_threads, set_app_threads


def test_one_thread_while_a_training_holds_the_cpu_and_the_default_after():
    before = torch.get_num_threads()
    try:
        assert app_threads() == IDLE_THREADS
        with device_lock("cpu", holder="a training"):
            assert device_lock("cpu").busy()
            assert set_app_threads() == 1 and torch.get_num_threads() == 1
        assert not device_lock("cpu").busy()
        assert set_app_threads() == IDLE_THREADS and torch.get_num_threads() == IDLE_THREADS
    finally:
        torch.set_num_threads(before)


def test_probing_the_lock_writes_nothing_and_never_refuses_a_real_start(tmp_path):
    lock = DeviceLock(tmp_path, "cpu", holder="run x")
    assert not lock.busy() and not lock.path.exists()  # probing never creates the file
    with lock:
        text = lock.path.read_text()
        assert DeviceLock(tmp_path, "cpu").busy() and lock.path.read_text() == text == f"run x, pid {os.getpid()}"
    with open(lock.path) as probe:  # a probe holding its shared lock for a moment...
        fcntl.flock(probe.fileno(), fcntl.LOCK_SH)
        threading.Timer(0.01, lambda: fcntl.flock(probe.fileno(), fcntl.LOCK_UN)).start()
        with DeviceLock(tmp_path, "cpu", holder="run y") as taken:  # ...does not refuse the start
            assert "run y" in taken.path.read_text()
