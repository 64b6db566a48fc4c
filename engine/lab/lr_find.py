"""The learning-rate finder: an exponential LR sweep on a fresh copy of the model, loss against LR.

Why a sweep: the learning rate is the setting that matters most and the one users guess. Raising it
step by step from far too small to far too large over a few hundred mini-batches shows the range
where the loss falls fastest (the LR to train with) and where it blows up (Smith 2015, "Cyclical
Learning Rates"; fastai's ``lr_find``).

What it respects: the run's freeze plan (only what trains moves; BatchNorm as the plan says; the
feature cache when the backbone is frozen), the per-stage LR ratios (every group is scaled by the
same factor, so the sweep is of the head LR and the backbone keeps its ratio), micro-batches and the
memory budget. The steps are the trainer's own (``Trainer.train_pass`` under an ``ExponentialSweep``
LR policy, engine/training/policies.py), so what is swept is what trains. Nothing is saved: the model is built fresh, and no run folder is written.

The suggestion, stated so a user can check it on the plot: the LR where the smoothed loss falls
fastest (the steepest downward slope against log LR), looked for before the loss's minimum. The LR at
the minimum divided by 10 is reported beside it (the older rule of thumb).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from engine.core.device import seed_everything
from engine.core.errors import EngineError
from engine.training.auto_plan import choose_plan, is_pending
from engine.training.epoch import Diverged
from engine.training.policies import ExponentialSweep, OnStep, Steps
from engine.training.setup import prepare, set_up
from engine.training.state import TrainState

if TYPE_CHECKING:
    from engine.config import TrainConfig

SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected (the raw loss is noisy)
BLOW_UP = 4.0  # the sweep ends once the smoothed loss passes this many times its best
RULE = ("the LR where the smoothed loss falls fastest (steepest downward slope against log LR), "
        "after the first tenth of the sweep and before the loss's minimum")


@dataclass
class LRSweep:
    """One sweep: the head LR and the loss at every step, the suggestion and why the sweep ended."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float | None = None
    min_over_10: float | None = None
    rule: str = RULE
    ended: str = ""
    head_lr: float = 0.0  # the plan's head LR (what "apply" replaces)
    group_lrs: dict[str, float] = field(default_factory=dict)  # every group's LR at the last step
    trainable_params: int = 0
    feature_cache: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None]:
    """(steepest-descent LR before the minimum, LR at the minimum / 10); None when too few points.

    The first tenth of the sweep (at least 3 steps) is not searched: there the moving average is
    still settling and a random head's first steps fall fast at any LR. Slopes are central
    differences against log LR, so one noisy step does not decide.
    """
    if len(lrs) < 5:
        return None, None
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    min_over_10 = lrs[low] / 10
    skip = max(3, len(lrs) // 10)
    logs = [math.log(lr) for lr in lrs]
    slopes = {i: (smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1])
              for i in range(max(1, skip), min(low + 1, len(lrs) - 1))}
    if not slopes:
        return None, min_over_10
    steepest = min(slopes, key=slopes.__getitem__)
    return (lrs[steepest] if slopes[steepest] < 0 else None), min_over_10


MIN_LR, MAX_LR = 1e-12, 1e3  # a sweep's range: far wider than any useful LR, far from float's limits


