"""Race freeze plans under a wall-clock budget: successive halving over seconds, not epochs.

A comparison trains every plan for the same epochs; a race asks the practical question instead:
with *this many seconds* on this machine, which plan should I have used? Each candidate is an
ordinary run of one group (config ``group``/``label`` as in a comparison, plus ``race``), trained
by one process that holds the device for the whole race.

This module is the scheduler. The rest of a race lives beside it: the plans and the budget's first
checks (race_plans.py), what a race will cost before it starts (race_estimate.py), one candidate
alive between its slices (race_lane.py), races on disk (race_registry.py), and the race as a process
holding the device (race_process.py).

Every plan is set up first (data, model, loaders, optimizer, and the one pass that fills the cache of
feature extraction and of the last-stages plans, training/prefix_cache.py): that time counts against
the budget but against no plan's slice, so the first rung compares plans on equal training time. The
set-up is measured (``setup_s`` in every run's ``race`` record) and shown. Before anything is written, a
budget that set-up and one slice per plan in the first rung do not fit is refused (race_estimate.py);
after the set-up the race checks again with what it measured and, when the rest cannot give every plan
a slice, ends without a winner, saying why. A plan that finished no slice never wins and has no place.
Then successive halving: the rest of the budget is split equally between the rungs (5 plans -> 3 ->
2 -> 1 is four rungs; each rung splits what is left between itself and the rungs after it, so a rung
that ran late shortens all later ones alike rather than starving the next), and rung r gives every
surviving plan an equal share of its time; after each rung the better half (rounded up) continues,
ranked by validation accuracy (tie: lower validation loss). The last rung trains the winner alone.

In a race **an epoch is a slice** (race_lane.py): the steps trained before the slice's deadline, then
one evaluation and one commit, like any epoch. Every slice trains at least one step and is
evaluated, and the later lanes of a rung share what is left of it. The budget is a hard stop: no
slice starts after it. When it runs out before the last rung (setups and evaluations took longer
than planned: a busy machine, a slow model), the plans still in the race are ranked as they stand
and the best one with a finished slice is the winner; a plan that never got a slice ends
"cancelled" with that reason. So a race ends at most one slice's overshoot after its budget.

Survivors continue in memory between slices (race_lane.py). The LR is constant until the last
rung: nobody knows in advance how long a survivor trains, so a cosine tail would end at the wrong
moment. In the last rung the winner is alone and its end is known, so its LR anneals by the clock
(a cosine over the rung's seconds down to 1%, the tail ``fit``'s cosine schedule has): the winner
ends as a finished training, not in the middle of one. A plan given the whole budget alone (a race
of one plan, one rung) anneals over all of it, the same way.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from engine.core.device import flush_denormals
from engine.core.errors import EngineError
from engine.core.memory import reuse_freed_memory
from engine.lab.race_estimate import RaceEstimate
from engine.lab.race_lane import Lane
from engine.lab.race_plans import ETA, MIN_SLICE_S, rung_sizes
from engine.lab.race_registry import leaderboard, race_spec
from engine.runs.store import RunDir
from engine.training.epoch import Diverged


@dataclass
class RaceResult:
    group: str
    status: str  # finished | cancelled
    winner: str | None  # run id
    seconds: float
    budget_s: float
    leaderboard: list[dict[str, Any]]
    rungs: int = 0  # the rung it ended in
    rungs_planned: int = 0
    out_of_time: bool = False  # the budget ran out before the last rung's slices were all trained
    setup_s: float = 0.0  # seconds from the race's start until every plan was set up
    reason: str = ""  # why the race named no winner ("" when it did)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_race(runs: list[RunDir], *, stop: Callable[[], bool] | None = None,
             say: Callable[[str], None] = lambda _line: None) -> RaceResult:
    """Race the runs of one group (this process must hold the device): successive halving over the
    budget in their config. ``say``: one line per slice, for a terminal."""
    spec = race_spec(runs)
    if any(r.metrics() or r.train_state_path.is_file() for r in runs):
        raise EngineError(f"Race {runs[0].config_or_empty().get('group')} has already run (its runs have epochs); "
                          "start a new race.")
    budget, eta = float(spec["budget_s"]), int(spec.get("eta", ETA))
    sizes = rung_sizes(len(runs), eta)
    cancelled = stop or (lambda: any(r.cancel_requested() for r in runs))
    reuse_freed_memory()
    flush_denormals()
    t0, wall0 = time.perf_counter(), time.time()
    lanes = [Lane(run, t0, before=i, after=len(runs) - 1 - i) for i, run in enumerate(runs)]
    stopped = _set_up_all(runs, lanes, t0, wall0, budget, len(sizes), cancelled)
    if stopped is not None:
        return stopped
    setup_s = time.perf_counter() - t0
    for lane in lanes:
        lane.write_race(setup_s=round(setup_s, 2))
    say(f"set-up of {len(lanes)} plans: {setup_s:.1f} s of the {budget:g} s budget")
    short = _short_of_slices(lanes, spec, budget, setup_s, len(sizes))
    if short:
        return _end_without_winner(runs, lanes, t0, budget, setup_s, short, status="cancelled")
    alive = list(lanes)
    order: list[Lane] = []  # eliminated, worst first
    ended, spent = len(sizes), False  # the rung the race ended in; whether the budget ran out first
    for r in range(len(sizes)):
        ran_out = _train_rung(r, sizes, alive, order, t0, budget, cancelled, say)
        if ran_out is None:
            return _cancel(runs, lanes, r, t0, budget)
        spent = ran_out
        alive = _cut(r, sizes, alive, order, budget, setup_s, spent)
        if spent or not alive:
            ended = r + 1
            break
    return _end(runs, lanes, alive, order, t0, budget, setup_s, sizes, ended, spent)


def _set_up_all(runs: list[RunDir], lanes: list[Lane], t0: float, wall0: float, budget: float, rungs: int,
                cancelled: Callable[[], bool]) -> RaceResult | None:
    """The race's start: every run marked running, then every plan set up, on the race's clock but in no
    plan's slice (rung 1 is training time), while the budget lasts. The cancelled race's result when it
    was cancelled during a set-up, else None."""
    for lane in lanes:
        lane.run.write_status(state="running", reason="", queue_position=None,
                              race={"started_at": wall0, "budget_s": budget, "rungs_planned": rungs,
                                    "rung": 0, "out_after": None, "winner": False,
                                    "threads": torch.get_num_threads()})
    for lane in lanes:  # setup first, on the race's clock but in no plan's slice: rung 1 is training time
        if time.perf_counter() >= t0 + budget:
            break
        try:
            if not lane.set_up(cancelled):
                return _cancel(runs, lanes, 0, t0, budget)
        finally:
            lane.write_race()
    return None


def _train_rung(r: int, sizes: list[int], alive: list[Lane], order: list[Lane], t0: float, budget: float,
                cancelled: Callable[[], bool], say: Callable[[str], None]) -> bool | None:
    """Rung ``r``'s slices: what is left of the budget split equally between the rungs that remain, and
    this rung's share of it between the plans in ``alive``, one slice each in turn (a plan that diverges
    ends, leaving ``alive`` for ``order``). Whether the budget ran out before every plan had its slice;
    None when the race was cancelled."""
    begun = time.perf_counter()  # what is left is split equally between the rungs that remain
    rung_end = begun + max(0.0, t0 + budget - begun) / (len(sizes) - r)
    turn = list(alive)
    for i, lane in enumerate(turn):
        now = time.perf_counter()
        if now >= t0 + budget:  # a hard stop: no slice starts after the budget
            return True
        until = now + max(0.0, (rung_end - now) / (len(turn) - i))  # what is left of the rung, shared
        try:
            ok = lane.train_slice(until, cancelled, anneal=r + 1 == len(sizes))  # the last rung: alone
        except Diverged as exc:
            lane.finish("diverged", f"race: diverged in rung {r + 1}: {exc}", out_after=r + 1)
            alive.remove(lane)
            order.append(lane)
            continue
        if not ok:
            return None
        say(f"rung {r + 1}/{len(sizes)}  {lane.label:<20} val acc "
            f"{lane.last.val_acc if lane.last else float('nan'):.4f}  at {time.perf_counter() - t0:6.1f} s")
    return False


def _cut(r: int, sizes: list[int], alive: list[Lane], order: list[Lane], budget: float, setup_s: float,
         spent: bool) -> list[Lane]:
    """After rung ``r``: the plans in ``alive`` ranked, the better ones kept (the best alone when the budget
    ran out or this was the last rung), the others ended and added to ``order``, worst first. The plans
    that go on."""
    alive.sort(key=Lane.rank_key)
    keep = 1 if spent or r + 1 == len(sizes) else sizes[r + 1]
    for place, lane in enumerate(alive):
        lane.write_race(rung=r + 1)
        if place < keep and lane.last is not None:
            continue
        if lane.last is None:  # the budget ran out before its first slice: nothing was trained
            lane.finish("cancelled", f"race: the {budget:g} s budget ran out before its first slice "
                                     f"(set-up took {setup_s:.0f} s)", out_after=r + 1)
        else:
            why = "the budget ran out in" if spent else "out after"
            lane.finish("finished", f"race: {why} rung {r + 1} of {len(sizes)} (place {place + 1} of "
                                    f"{len(alive)})", out_after=r + 1)
    order.extend(reversed([lane for lane in alive if lane.status != "running"]))
    return [lane for lane in alive if lane.status == "running"]


def _end(runs: list[RunDir], lanes: list[Lane], alive: list[Lane], order: list[Lane], t0: float, budget: float,
         setup_s: float, sizes: list[int], ended: int, spent: bool) -> RaceResult:
    """The race's end after its last rung ran (``ended``): the best plan still in it is the winner, every
    plan with a finished slice gets its place; with none left, no winner and why."""
    winner = alive[0] if alive else None  # a plan that finished no slice left ``alive`` in ``_cut``
    if winner is None:
        _write_places(order)
        return _end_without_winner(runs, lanes, t0, budget, setup_s, _why_no_winner(lanes, budget), rungs=ended,
                                   rungs_planned=len(sizes), out_of_time=spent)
    how = f"when the budget ran out in rung {ended}" if spent else f"after {len(sizes)} rungs"
    winner.finish("finished", f"race winner {how} ({budget:g} s budget)", winner=True)
    winner.run.write_status(race_winner=True)
    order.append(winner)
    _write_places(order)
    return RaceResult(group=str(runs[0].config_or_empty().get("group")), status="finished",
                      winner=winner.run.run_id, seconds=round(time.perf_counter() - t0, 2),
                      budget_s=budget, leaderboard=leaderboard(runs), rungs=ended, rungs_planned=len(sizes),
                      out_of_time=spent, setup_s=round(setup_s, 2))


def _write_places(order: list[Lane]) -> None:
    """Places, best first, for the plans that finished a slice; one that never trained has none."""
    ranked = [lane for lane in reversed(order) if lane.last is not None]
    for place, lane in enumerate(ranked):
        lane.write_race(place=place + 1)


def _short_of_slices(lanes: list[Lane], spec: dict[str, Any], budget: float, setup_s: float, rungs: int) -> str:
    """Why what the set-up left of the budget cannot give every plan one slice, or "" when it can.

    The check before the race (``check_budget`` with ``estimate_race``) used a probe; here the set-up
    has been measured. A plan's slice is its measured close (one evaluation, timed at its set-up) and
    one training step as the probe estimated it, scaled by how much slower than the probe's estimate
    the set-ups ran (a machine that got busier). A plan the budget left no time to set up has no slice:
    its set-up is the estimate's, scaled the same way. The budget named is the race's own rule, as
    ``RaceEstimate.least_budget`` states it, with these numbers."""
    estimate = RaceEstimate.from_dict(spec.get("estimate"))
    guess = {lane.plan_name: estimate.plans[lane.plan_name] for lane in lanes
             if estimate is not None and lane.plan_name in estimate.plans}
    done = [lane for lane in lanes if lane.runner is not None]
    planned = sum(guess[lane.plan_name].setup_s for lane in done if lane.plan_name in guess)
    slowdown = max(1.0, sum(lane.setup_s for lane in done) / planned) if planned > 0 else 1.0
    typical = sum(lane.setup_s for lane in done) / len(done) if done else budget

    def set_up(lane: Lane) -> float:
        if lane.runner is not None:
            return lane.setup_s
        return guess[lane.plan_name].setup_s * slowdown if lane.plan_name in guess else typical

    def one_slice(lane: Lane) -> float:
        step = guess[lane.plan_name].step_s * slowdown if lane.plan_name in guess else 0.0
        if lane.runner is not None:
            return lane.close_s + step
        return step + (guess[lane.plan_name].close_s * slowdown if lane.plan_name in guess else 0.0)

    needs = [one_slice(lane) for lane in lanes]
    left = budget - setup_s
    if len(done) == len(lanes) and left >= sum(needs):
        return ""
    least = math.ceil(sum(set_up(lane) for lane in lanes) + rungs * sum(max(MIN_SLICE_S, n) for n in needs))
    if len(done) < len(lanes):
        missing = ", ".join(lane.label for lane in lanes if lane.runner is None)
        return (f"setting up the plans took the whole {budget:g} s budget ({missing} not set up), so no plan "
                f"trained; start a new race with a budget of at least {least} s, or race fewer plans")
    return (f"setting up the {len(lanes)} plans took {setup_s:.0f} s of the {budget:g} s budget, leaving "
            f"{max(0.0, left):.1f} s; one slice of each needs about {sum(needs):.1f} s, so the plans could not "
            f"all be compared; start a new race with a budget of at least {least} s")


def _why_no_winner(lanes: list[Lane], budget: float) -> str:
    """Why rungs that ran named nobody: no plan closed a slice, or the ones still racing diverged."""
    if not any(lane.last is not None for lane in lanes):
        return f"no plan finished a slice within the {budget:g} s budget; give the race more time"
    return ("the plans still racing diverged (each plan's reason says when); lower the learning rate or race "
            "the other plans again")


def _end_without_winner(runs: list[RunDir], lanes: list[Lane], t0: float, budget: float, setup_s: float,
                        why: str, *, status: str = "finished", **result: Any) -> RaceResult:
    """A race that names no winner: every plan still racing ends cancelled with ``why``, which every
    run's race record keeps (``outcome``) for the page and the CLI to show."""
    for lane in lanes:
        if lane.status == "running":
            lane.finish("cancelled", f"race: {why}")
        lane.write_race(outcome=f"No winner: {why}.")
    return RaceResult(group=str(runs[0].config_or_empty().get("group")), status=status, winner=None,
                      seconds=round(time.perf_counter() - t0, 2), budget_s=budget, leaderboard=leaderboard(runs),
                      setup_s=round(setup_s, 2), reason=f"No winner: {why}.", **result)


def _cancel(runs: list[RunDir], lanes: list[Lane], rung: int, t0: float, budget: float) -> RaceResult:
    for lane in lanes:
        if lane.status == "running":
            lane.finish("cancelled", f"race cancelled during rung {rung + 1}")
    for run in runs:
        run.cancel_path.unlink(missing_ok=True)
    return RaceResult(group=str(runs[0].config_or_empty().get("group")), status="cancelled", winner=None,
                      seconds=round(time.perf_counter() - t0, 2), budget_s=budget, leaderboard=leaderboard(runs),
                      reason="cancelled")

