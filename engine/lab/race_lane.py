"""One candidate of a race (engine/lab/race.py): a plan alive between its slices.

Time slicing is at the optimizer step, not the pass over the data: at 96 px on 2 cores one pass of
a full fine-tune is longer than a first-rung slice, and one pass of feature extraction (a linear
head on cached features) takes milliseconds. So in a race **an epoch is a slice**: the steps
trained before the slice's deadline (part of a pass, or several reshuffled passes), then one
evaluation and one commit, like any epoch. Every ranking reads a committed checkpoint, and whenever
the budget ends the winner is a normal, finished run (evaluable, exportable, resumable with
``train --resume --epochs N``, whose epochs are then ordinary passes). The deadline is checked
before each step, earlier by what the lane's last evaluation + commit took (before its first close:
one validation batch timed at setup, times their number); a slice overshoots by at most one step
plus the error of that estimate.

Gradual unfreezing counts its epochs in passes over the training data (the images it has trained
on, across slices), as ``fit`` does: when a pass completes, inside a slice or not, the stages its
schedule releases join the optimizer. Counted in slices, a plan given one slice (or a first rung)
would never leave its head-only start.

Survivors continue in memory (model, optimizer, loaders and counters stay alive between slices),
so nothing is retrained from scratch and no slice pays for loading the model again. Their memory
is planned for: each plan's micro-batch leaves room for the plans set up after it (weights,
gradients, AdamW moments) and for the gradients and moments of those before it, so a race keeps to
the memory budget a lone training keeps to (measured, 224 px photos, five plans, budget 1.5 GB: peak
1.71 GB before, 1.35 GB after). Under a tight budget that makes the slices of the plans that train
most of the model small, and a race of fewer plans gives each more. Feature
extraction computes its feature cache once, at setup: its epochs are then cheap, which is exactly
what the race should show (its curve starts late, after that pass).

Each closed epoch's ``elapsed_s`` is seconds since the race started, so the metrics rows are the
race's curves (validation accuracy per wall-clock second).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from engine.config import TrainConfig
from engine.core.device import seed_everything
from engine.core.errors import EngineError
from engine.core.files import read_json
from engine.core.modes import evaluating
from engine.freeze.plan import set_train_mode
from engine.runs.events import EpochEnded, RunFinished, RunStarted, StepLogged
from engine.runs.recorder import RunRecorder
from engine.runs.store import RunDir, extend_run
from engine.training.checkpoint import Checkpointer
from engine.training.finish import evaluate_finished
from engine.training.policies import ByClock, Deadline, Scheduled
from engine.training.setup import Prepared, describe_test, prepare, record_split, set_up
from engine.training.state import TrainState
from engine.training.trainer import Trainer


class _PassCounter:
    """Gradual unfreezing follows passes over the data (epochs as fit() has them), not slices: once the
    images a lane trained on complete a pass, the stages it releases join."""

    def __init__(self, lane: Lane, runner: Trainer):
        self.lane, self.runner = lane, runner
        self.per_pass, self.before = max(1, len(lane.prep.train_ds)) if lane.prep else 1, lane.images

    def on_step(self, step: int, loss: float, seen: int) -> None:
        lane, runner = self.lane, self.runner
        done = lane.images // self.per_pass
        lane.images = self.before + seen
        if runner.plan.unfreeze_schedule and lane.images // self.per_pass > done:
            runner.unfreeze(lane.images // self.per_pass + 1)
            set_train_mode(runner.model, True)  # a released stage's BatchNorm as the BN policy wants it


class _SliceProgress:
    """A slice's progress events, and its longest step (what bounds how late a slice may end)."""

    def __init__(self, lane: Lane, epoch: int, until: float):
        self.lane, self.epoch, self.until = lane, epoch, until
        self.tick = self.last = time.perf_counter()
        lane._step_s = 0.0

    def on_step(self, step: int, loss: float, seen: int) -> None:
        now = time.perf_counter()
        self.lane._step_s, self.last = max(self.lane._step_s, now - self.last), now
        steps = self.lane.runner.steps if self.lane.runner else 0
        self.lane.sink(StepLogged(epoch=self.epoch, step=step, steps=steps, loss=loss,
                                  images_per_s=seen / max(now - self.tick, 1e-9), eta_s=max(0.0, self.until - now)))


