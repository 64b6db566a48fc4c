"""The small policies a pass of training steps runs under: how long, which learning rate, and who hears
each step. ``fit``, a race's slice and the LR finder are the same steps (engine/training/epoch.py)
under different policies:

    how long        the learning rate                  callbacks
    fit         one pass over the loader    the config's schedule (Scheduled)   progress (+ DDP agreement)
    race slice  until a deadline (Deadline)  the schedule, or by the clock      progress, unfreeze by passes
    LR finder   a number of steps (Steps)    an exponential sweep              the sweep's own record

An LR policy sets every group's ``lr`` before each step from the group's planned LR, which the first
policy to touch a group keeps as ``initial_lr`` (torch's own name for it; the optimizer's state dict,
and so every checkpoint, carries it).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch


# ------------------------------------------------------------------ the learning rate
def lr_factor(step: int, total: int, schedule: str, warmup_frac: float) -> float:
    """Multiplier of every group's planned LR at optimizer step ``step`` (0-based)."""
    if schedule == "constant":
        return 1.0
    warm = max(1, int(round(total * (0.25 if schedule == "onecycle" else warmup_frac))))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _scale_planned(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


class LRPolicy(Protocol):
    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every group's LR for this pass's step ``step`` (0-based)."""


@dataclass
class Scheduled:
    """The config's schedule (constant, cosine with warm-up, one-cycle) over the run's ``total`` steps;
    this pass starts at the run's step ``step0``."""

    step0: int
    total: int
    schedule: str
    warmup_frac: float

    def factor_at(self, step: int) -> float:
        """The share of the planned LR at this pass's step ``step``."""
        return lr_factor(self.step0 + step, self.total, self.schedule, self.warmup_frac)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        _scale_planned(optimizer, self.factor_at(step))


class ByClock:
    """A cosine from the planned LR to 1% of it over the seconds until ``end()`` (perf_counter): a race's
    last slice anneals over the time it has, whatever the number of steps that fits in it."""

    def __init__(self, end: Callable[[], float]):
        self.start, self.end = time.perf_counter(), end

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        progress = (time.perf_counter() - self.start) / max(1e-9, self.end() - self.start)
        _scale_planned(optimizer, 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class ExponentialSweep:
    """The LR finder's sweep: the head's LR from ``start`` to ``end`` over ``steps`` steps, exponentially;
    every group is scaled alike, so each backbone stage keeps its planned ratio to the head."""

    def __init__(self, start: float, end: float, steps: int, head_lr: float):
        self.start, self.steps, self.head_lr = start, steps, head_lr
        self.log_step = (math.log(end) - math.log(start)) / (steps - 1)

    def lr_at(self, step: int) -> float:
        """The head's LR at ``step``, in log space ((end / start) ** (1 / (steps - 1)) overflows for wide ranges)."""
        return math.exp(math.log(self.start) + min(step, self.steps - 1) * self.log_step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * lr / self.head_lr


# ------------------------------------------------------------------ how long
class Batches:
    """Training batches, pass after pass over the data (each pass reshuffled), while ``more(steps)``
    (the steps yielded so far) says so; a pass is not begun when it would yield nothing (no shuffle
    drawn, no worker started for it)."""

    def __init__(self, loader: Iterable, more: Callable[[int], bool]):
        self.loader, self.more, self.steps = loader, more, 0

    def __iter__(self) -> Iterator[Any]:
        while self.more(self.steps):
            before = self.steps
            for batch in self.loader:
                if not self.more(self.steps):
                    return
                self.steps += 1
                yield batch
            if self.steps == before:
                return  # an empty loader (set_up refuses one; never loop on it)


def Deadline(loader: Iterable, deadline: Callable[[], float]) -> Batches:  # noqa: N802 - reads as a policy
    """Until a deadline (``deadline()``, perf_counter: it may move as steps are timed): the first batch
    always, the others while time is left."""
    return Batches(loader, lambda steps: not steps or time.perf_counter() < deadline())


def Steps(loader: Iterable, count: int) -> Batches:  # noqa: N802 - reads as a policy
    """``count`` batches."""
    return Batches(loader, lambda steps: steps < count)


# ------------------------------------------------------------------ who hears each step
class StepCallback(Protocol):
    def on_step(self, step: int, loss: float, seen: int) -> None:
        """After the pass's step ``step`` (1-based): its loss, and the images seen in this pass so far."""


@dataclass
class OnStep:
    """A plain function as a callback."""

    call: Callable[[int, float, int], None]

    def on_step(self, step: int, loss: float, seen: int) -> None:
        self.call(step, loss, seen)
