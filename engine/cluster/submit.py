"""``python -m engine train ... --cluster URL``: a run trained on a Ray cluster, in order.

    the cluster reached and its Ray checked, the data planned      (refusals: one line, nothing written)
    the run folder created here, its status naming cluster and job  (before the job exists: a crash
                                                                     right after submitting is re-attached)
    the stage built and submitted as a Ray job                      (engine/cluster/stage.py, client.py)
    its log followed into the run folder until the job ends         (engine/cluster/follow.py)

A resume (``--resume RUN``) sends the run's last commit with the job and continues it there, as a new
job of the same run (``attempt`` counts them; each job's id is ``workbench-<run>-<attempt>``). A run
whose job still runs is attached to instead of submitted again.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cluster.client import TERMINAL, check_cluster, connect, job_state, submit
from engine.cluster.follow import Follower
from engine.cluster.stage import build_stage, plan_data
from engine.core.errors import RunError
from engine.core.files import read_json
from engine.runs.events import no_emit
from engine.runs.process import process_start
from engine.runs.store import RunDir, create_run
from engine.training.loop import RunResult

if TYPE_CHECKING:
    from engine.runs.events import Emit


def cluster_record(run: RunDir) -> dict[str, Any]:
    """status.json's ``cluster``: address, job_id, attempt, ray, applied_seq ({} for a run trained here)."""
    status = read_json(run.status_path, {}) or {}
    record = status.get("cluster") if isinstance(status, dict) else None
    return dict(record) if isinstance(record, dict) else {}


def train_on_cluster(address: str, *, config: dict[str, Any], out: str | Path | None = None,
                     run: RunDir | None = None, resume: bool = False, attach: bool = True,
                     emit: Emit = no_emit) -> tuple[RunDir, RunResult]:
    """Submit (or attach to) the run's job on ``address`` and follow it to its end. ``attach``: a job of
    the run that ended while nobody read it is followed again (its log replays); a resume says False,
    since the run it continues is queued again and its last job ended. A job still running is always
    attached to: never two jobs of one run at a time."""
    started = time.perf_counter()
    version = check_cluster(address)  # unreachable or too old: one line, before anything is written
    client = connect(address)
    record = cluster_record(run) if run is not None else {}
    if run is not None and record.get("job_id") and record.get("address") == address:
        state, _ = _state_or_none(client, record["job_id"])
        if state is not None and (state not in TERMINAL or (attach and _unended(run))):
            return run, _follow(run, client, record, address, emit, started)
    plan = plan_data(str(config["data"]))  # too big to ship, or not here and not a cluster path
    created = run is None
    if run is None:
        run = create_run(out or ".", config, owner=os.getpid())
    elif resume:
        _align_metrics(run)
    attempt = int(record.get("attempt") or 0) + 1
    job_id = f"workbench-{run.run_id}-{attempt}"
    record = {"address": address, "job_id": job_id, "attempt": attempt, "ray": version, "applied_seq": -1}
    run.cancel_path.unlink(missing_ok=True)
    run.write_status(state="queued", reason=f"submitting to the Ray cluster {address} as job {job_id}",
                     cluster=record, pid=os.getpid(), pid_start=process_start(os.getpid()), heartbeat=time.time(),
                     queue_position=None)
    stage = Path(tempfile.mkdtemp(prefix="workbench-stage-"))
    try:
        build_stage(stage, run, run.config(), plan, attempt=attempt, resume=resume)
        submit(client, str(stage), job_id, {"workbench_run": run.run_id, "attempt": str(attempt)})
    except BaseException:
        if created:  # nothing was trained: leave nothing behind
            shutil.rmtree(run.path, ignore_errors=True)
        else:
            run.write_status(state="failed", reason="the cluster job could not be submitted", finished_at=time.time())
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return run, _follow(run, client, record, address, emit, started)


def check_start(address: str, config: dict[str, Any]) -> str:
    """What a cluster run needs before anything is written (the app's Start, the CLI's ``--background``):
    the cluster reached and its Ray checked, the data planned; each refusal one line. Returns the
    cluster's Ray version."""
    version = check_cluster(address)
    plan_data(str(config.get("data") or ""))
    return version


