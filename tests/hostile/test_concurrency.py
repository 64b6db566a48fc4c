"""Two users, two processes, one machine: one training per device, status never lost, crashes detected."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine.config import TrainConfig
from engine.core.errors import RunError
from engine.runs.locks import DeviceLock
from engine.runs.process import process_start
from engine.runs.status import ACTIVE_STATES, Progress
from engine.runs.store import create_run, list_runs, open_run
from tests.conftest import ROOT
from tests.hostile._cli import TINY_TRAIN, engine

LONG = [*TINY_TRAIN[:-2], "--seed", "0", "--epochs", "60", "--max-per-class", "40"]


def _as_from_a_terminal() -> None:
    """In the child: Ctrl-C arrives, as in a terminal. A suite started in the background (`make test &`,
    nohup, some CI runners) ignores SIGINT, and an ignored signal stays ignored across exec, so the
    training would never see the test's Ctrl-C (it then trained to the end and exited 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn_train(out, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", "train", *LONG, "--out", str(out), *extra],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, preexec_fn=_as_from_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_training(out, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = list_runs(out)
        if runs and (runs[0].status().progress or Progress()).step:
            return runs[0]
        time.sleep(0.2)
    raise AssertionError("the training never started")


@pytest.fixture
def training(tmp_path):
    proc = _spawn_train(tmp_path / "a")
    run = _wait_training(tmp_path / "a")
    yield proc, run
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_two_runs_folders_cannot_train_on_one_device_at_once(tmp_path, training):
    second = engine("train", *TINY_TRAIN, "--epochs", "1", "--out", str(tmp_path / "b"))
    second.assert_one_line_error("Another training is using this device")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def _until(check, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


def test_background_starts_on_a_busy_device_wait_in_line_in_order_and_a_queued_one_can_be_cancelled(
        tmp_path, training):
    """Not refused: a second and third request queue (positions 1 and 2); a foreground start cannot jump the
    line; cancelling the first moves the second up; when the device frees, the second trains by itself."""
    from engine.runs.background import request_cancel, wait_for

    proc, _busy = training
    queued = []
    for _ in range(2):
        started = engine("train", *TINY_TRAIN, "--epochs", "1", "--out", str(tmp_path / "b"), "--background", "--json")
        assert started.rc == 0, started.err[-1500:]
        assert json.loads(started.out)["queued"] is True
        queued.append(open_run(tmp_path / "b", json.loads(started.out)["run_id"]))
    first, second = queued
    _until(lambda: (first.status().queue_position, second.status().queue_position) == (1, 2), "positions 1 and 2")
    assert first.status().state == second.status().state == "queued"
    assert "number 2 in line for the device, behind" in second.status().reason

    jumper = engine("train", *TINY_TRAIN, "--epochs", "1", "--out", str(tmp_path / "c"))
    jumper.assert_one_line_error("2 trainings wait in line for this device")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())

    request_cancel(first)
    _until(lambda: first.status().state == "cancelled", "the queued run cancelled", timeout=30)
    assert "waiting in the queue" in first.status().reason and not first.metrics()
    _until(lambda: second.status().queue_position == 1, "the second moved up", timeout=30)

    proc.kill()  # the device is freed (a crash releases it like a normal end)
    proc.wait()
    final = wait_for(second, timeout_s=240)
    assert final.state == "finished", final
    assert [m["epoch"] for m in second.metrics()] == [1] and final.queue_position is None


def test_resuming_a_running_run_is_refused_and_changes_nothing(tmp_path, training):
    _proc, run = training
    before = run.config_path.read_bytes()
    again = engine("train", "--resume", run.run_id, "--epochs", "99", "--out", str(tmp_path / "a"))
    again.assert_one_line_error("already running")
    assert run.config_path.read_bytes() == before
    assert len(list_runs(tmp_path / "a")) == 1


