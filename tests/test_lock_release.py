"""Issue 25, point 2: the device is free the moment a sweep, a race or a comparison ends.

Each job is started from this process exactly as the app starts it (engine/runs/background.py: its
own process, never waited on by the page), left to finish, and then, within a few seconds: the
device lock is free, no zombie child remains under this process (the app's server), the queue is
empty and no run reads as running or waiting.
"""
from __future__ import annotations

import time

import psutil
import pytest

from engine.config import TrainConfig
from engine.freeze.plan import FreezePlan
from engine.runs.locks import device_lock
from engine.runs.queue import device_queue
from engine.runs.store import active_runs

TINY = dict(model="timm:test_resnet", weights="none", data="digits", image_size=32, batch_size=16,
            max_per_class=10, num_workers=0)
SETTLE_S = 5.0  # "within 5 s after it ends" (issue 25, point 2)
JOB_S = 240.0  # a tiny job, but several engineers' tests may share two cores


def _child_state(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"


def _zombies() -> list[int]:
    return [c.pid for c in psutil.Process().children() if _child_state(c.pid) == psutil.STATUS_ZOMBIE]


def _wait_until(ended, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ended():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.1)


def _assert_released(pid: int, runs_root=None) -> None:
    """What the pages read: the lock, the line, the runs; and what the server holds: its children."""
    _wait_until(lambda: _child_state(pid) == "gone", SETTLE_S, f"the job's process {pid} being reaped")
    assert device_lock("cpu").is_free() and device_lock("auto").is_free()
    assert device_queue("auto").line() == []
    assert pid not in _zombies() and _zombies() == []
    if runs_root is not None:
        assert active_runs(runs_root) == []


def test_a_finished_background_sweep_frees_the_device_and_leaves_no_zombie():
    from engine.lab.lr_find import start_sweep

    config = TrainConfig(**TINY, epochs=1, plan=FreezePlan.feature_extraction(head_lr=1e-2).to_dict())
    job = start_sweep(config, steps=10, start_lr=1e-4, end_lr=1.0)
    pid = job.read()["pid"]
    assert job.read()["pid_start"]  # a reaped child's pid can be reused: the sweep tells its own apart
    _wait_until(lambda: job.status().get("state") in ("finished", "failed", "cancelled", "interrupted"),
                JOB_S, "the sweep ending")
    assert job.status()["state"] == "finished", job.status()
    _assert_released(pid)
    assert job.status()["state"] == "finished"  # reaped, its result still reads as it was written


def test_a_finished_background_comparison_frees_the_device_and_leaves_no_zombie(tmp_path):
    from engine.lab.compare import create_comparison
    from engine.runs.background import start_group_background, wait_for

    plans = {"feature extraction": FreezePlan.feature_extraction(head_lr=1e-2), "full fine-tune": FreezePlan.default()}
    runs = create_comparison(tmp_path, TrainConfig(**TINY, epochs=1), plans)
    pid = start_group_background(runs, tmp_path)
    for run in runs:
        assert wait_for(run, timeout_s=JOB_S).state == "finished", run.status().reason
    _assert_released(pid, tmp_path)


def test_a_finished_background_race_frees_the_device_and_leaves_no_zombie(tmp_path):
    from engine.lab.race_process import start_race_background
    from engine.lab.race_registry import create_race, race_winner
    from engine.runs.background import wait_for

    runs = create_race(tmp_path, TrainConfig(**TINY), ("fe", "full"), 6.0)  # 2 rungs x 2 plans x 0.5 s and the set-up
    pid = start_race_background(runs, tmp_path)
    for run in runs:
        wait_for(run, timeout_s=JOB_S)
    assert race_winner(runs) is not None, [r.status().reason for r in runs]
    _assert_released(pid, tmp_path)


def test_a_reaped_sweep_whose_pid_now_belongs_to_another_process_reads_as_interrupted(tmp_path):
    """Reaped at once, a child's pid may be handed to a new process: the sweep's recorded start time
    tells them apart, so a dead sweep never reads as running (and holding the line) forever."""
    import subprocess
    import sys

    from engine.lab.lr_find import SweepJob
    from engine.runs.background import reap_when_done
    from engine.runs.process import process_start

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        job = SweepJob(tmp_path / "sweep.json")
        job.write(state="running", pid=other.pid, pid_start="1")  # a start time that is not this process's
        assert job.status()["state"] == "interrupted"
        job.write(pid_start=process_start(other.pid))
        assert job.status()["state"] == "running"  # the same process: alive
    finally:
        other.kill()
    reap_when_done(other).join(timeout=SETTLE_S)
    assert other.returncode is not None and _child_state(other.pid) == "gone"
    assert job.status()["state"] == "interrupted"
