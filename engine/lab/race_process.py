"""A race as a process holding the device (engine/lab/race.py runs it): ``train_race`` holds the
machine's device lock for the whole race, as one job (queued behind other trainings when asked to
wait), on the threads ``race_threads`` picks when its turn comes; ``start_race_background`` starts
one in its own process (``python -m engine race --group``). Whatever ends a race early, no run is
left reading "running".
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from engine.config import TrainConfig
from engine.lab.race import RaceResult, run_race
from engine.lab.race_estimate import race_threads, threads
from engine.lab.race_registry import leaderboard, race_spec
from engine.runs.store import RunDir


def train_race(runs: list[RunDir], *, lock: Any = None, wait: bool = False,
               say: Callable[[str], None] = lambda _line: None) -> RaceResult:
    """Run a race under the machine's device lock, held for the whole race as one job: ``wait``
    queues for it (every run's status says its place in line), otherwise a busy device is refused.
    Whatever ends the race early, no run is left reading "running" (engine/runs/lifecycle.py)."""
    from engine.runs.lifecycle import CancelledInQueue, holding_the_device, in_line, recorded_end
    from engine.runs.process import process_start

    device = TrainConfig.from_dict(runs[0].config()).device
    for run in runs:  # this process races them (started again with --group, an earlier pid is dead): a
        run.write_status(pid=os.getpid(), pid_start=process_start(os.getpid()))  # status follows the live one

    def write_all(**fields: Any) -> None:
        for run in runs:
            if run.status().active:
                run.write_status(**fields)

    def queued(position: int, ahead: str) -> None:
        write_all(state="queued", queue_position=position, heartbeat=time.time(), reason=in_line(position, ahead))

    try:
        with holding_the_device(device, f"race {runs[0].config_or_empty().get('group')}", str(runs[0].path),
                                lock=lock, wait=wait, cancelled=lambda: any(r.cancel_requested() for r in runs),
                                report=queued):
            count = race_threads()  # decided when its turn comes: the machine may have changed while it waited
            say(f"racing on {count} thread{'s' if count > 1 else ''} ({torch.get_num_threads()} available)")
            with recorded_end(lambda state, reason: _end_all(runs, state, reason), write_all), threads(count):
                return run_race(runs, say=say)
    except CancelledInQueue as exc:
        _end_all(runs, "cancelled", str(exc))
        return RaceResult(group=str(runs[0].config_or_empty().get("group")), status="cancelled", winner=None,
                          seconds=0.0, budget_s=float(race_spec(runs)["budget_s"]), leaderboard=leaderboard(runs))


def _end_all(runs: list[RunDir], state: str, reason: str) -> None:
    """Runs the race had not finished end as ``state`` (best effort: a full disk must not hide why)."""
    for run in runs:
        try:
            if run.status().active:
                run.write_status(state=state, reason=reason, finished_at=time.time())
        except OSError:
            pass


def start_race_background(runs: list[RunDir], runs_root: str | Path) -> int:
    """Race in its own process (``python -m engine race --group``), queued for the device like a
    training; returns the pid."""
    from engine.runs.background import spawn_queued

    return spawn_queued(runs, ["race", "--group", runs[0].config_or_empty()["group"], "--out", str(runs_root)])