def lr_find(config: TrainConfig, *, start_lr: float = 1e-7, end_lr: float = 1.0, steps: int = 100,
            on_point: Callable[[int, float, float], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> LRSweep:
    """Sweep the head LR from ``start_lr`` to ``end_lr`` over ``steps`` optimizer steps (exponentially),
    on a fresh model built from ``config``; ``on_point(step, lr, loss)`` after each step."""
    if not (0 < start_lr < end_lr and math.isfinite(end_lr)):
        raise EngineError(f"the sweep needs 0 < start LR < end LR (got {start_lr:g} .. {end_lr:g}).")
    if start_lr < MIN_LR or end_lr > MAX_LR:  # beyond them a float LR (or a group's share of it) is 0 or inf
        raise EngineError(f"the sweep's LRs lie between {MIN_LR:g} and {MAX_LR:g} (got {start_lr:g} .. {end_lr:g}).")
    if not 5 <= steps <= 10_000:
        raise EngineError(f"the sweep needs 5 to 10,000 steps (got {steps}).")
    config.check_hosted()
    seed_everything(config.seed)
    stop_asked = should_stop or (lambda: False)
    prep = prepare(config)
    if is_pending(config.auto_plan):  # --strategy auto: the sweep is of the plan a training would choose
        choice = choose_plan(config, prep, stop_asked)
        if choice is None:
            sweep = LRSweep(head_lr=config.freeze_plan().head_lr)
            sweep.ended = "cancelled while choosing the plan"
            return sweep
        config = replace(config, plan=choice.plan, auto_plan=choice.record())
    state = TrainState.start(config.monitor, config.min_delta, config.patience)
    runner = set_up(config, prep, state, None, stop_asked)
    sweep = LRSweep(head_lr=config.freeze_plan().head_lr)
    if runner is not None:
        sweep.trainable_params, sweep.feature_cache = runner.report.trainable_params, runner.cached
    if runner is None:
        sweep.ended = "cancelled while computing features"
        return sweep
    policy = ExponentialSweep(start_lr, end_lr, steps, sweep.head_lr)
    best = math.inf
    average = 0.0

    def on_step(_i: int, loss: float, _seen: int) -> None:
        nonlocal best, average
        k = len(sweep.lrs)
        lr = policy.lr_at(k)
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed = average / (1 - SMOOTHING ** (k + 1))
        sweep.lrs.append(lr)
        sweep.losses.append(loss)
        sweep.smoothed.append(smoothed)
        best = min(best, smoothed)
        if on_point is not None:
            on_point(k + 1, lr, loss)
        if not math.isfinite(smoothed) or smoothed > BLOW_UP * best:
            sweep.ended = f"the loss blew up at LR {lr:.2g}"
        elif k + 1 >= steps:
            sweep.ended = f"reached the end LR {end_lr:g}"

    try:  # the trainer's own steps, pass after pass over the data, under the sweep's LR
        stats = runner.train_pass(batches=Steps(runner.train_loader, steps), lr=policy, callbacks=[OnStep(on_step)],
                                  stop=lambda: bool(sweep.ended) or stop_asked())
        if stats is None and not sweep.ended:
            sweep.ended = "cancelled"
    except Diverged:
        sweep.ended = f"the loss became infinite at LR {policy.lr_at(len(sweep.lrs)):.2g}"
    sweep.group_lrs = {group["name"]: group["lr"] for group in runner.optimizer.param_groups}
    sweep.suggestion, sweep.min_over_10 = suggest(sweep.lrs, sweep.smoothed)
    return sweep


# --- a sweep in its own process, as the app starts it ------------------------------------------

SWEEP_FOLDER = "lr-find"  # beside the device locks: machine-local and short-lived, never in a run


def sweep_dir() -> Path:
    from engine.core.paths import lock_dir

    return lock_dir() / SWEEP_FOLDER


class SweepJob:
    """One background sweep, read back from one JSON file (``<id>.json``; its cancel file beside it).

    The file says ``state`` (queued, running, finished, cancelled, failed), ``points`` so far, and at
    the end the whole sweep with its suggestion. Written atomically, so a reader never sees half.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def cancel_path(self) -> Path:
        return self.path.with_suffix(".cancel")

    @property
    def config_path(self) -> Path:
        return self.path.with_suffix(".config.json")

    def read(self) -> dict[str, Any]:
        from engine.core.files import read_json

        data = read_json(self.path, {})
        return data if isinstance(data, dict) else {}

    def status(self) -> dict[str, Any]:
        """``read()``, with a sweep whose process died (killed, out of memory) said as interrupted.
        Gone means: no such process, a zombie, or its pid now another process's (the start time the
        sweep recorded differs): the app reaps its children at once, so a pid can soon be reused."""
        from engine.runs.process import pid_alive, process_start

        data = self.read()
        pid, started = data.get("pid"), data.get("pid_start")
        if data.get("state") in ("queued", "running") and isinstance(pid, int) and (
                not pid_alive(pid) or (started and process_start(pid) not in (None, started))):
            data = {**data, "state": "interrupted", "reason": "the sweep's process ended without a result"}
        return data

    def write(self, **fields: Any) -> None:
        from engine.core.files import atomic_write_json

        atomic_write_json(self.path, {**self.read(), **fields})

    def cancel(self) -> None:
        self.cancel_path.touch()

    def cancelled(self) -> bool:
        return self.cancel_path.exists()


def start_sweep(config: TrainConfig, *, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 1.0) -> SweepJob:
    """Run ``lr_find`` for ``config`` in its own process (``python -m engine lr-find --config``); returns
    the job to poll. It waits its turn for the device like a training."""
    import uuid

    from engine.core.files import atomic_write_json
    from engine.runs.background import spawn_engine

    config.validate()
    config.check_hosted()
    folder = sweep_dir()
    folder.mkdir(parents=True, exist_ok=True)
    job = SweepJob(folder / f"{uuid.uuid4().hex[:12]}.json")
    atomic_write_json(job.config_path, config.to_dict())
    job.write(state="queued", points=[], steps=steps, reason="starting")
    pid = spawn_engine(["lr-find", "--config", str(job.config_path), "--save", str(job.path), "--steps", str(steps),
                        "--start-lr", repr(start_lr), "--end-lr", repr(end_lr)], job.path.with_suffix(".log"))
    from engine.runs.process import process_start

    job.write(pid=pid, pid_start=process_start(pid))
    return job


def run_sweep_job(config: TrainConfig, job: SweepJob, *, steps: int, start_lr: float, end_lr: float) -> LRSweep:
    """The body of a background sweep: wait for the device, sweep, write progress and the result."""
    import time

    from engine.runs.lifecycle import CancelledInQueue, holding_the_device, in_line

    points: list[list[float]] = []
    last = [0.0]

    def on_point(step: int, lr: float, loss: float) -> None:
        points.append([lr, loss])
        if time.monotonic() - last[0] > 0.5:  # a few writes a second at most
            job.write(state="running", points=points, reason=f"step {step} of {steps}")
            last[0] = time.monotonic()

    try:
        with holding_the_device(config.device, "a learning-rate sweep", str(job.path), wait=True,
                                cancelled=job.cancelled,
                                report=lambda position, ahead: job.write(state="queued", reason=in_line(position, ahead))):
            job.write(state="running", reason="preparing data and model")
            sweep = lr_find(config, start_lr=start_lr, end_lr=end_lr, steps=steps, on_point=on_point,
                            should_stop=job.cancelled)
    except CancelledInQueue as exc:
        job.write(state="cancelled", reason=str(exc))
        raise
    except EngineError as exc:
        job.write(state="failed", reason=str(exc))
        raise
    job.write(state="cancelled" if sweep.ended.startswith("cancelled") else "finished", reason=sweep.ended,
              points=[[lr, loss] for lr, loss in zip(sweep.lrs, sweep.losses)], sweep=sweep.to_dict())
    return sweep