def start_in_background(run: RunDir, runs_root: str | Path, address: str, *, resume: bool = False) -> int:
    """A background follower (``train --run-dir RUN --cluster URL``) that submits ``run`` to ``address`` and
    follows it; returns its pid. The run names its cluster from the first moment (before the process
    exists), so no page ever counts it as waiting for this machine's device."""
    from engine.runs.background import spawn_queued

    record = cluster_record(run)
    run.write_status(cluster={**record, "address": address})
    return spawn_queued([run], ["train", "--run-dir", str(run.path), "--out", str(runs_root), "--cluster", address]
                        + (["--resume-existing"] if resume else []))


def cancel_run(run: RunDir, emit: Emit = no_emit) -> str:
    """Cancel a cluster run whose follower is gone (the app or the machine restarted): a follower attached
    here stops its job and reads back what the job hands over as it stops (the last finished epoch), then
    records the end. A run whose job was never submitted just ends. Returns the run's state."""
    from engine.runs.background import request_cancel

    record = cluster_record(run)
    address, job_id = str(record.get("address") or ""), str(record.get("job_id") or "")
    request_cancel(run)  # the follower's first look stops the job
    check_cluster(address)
    client = connect(address)
    state, _ = _state_or_none(client, job_id) if job_id else (None, "")
    if state is None:
        run.write_status(state="cancelled", reason="cancelled before its cluster job was submitted",
                         finished_at=time.time())
        return "cancelled"
    return _follow(run, client, record, address, emit, time.perf_counter()).status


def _unended(run: RunDir) -> bool:
    """status.json still says queued or running: the follower that wrote it never recorded an end."""
    from engine.runs.status import ACTIVE_STATES, RunStatus

    return RunStatus.from_dict(read_json(run.status_path, {})).state in ACTIVE_STATES


def orphaned(runs_root: str | Path) -> list[tuple[RunDir, str]]:
    """Cluster runs whose follower is gone before recording an end (the app or the machine restarted),
    with their cluster's address: the app starts a follower for each (``reattach``)."""
    from engine.runs.store import list_runs

    found = []
    for run in list_runs(runs_root):
        record = cluster_record(run)
        address = record.get("address")
        if isinstance(address, str) and record.get("job_id") and _unended(run) and \
                run.status().state == "interrupted":
            found.append((run, address))
    return found


def reattach(run: RunDir, address: str, runs_root: str | Path) -> int:
    """A background follower for ``run`` (``train --run-dir RUN --cluster URL``: it attaches to the run's
    job instead of submitting one); returns its pid."""
    from engine.runs.background import spawn_engine

    pid = spawn_engine(["train", "--run-dir", str(run.path), "--out", str(runs_root), "--cluster", address],
                       run.log_path)
    run.write_status(pid=pid, pid_start=process_start(pid), heartbeat=time.time())
    return pid


def _state_or_none(client: Any, job_id: str) -> tuple[str | None, str]:
    try:
        return job_state(client, job_id)
    except Exception:  # never submitted (the app stopped between recording and submitting), or forgotten
        return None, ""


def _align_metrics(run: RunDir) -> None:
    """Before a resume: metrics.jsonl exactly the epochs of the last commit that came back (a job that
    died may have sent an epoch's line but not its commit)."""
    from engine.training.checkpoint import read_commit

    commit = read_commit(run)
    if commit.get("history") is not None:
        run.rewrite_metrics(list(commit["history"]))


def _follow(run: RunDir, client: Any, record: dict[str, Any], address: str, emit: Emit, started: float) -> RunResult:
    follower = Follower(run, client, record["job_id"], address, emit, applied=int(record.get("applied_seq", -1)))
    try:
        state = follower.follow()
    except KeyboardInterrupt:
        try:
            client.stop_job(record["job_id"])
        except Exception:
            pass
        run.write_status(state="cancelled", reason="stopped by Ctrl-C; the cluster job was stopped",
                         finished_at=time.time())
        raise
    status = run.status()
    history = run.metrics()
    if state not in ("finished", "cancelled", "failed", "diverged"):
        raise RunError(f"the cluster run ended in an unknown state {state}")
    return RunResult(status=status.state, reason=status.reason, run_dir=str(run.path), best_epoch=status.best_epoch,
                     best_val_acc=status.best_val_acc, epochs_done=len(history),
                     seconds=time.perf_counter() - started, history=history, feature_cache=False)