def test_a_lock_held_by_a_killed_training_is_taken_over(tmp_path, training):
    proc, run = training
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run.status().state == "interrupted"
    ok = engine("train", *TINY_TRAIN, "--epochs", "1", "--out", str(tmp_path / "b"), "--json")
    assert ok.rc == 0, ok.err[-1500:]
    assert json.loads(ok.out)["status"] == "finished"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_is_cancelled_not_failed_and_resumable(tmp_path, training, sig):
    proc, run = training
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not run.metrics():
        time.sleep(0.2)  # let one epoch commit
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err[-2000:]
    assert proc.returncode == 130, (proc.returncode, err[-1000:])
    status = run.status()
    assert status.state == "cancelled", status
    done = len(run.metrics())
    config = json.loads(run.config_path.read_text())
    config["epochs"] = done + 1
    run.config_path.write_text(json.dumps(config))
    resumed = engine("train", "--resume", run.run_id, "--out", str(tmp_path / "a"), "--json")
    assert resumed.rc == 0, resumed.err[-1500:]
    assert [m["epoch"] for m in run.metrics()] == list(range(1, done + 2))


def test_two_resumes_of_one_interrupted_run_at_once_one_wins(tmp_path):
    out = tmp_path / "runs"
    first = engine("train", *TINY_TRAIN, "--epochs", "2", "--out", str(out), "--json",
                   env={"WORKBENCH_FAULT": "kill:last_state.pt:before:2"})
    assert first.rc == -9
    run = list_runs(out)[0]
    procs = [subprocess.Popen([sys.executable, "-m", "engine", "train", "--resume", run.run_id, "--out", str(out)],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "Traceback" not in refused and ("Another training" in refused or "already running" in refused), refused
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    assert run.status().state == "finished"


_WRITER = """
import sys
sys.path.insert(0, {root!r})
from engine.runs.store import RunDir
from pathlib import Path
run = RunDir(Path(sys.argv[1]))
for i in range(150):
    run.write_status(**{{f"{{sys.argv[2]}}{{i}}": i}})
"""


def test_status_writes_from_two_processes_lose_nothing(tmp_path):
    run = create_run(tmp_path, TrainConfig().to_dict())
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(root=str(ROOT)))
    procs = [subprocess.Popen([sys.executable, str(script), str(run.path), tag]) for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    status = json.loads(run.status_path.read_text())
    assert all(f"a{i}" in status and f"b{i}" in status for i in range(150))


def test_a_reused_pid_is_not_mistaken_for_the_training(tmp_path):
    run = create_run(tmp_path, TrainConfig().to_dict())
    run.write_status(state="running", pid=os.getpid(), pid_start="1")  # alive pid, another process's start time
    assert run.status().state == "interrupted"
    run.write_status(state="running", pid=os.getpid(), pid_start=process_start(os.getpid()))
    assert run.status().state == "running"


def test_a_stopped_heartbeat_reads_as_interrupted(tmp_path):
    run = create_run(tmp_path, TrainConfig().to_dict())
    run.write_status(state="running", pid=os.getpid(), pid_start=process_start(os.getpid()),
                     heartbeat=time.time() - 3600)
    assert run.status().state == "interrupted"
    run.write_status(heartbeat=time.time())
    assert run.status().state in ACTIVE_STATES


def test_device_lock_names_its_holder(tmp_path):
    with DeviceLock(tmp_path, "cpu", holder="run abc"):
        with pytest.raises(RunError, match="run abc"):
            DeviceLock(tmp_path, "cpu").acquire()
        assert not DeviceLock(tmp_path, "cpu").is_free()
    assert DeviceLock(tmp_path, "cpu").is_free()


def test_deleting_a_running_run_is_refused(tmp_path, training):
    from engine.runs.store import delete_run

    _proc, run = training
    with pytest.raises(RunError, match="still running"):
        delete_run(open_run(tmp_path / "a", run.run_id))
    assert run.config_path.is_file()
