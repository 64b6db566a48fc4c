"""Runs trained in their own process, so closing a browser tab never stops them."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import RunError
from engine.core.paths import PROJECT_ROOT
from engine.runs.process import process_start
from engine.runs.status import ACTIVE_STATES, RunStatus

if TYPE_CHECKING:
    from engine.runs.store import RunDir


def request_cancel(run: RunDir) -> None:
    run.cancel_path.write_text(str(time.time()))


# Background work yields the CPU to the people clicking: on a shared 2-core server the app's page
# reruns come first, a training takes what is left (engine/__main__.py applies it before any thread).
BACKGROUND_NICE = 10


def spawn_engine(args: list[str], log_path: Path) -> int:
    """``python -m engine ARGS`` in its own process session, at lower CPU priority; returns the pid.

    Its own session: closing a browser tab or restarting a page never kills it; status and
    progress are read back from run directories. The child is reaped the moment it exits
    (``reap_when_done``): never waited on, an ended sweep, race or comparison stayed a zombie under the
    app's server until the next spawn.
    """
    project_root = PROJECT_ROOT
    env = {**os.environ, "WORKBENCH_NICE": str(BACKGROUND_NICE), "PYTHONPATH": os.pathsep.join(
        [str(project_root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", *args], cwd=project_root, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env=env,
        )
    reap_when_done(proc)
    return proc.pid


def reap_when_done(proc: subprocess.Popen) -> threading.Thread:
    """Wait on ``proc`` from a daemon thread, so the kernel's record of it goes as soon as it exits.

    Why a thread per child and not a SIGCHLD handler: a handler can only be installed from the main
    thread, which belongs to the app's server (Streamlit), and reaping every child there would steal
    the exit status of processes other code waits on. The thread holds nothing else: a server that
    stops does not wait for it (daemon), and the child, in its own session, trains on."""
    thread = threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True)
    thread.start()
    return thread


def spawn_queued(runs: list[RunDir], engine_args: list[str]) -> int:
    """Work on ``runs`` in its own process (``python -m engine <engine_args>``), which waits in the
    machine's queue for the device when it is busy; returns the pid. Every run reads "queued" before the
    process exists (a cancel left from an earlier attempt is not for this one), then names it."""
    for run in runs:
        run.cancel_path.unlink(missing_ok=True)
        run.write_status(state="queued", pid=None, reason="", queue_position=None)
    pid = spawn_engine(engine_args, runs[0].log_path)
    for run in runs:
        run.write_status(pid=pid, pid_start=process_start(pid))
    return pid


def start_background(run: RunDir, runs_root: str | Path, *, resume: bool = False) -> int:
    """Train ``run`` in its own process (``python -m engine train --run-dir``); ``resume``: from its last
    commit (a resume the caller has checked and extended). Returns the pid."""
    return spawn_queued([run], ["train", "--run-dir", str(run.path), "--out", str(runs_root)]
                        + (["--resume-existing"] if resume else []))


def start_group_background(runs: list[RunDir], runs_root: str | Path) -> int:
    """Train a comparison's runs one after another in one background process."""
    return spawn_queued(runs, ["compare", "--group", runs[0].config()["group"], "--out", str(runs_root)])


def wait_for(run: RunDir, timeout_s: float = 600, poll_s: float = 0.25) -> RunStatus:
    """Block until the run leaves the active states (for tests and scripts). A folder whose status is
    not written yet is a run being created (create_run writes config.json, then status.json), not a
    run in an unknown state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = run.status() if run.status_path.is_file() else None
        if status is not None and status.state not in ACTIVE_STATES:
            return status
        time.sleep(poll_s)
    raise RunError(f"Run {run.run_id} did not finish within {timeout_s:.0f} s.")