class Lane:
    """One plan in the race, alive between its slices: what ``fit`` sets up once (data, model,
    loaders, optimizer, feature cache) stays in memory, so a survivor continues where it stopped."""

    def __init__(self, run: RunDir, t0: float, before: int = 0, after: int = 0):
        self.run, self.t0 = run, t0
        self.before, self.after = before, after  # the race's other plans, set up before and after this one
        config = TrainConfig.from_dict(run.config())
        plan = config.freeze_plan()
        # set_up plans micro-batches for the plan at its last epoch: gradual unfreezing's widest one
        horizon = max([e for e, _n in plan.unfreeze_schedule], default=0) + 1
        self.config = replace(config, epochs=max(config.epochs, horizon))
        self.sink = RunRecorder(run)
        self.state = TrainState.start(config.monitor, config.min_delta, None)
        self.checkpointer = Checkpointer(run, config.monitor)
        self.prep: Prepared | None = None
        self.runner: Trainer | None = None
        self.last: EpochEnded | None = None
        self.close_s = 0.0  # the last epoch close (evaluation + commit): kept free at the end of a slice
        self.train_s = 0.0  # wall-clock seconds of its slices (setup included)
        self.rungs = 0
        self.images = 0  # images trained on, across slices: gradual unfreezing's epochs are passes of them
        self.status = "running"
        # per slice, seconds since the race started: start, deadline, end; setup_s (its first slice),
        # close_s (evaluation + commit), step_s (its longest step): what bounds how late it ended
        self.slices: list[dict[str, Any]] = []
        self._step_s = 0.0
        self.setup_s = 0.0
        self.setup: list[float] | None = None  # [start, end] of its setup, seconds since the race started

    @property
    def plan_name(self) -> str:
        """The race's name for this lane's plan ("fe", "full", ...)."""
        race = self.run.config_or_empty().get("race")
        return str(race.get("plan", "")) if isinstance(race, dict) else ""

    @property
    def label(self) -> str:
        return self.config.label or self.run.run_id

    def _start(self, stop: Callable[[], bool]) -> bool:
        """prepare + set_up, as ``fit`` does them; False when cancelled during the feature pass."""
        seed_everything(self.config.seed)
        self.prep = prepare(self.config, work_dir=str(self.run.path))
        record_split(self.prep, self.run)
        try:
            self.runner = set_up(self.config, self.prep, self.state, None, stop, reserve=self.reserve())
        except EngineError as exc:
            if not self.before + self.after:
                raise
            raise EngineError(f"{exc} A race keeps its {self.before + self.after + 1} plans in memory at once "
                              "(one trains at a time): race fewer plans or use a smaller image size.") from exc
        if self.runner is None:
            return False
        runner = self.runner
        self.sink(RunStarted(run_id=self.run.run_id, device=str(runner.device), epochs=self.config.epochs,
                             steps_per_epoch=runner.steps, train_images=len(self.prep.train_ds),
                             val_images=len(self.prep.val_ds), trainable_params=runner.report.trainable_params,
                             feature_cache=runner.cached, skipped=self.prep.skipped,
                             micro_batch=runner.batches.micro_batch, batches=runner.batches.describe()))
        return True

    def reserve(self) -> int:
        """Memory the race's other plans will take after this one's micro-batch is planned: every plan
        stays in memory while one trains. Those set up later: weights, gradients and two AdamW moments
        (4x the weights, as if all of it trained); those set up before are in the process already, less
        their gradients and optimizer state (made at their first step): 3x."""
        assert self.prep is not None
        weights = sum(p.numel() * p.element_size() for p in self.prep.handle.module.parameters())
        return weights * (4 * self.after + 3 * self.before)

    def set_up(self, stop: Callable[[], bool]) -> bool:
        """Data, model, loaders, optimizer and (feature extraction, last stages) the cache; False when
        cancelled. Timed as ``setup_s``."""
        begun = time.perf_counter()
        try:
            return self._start(stop) and self._time_close()
        finally:
            self.setup_s = time.perf_counter() - begun
            self.setup = [round(begun - self.t0, 3), round(begun + self.setup_s - self.t0, 3)]

    def _time_close(self) -> bool:
        """The first slice's estimate of its close: one validation batch timed (the faster of two),
        times their number (the evaluation; the commit is small beside it). A fixed share of a
        training step was 2x too long for a full fine-tune and 0.7x for a cheap one."""
        runner = self.runner
        assert runner is not None
        batch = next(iter(runner.val_loader), None)
        if batch is None:
            return True
        x = batch[0].to(runner.device)
        if runner.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        times = []
        with evaluating(runner.model), torch.inference_mode():
            for _ in range(2):  # the faster of two: the first may pay one-time setup of the kernels
                begun = time.perf_counter()
                runner.model(x)
                times.append(time.perf_counter() - begun)
        self.close_s = min(times) * len(runner.val_loader)
        return True

    def train_slice(self, until: float, stop: Callable[[], bool], anneal: bool = False) -> bool:
        """Train until ``until`` (perf_counter) as one epoch, closed at its end; False when cancelled.
        A plan the race could not set up beforehand is set up here, in its slice. ``anneal``: the LR
        follows a cosine from the plan's LR to 1% of it over the slice's seconds."""
        begun = time.perf_counter()
        setup_s = 0.0
        try:
            if self.runner is None:
                if not self.set_up(stop):
                    return False
                setup_s = self.setup_s
            return self._epoch(until, stop, anneal)
        finally:
            end = time.perf_counter()
            self.train_s += end - begun
            self.rungs += 1
            self.slices.append({"start": round(begun - self.t0, 3), "deadline": round(until - self.t0, 3),
                                "end": round(end - self.t0, 3), "setup_s": round(setup_s, 3),
                                "close_s": round(self.close_s, 3), "step_s": round(self._step_s, 3)})

    def _epoch(self, until: float, stop: Callable[[], bool], anneal: bool = False) -> bool:
        """One slice as one epoch: the steps before ``until`` less the time its close will take (part of a
        pass over the training data, or several passes), then evaluated and committed."""
        runner, state = self.runner, self.state
        assert runner is not None and self.prep is not None
        epoch = state.epoch + 1
        runner.seed_epoch(epoch)  # the batches and dropout fit() would draw
        window = Deadline(runner.train_loader, lambda: until - self.close_s)  # the close as the last one took
        lr = (ByClock(lambda: until - self.close_s) if anneal else  # the last rung: a cosine over the seconds left
              Scheduled(state.step, state.step + runner.steps, self.config.schedule, self.config.warmup_frac))
        stats = runner.train_pass(batches=window, lr=lr, stop=stop,
                                  callbacks=[_PassCounter(self, runner), _SliceProgress(self, epoch, until)])
        if stats is None:
            return False
        begun = time.perf_counter()
        ended = runner.close_epoch(epoch, stats, self.t0)
        improved = state.finish_epoch(ended, window.steps)
        extend_run(self.run, epoch)  # the run on disk has trained exactly these epochs: resumable as any run
        self.checkpointer.commit(self.prep.handle, runner.optimizer, ended, improved, state, self.sink)
        self.sink(ended)
        self.last = ended
        self.close_s = time.perf_counter() - begun
        return True

    def rank_key(self) -> tuple[float, float]:
        """Higher validation accuracy first, then lower validation loss; a lane with no epoch last."""
        if self.last is None:
            return (1.0, math.inf)
        return (-self.last.val_acc, self.last.val_loss)

    def finish(self, status: str, reason: str, **race: Any) -> None:
        """End this run as ``fit`` ends one (RunFinished, the held-out test once when finished), and
        free its model: an eliminated plan gives its memory to the survivors."""
        if status == "finished" and self.prep is not None and self.runner is not None:
            if test := evaluate_finished(self.prep, self.runner, self.run):  # as fit does
                reason = f"{reason}; {describe_test(test)}"
        early = self.state.early
        self.sink(RunFinished(status=status, reason=reason, best_epoch=early.best_epoch,
                              best_val_acc=early.best_val_acc, epochs_done=self.state.epoch, seconds=self.train_s))
        self.write_race(**race)
        self.status, self.prep, self.runner = status, None, None

    def write_race(self, **fields: Any) -> None:
        """Merge ``fields`` into the run's status ``race`` record (only the race process writes it)."""
        status = read_json(self.run.status_path, {})
        current = status.get("race") if isinstance(status, dict) and isinstance(status.get("race"), dict) else {}
        self.run.write_status(race={**current, "rungs": self.rungs, "train_s": round(self.train_s, 2),
                                    "setup": self.setup, "slices": self.slices, **fields})

