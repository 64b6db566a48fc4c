"""Race freeze plans under a wall-clock budget: successive halving over seconds, not epochs.

A comparison trains every plan for the same epochs; a race asks the practical question instead:
with *this many seconds* on this machine, which plan should I have used? Each candidate is an
ordinary run of one group (config ``group``/``label`` as in a comparison, plus ``race``), trained
by one process that holds the device for the whole race.

Every plan is set up first (data, model, loaders, optimizer, and the one pass that fills the cache of
feature extraction and of the last-stages plans, training/prefix_cache.py): that time counts against
the budget but against no plan's slice, so the first rung compares plans on equal training time. The
set-up is measured (``setup_s`` in every run's ``race`` record) and shown. Before anything is written, a
budget that set-up and one slice per plan in the first rung do not fit is refused, naming the least
that would (``estimate_race``: a probe of this data, model and image size on this machine); after the
set-up the race checks again with what it measured and, when the rest cannot give every plan a slice,
ends without a winner, saying why. A plan that finished no slice never wins and has no place.
Then successive halving: the rest of the budget is split equally between the rungs (5 plans -> 3 ->
2 -> 1 is four rungs; each rung splits what is left between itself and the rungs after it, so a rung
that ran late shortens all later ones alike rather than starving the next), and rung r gives every
surviving plan an equal share of its time; after each rung the better half (rounded up) continues,
ranked by validation accuracy (tie: lower validation loss). The last rung trains the winner alone.

Time slicing is at the optimizer step, not the pass over the data: at 96 px on 2 cores one pass of
a full fine-tune is longer than a first-rung slice, and one pass of feature extraction (a linear
head on cached features) takes milliseconds. So in a race **an epoch is a slice**: the steps
trained before the slice's deadline (part of a pass, or several reshuffled passes), then one
evaluation and one commit, like any epoch. Every ranking reads a committed checkpoint, and whenever
the budget ends the winner is a normal, finished run (evaluable, exportable, resumable with
``train --resume --epochs N``, whose epochs are then ordinary passes). The deadline is checked
before each step, earlier by what the lane's last evaluation + commit took (before its first close:
one validation batch timed at setup, times their number); a slice overshoots by at most one step
plus the error of that estimate. Every slice trains at least one step and is
evaluated, and the later lanes of a rung share what is left of it. The budget is a hard stop: no
slice starts after it. When it runs out before the last rung (setups and evaluations took longer
than planned: a busy machine, a slow model), the plans still in the race are ranked as they stand
and the best one with a finished slice is the winner; a plan that never got a slice ends
"cancelled" with that reason. So a race ends at most one slice's overshoot after its budget.

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
what the race should show (its curve starts late, after that pass). The LR is constant until the last
rung: nobody knows in advance how long a survivor trains, so a cosine tail would end at the wrong
moment. In the last rung the winner is alone and its end is known, so its LR anneals by the clock
(a cosine over the rung's seconds down to 1%, the tail ``fit``'s cosine schedule has): the winner
ends as a finished training, not in the middle of one. A plan given the whole budget alone (a race
of one plan, one rung) anneals over all of it, the same way.

Each closed epoch's ``elapsed_s`` is seconds since the race started, so the metrics rows are the
race's curves (validation accuracy per wall-clock second).
"""
from __future__ import annotations

import math
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from engine.config import TrainConfig
from engine.core.device import flush_denormals, seed_everything
from engine.core.errors import EngineError
from engine.core.files import read_json
from engine.core.hosting import hosted_limits
from engine.core.memory import reuse_freed_memory
from engine.core.modes import evaluating
from engine.data.datasets import BUILTIN_FACTS
from engine.freeze.plan import FreezePlan, set_train_mode
from engine.runs.events import EpochEnded, RunFinished, RunStarted, StepLogged
from engine.runs.recorder import RunRecorder
from engine.runs.store import RunDir, create_run, extend_run, list_runs, new_run_id
from engine.training.checkpoint import Checkpointer
from engine.training.epoch import Diverged
from engine.training.policies import ByClock, Deadline, Scheduled
from engine.training.setup import Prepared, describe_test, prepare, record_split, set_up, test_evaluation
from engine.training.state import TrainState
from engine.training.trainer import Trainer

PLANS = ("fe", "last-1", "last-2", "full", "gradual")
LABELS = {"fe": "feature extraction", "last-1": "last 1 stage", "last-2": "last 2 stages",
          "full": "full fine-tune", "gradual": "gradual unfreezing"}
ETA = 2  # each rung keeps 1/ETA of the plans (rounded up)
MIN_SLICE_S = 0.5  # the least a first-rung slice may be: below it a race ranks plans on noise
MAX_BUDGET_S = 24 * 3600.0


# ------------------------------------------------------------------ plans and budget
def parse_plans(text: str | None) -> tuple[str, ...]:
    """'fe,last-1,full' -> ('fe', 'last-1', 'full'); at least two distinct known plans. None: all of
    them; an empty text is a mistake, not "all"."""
    names = tuple(p.strip().lower() for p in (",".join(PLANS) if text is None else text).split(",") if p.strip())
    if not names:
        raise EngineError(f"No plans given: name at least two of {', '.join(PLANS)} (or leave --plans out for all).")
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        raise EngineError(f"Unknown plan(s) {', '.join(unknown)}: a race picks from {', '.join(PLANS)}.")
    if len(set(names)) != len(names):
        raise EngineError("Each plan may run once in a race (a plan is named twice).")
    if len(names) < 2:
        raise EngineError("A race needs at least two plans (with one there is nothing to race; use train).")
    return names


def check_budget(budget_s: Any, plans: int, eta: int = ETA, estimate: RaceEstimate | None = None) -> float:
    """The budget in seconds, refused when it is not a usable number (``budget_value``) or too small to
    give every plan one slice in the first rung. With an ``estimate``: the set-up of every plan first,
    then the least slice of each (``RaceEstimate.least_budget``, which is above the floor below); a
    budget the set-up ate ended as "Winner: feature extraction" over plans that never trained. Without
    one: MIN_SLICE_S per plan and rung, the floor no model beats."""
    budget = budget_value(budget_s)
    if estimate is not None:
        if budget < estimate.least_budget(eta):
            raise EngineError(_too_small(budget, estimate, eta))
        return budget
    rungs = len(rung_sizes(plans, eta))
    least = MIN_SLICE_S * plans * rungs
    if budget < least:
        raise EngineError(f"A budget of {budget:g} s is too small to race {plans} plans: the first of {rungs} "
                          f"rungs would give each plan under {MIN_SLICE_S:g} s (not even one step of most "
                          f"models). Give at least {math.ceil(least)} s.")
    return budget


def budget_value(budget_s: Any) -> float:
    """The budget as seconds, refused when it is not a finite number, not positive, over 24 hours, or
    over a shared server's cap: what is checked before any probe of the set-up."""
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not math.isfinite(budget_s):
        raise EngineError(f"The race budget must be a finite number of seconds (got {budget_s!r}).")
    if budget_s <= 0:
        raise EngineError(f"The race budget must be more than 0 seconds (got {budget_s:g}).")
    if budget_s > MAX_BUDGET_S:
        raise EngineError(f"The race budget is at most {MAX_BUDGET_S:.0f} s (24 hours; got {budget_s:g}).")
    limits = hosted_limits()
    if limits is not None and budget_s > limits.race_s:
        raise EngineError(f"This app runs on a shared server (hosted mode), where a race's budget is at most "
                          f"{limits.race_s} s ({limits.race_s // 60} minutes; got {budget_s:g}): the race holds the "
                          "device for all of it, and every training queued behind it waits.")
    return float(budget_s)


def _too_small(budget_s: float, estimate: RaceEstimate, eta: int) -> str:
    """The refusal of a budget the set-up and the first slices do not fit, with the numbers behind it."""
    rungs = len(rung_sizes(len(estimate.plans), eta))
    slowest = max(estimate.plans, key=lambda name: estimate.plans[name].slice_s)
    each = "the plan" if len(estimate.plans) == 1 else f"each of the {len(estimate.plans)} plans"
    return (f"A budget of {budget_s:g} s cannot give {each} one slice: setting up takes about "
            f"{ESTIMATE_MARGIN * estimate.setup_s:.0f} s here ({estimate.train_images + estimate.val_images} "
            f"images, the feature passes included), and the first of {rungs} rung{'s' if rungs > 1 else ''} then "
            f"needs one training step and one evaluation of the {estimate.val_images} validation images per plan "
            f"(about {ESTIMATE_MARGIN * estimate.plans[slowest].slice_s:.1f} s for {LABELS[slowest]}). Set the "
            "budget (--budget, *Budget "
            f"(seconds)* on the Compare page) to at least {math.ceil(estimate.least_budget(eta))} s, or race "
            "fewer plans or a smaller image size.")


def rung_sizes(plans: int, eta: int = ETA) -> list[int]:
    """Plans alive in each rung: 5 -> [5, 3, 2, 1]; one plan races alone: [1]."""
    sizes = [plans]
    while sizes[-1] > 1:
        sizes.append(math.ceil(sizes[-1] / eta))
    return sizes


def race_plan(name: str, backbone_stages: int) -> FreezePlan:
    """The plan a race name stands for, on a model with ``backbone_stages`` stages (last-n and
    gradual unfreezing are clamped to it). LRs as the comparison uses them: 1e-2 for a lone head,
    2e-3 and one LR for every group when the backbone trains."""
    if name == "fe":
        return FreezePlan.feature_extraction(head_lr=1e-2)
    if name in ("last-1", "last-2"):
        return FreezePlan.last(min(int(name[-1]), backbone_stages), head_lr=2e-3, backbone_lr_ratio=1.0)
    if name == "full":
        return FreezePlan.default()
    if name == "gradual":  # epoch 1 the head, then the top stage, the top two, then everything
        steps = sorted({(1, min(1, backbone_stages)), (2, min(2, backbone_stages)), (3, backbone_stages)})
        return FreezePlan.feature_extraction(head_lr=2e-3, backbone_lr_ratio=1.0, unfreeze_schedule=tuple(steps))
    raise EngineError(f"Unknown plan '{name}': a race picks from {', '.join(PLANS)}.")


def _backbone_stages(model: str) -> int:
    from engine.anatomy.stages import model_stages
    from engine.models.factory import create_model

    handle = create_model(model, weights="none")
    return sum(1 for s in model_stages(handle.module, handle.spec.head) if not s.is_head)


# ------------------------------------------------------------------ what a race costs before its first slice
PROBE_IMAGES = 8  # validation images decoded and passed through the model to time one image
# the probe's parts, summed, came to 0.7-0.8x of a race's set-up and slices (digits, 96 px, three plans,
# busy or idle 2 cores): a set-up also sizes micro-batches, checks the cut and times its close
ESTIMATE_MARGIN = 1.4


@dataclass(frozen=True)
class PlanCost:
    """One plan's fixed cost in a race (seconds): its set-up, and the least one slice takes (one
    training step, then its close: one evaluation of the validation set and the commit)."""

    setup_s: float
    step_s: float
    close_s: float

    @property
    def slice_s(self) -> float:
        return self.step_s + self.close_s


@dataclass(frozen=True)
class RaceEstimate:
    """What a race spends before and besides training, estimated from a probe of this data, model and
    image size on this machine now (``estimate_race``)."""

    plans: dict[str, PlanCost]
    train_images: int
    val_images: int
    image_ms: float  # decoding one image and one forward pass of the whole model over it, in milliseconds

    @property
    def setup_s(self) -> float:
        return sum(cost.setup_s for cost in self.plans.values())

    def least_budget(self, eta: int = ETA) -> float:
        """The smallest budget whose first rung, as the race splits it, gives every plan one slice after
        the set-ups: set-up + rungs x the plans' slices (each at least MIN_SLICE_S), the probe's seconds
        times ESTIMATE_MARGIN (what it does not time). Less would end the race in its first rung, or
        before it (a race that ran out in rung 1 ranks plans on one step)."""
        rungs = len(rung_sizes(len(self.plans), eta))
        slices = sum(max(MIN_SLICE_S, ESTIMATE_MARGIN * cost.slice_s) for cost in self.plans.values())
        return ESTIMATE_MARGIN * self.setup_s + rungs * slices

    def to_dict(self) -> dict[str, Any]:
        return {"setup_s": round(self.setup_s, 3), "train_images": self.train_images, "val_images": self.val_images,
                "image_ms": round(self.image_ms, 3),
                "plans": {name: {k: round(v, 4) for k, v in asdict(cost).items()} for name, cost in self.plans.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> RaceEstimate | None:
        """The estimate a race's config recorded; None when absent or unreadable (an older race)."""
        try:
            plans = {str(name): PlanCost(**{k: float(v) for k, v in cost.items()})
                     for name, cost in data["plans"].items()}
            return cls(plans, int(data["train_images"]), int(data["val_images"]), float(data["image_ms"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def estimate_race(base: TrainConfig, plans: tuple[str, ...]) -> RaceEstimate:
    """The set-up and least slice of each plan, before anything is written or trained.

    Why a probe and not the race's own set-up: a refusal must come before the runs exist and before the
    race waits its turn for the device (the app's launcher answers at the click, and the CLI before any
    folder is created), and measuring a real set-up costs what the set-up costs (10 s for feature
    extraction on digits at 96 px on 2 cores, more on bigger data). So the data is listed (not
    decoded), its split counted, the model built once (random weights: loading them is small beside the
    rest), a few validation images decoded and passed through it twice at the race's image size, with
    the time of each stage recorded, on this machine as loaded now. From those: a cached plan's set-up
    is one pass of every image through its frozen part (feature extraction, last stages: the feature
    cache), and its slice a step and an evaluation of its trainable top; a plan that trains on images
    (full fine-tune, gradual unfreezing) decodes and runs the whole model in each step and evaluation.
    The probe runs on one thread: the thread count the race takes on a busy machine (``race_threads``),
    and steady there, where two threads' timings swing 10x between calls. On an idle machine the race
    takes every core and runs faster than estimated. The race itself checks again after its set-ups,
    with the seconds it measured (``run_race``): the machine can be busier when its turn comes."""
    from engine.anatomy.stages import model_stages
    from engine.data.datasets import TransformDataset, load_source, validate
    from engine.data.splits import split_all
    from engine.data.transforms import eval_transform
    from engine.models.factory import create_model

    ds = load_source(base.data, verify=False)
    report = validate(ds)
    if not report.ok:
        from engine.core.errors import DataError

        raise DataError("The data cannot be trained on: " + " ".join(report.problems))
    train_idx, val_idx, _test = split_all(ds, base)
    builds = []
    for _ in range(2):  # the first build pays the model code's one-time costs (imports), the race's first plan too
        begun = time.perf_counter()
        handle = create_model(base.model, weights="none", class_names=list(ds.class_names))
        builds.append(time.perf_counter() - begun)
    size = base.image_size or handle.spec.input_size[-1]
    spec = replace(handle.spec, input_size=(3, size, size))
    probe = TransformDataset(ds, (val_idx or train_idx)[:PROBE_IMAGES], eval_transform(spec, size))
    stages = model_stages(handle.module, handle.spec.head)
    module = _as_the_race_runs_it(handle.module, base)
    with _threads(1):
        decode_s, images = _timed_decode(probe)
        forward_s, ends = _timed_forward(module, stages, _as_batch(images, base.batch_size))
        commit_s = _timed_commit(module)
    costs = {name: _plan_cost(name, base, module, stages, ends, builds[1], decode_s, forward_s,
                              len(train_idx), len(val_idx)) for name in plans}
    costs = {name: replace(cost, close_s=cost.close_s + commit_s) for name, cost in costs.items()}
    first = plans[0]
    costs[first] = replace(costs[first], setup_s=costs[first].setup_s + max(0.0, builds[0] - builds[1]))
    return RaceEstimate(costs, len(train_idx), len(val_idx), 1000 * (decode_s + forward_s))


def _as_the_race_runs_it(module: torch.nn.Module, base: TrainConfig) -> torch.nn.Module:
    """The memory format set_up gives a model (channels-last for convolutions, unless the config says):
    on a CPU it changes a depthwise network's pass by up to 2x."""
    last = base.channels_last if base.channels_last is not None else any(
        isinstance(m, torch.nn.Conv2d) for m in module.modules())
    return module.to(memory_format=torch.channels_last) if last else module


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch on ``count`` threads inside, the caller's count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def idle_cores(sample_s: float = 0.25) -> float | None:
    """How many CPU cores no process is using now: /proc/stat's idle time over ``sample_s`` seconds
    (the load average would still count the training that ended a minute ago). None off Linux."""
    def times() -> list[int]:
        with open("/proc/stat") as fh:
            return [int(x) for x in fh.readline().split()[1:]]

    try:
        before = times()
        time.sleep(sample_s)
        after = times()
    except (OSError, ValueError):
        return None
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    if total <= 0 or len(delta) < 5:
        return None
    idle = delta[3] + delta[4]  # idle + iowait
    return (os.cpu_count() or 1) * idle / total


def race_threads() -> int:
    """torch threads for a race (and for its estimate): the idle cores, at least one, at most what the
    caller runs with. Why: on a busy 2-core machine two threads stall at every barrier of a pass
    (ui/threads.py); measured, digits at 96 px, three plans, load ~2.6: set-up 66 s on two threads,
    16 s on one, and the one-thread race ran all its rungs within its 70 s. On an idle machine the
    race keeps every core."""
    idle = idle_cores()
    if idle is None:
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), math.floor(idle + 0.5)))


def _timed_decode(probe: Any) -> tuple[float, torch.Tensor]:
    """Seconds to read and transform one image (the faster of two reads of the probe: a busy machine
    pauses a process now and then), and the probe's images as one batch."""
    best, images = math.inf, None
    for _ in range(2):
        begun = time.perf_counter()
        images = torch.stack([probe[i][0] for i in range(len(probe))])
        best = min(best, (time.perf_counter() - begun) / max(1, len(images)))
    return best, images


def _as_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """The probe's few images repeated to a training batch, in the memory format set_up uses: a pass
    over 8 images costs more per image than the race's passes over whole batches."""
    repeats = max(1, math.ceil(size / max(1, len(images))))
    batch = images.repeat(repeats, 1, 1, 1)[:max(size, len(images))]
    return batch.contiguous(memory_format=torch.channels_last) if batch.ndim == 4 else batch


def _timed_forward(module: torch.nn.Module, stages: list, images: torch.Tensor) -> tuple[float, list[float]]:
    """Seconds of one forward pass per image (eval mode, the fastest of three), and for each stage the
    share of that pass done when the stage has run (hooks on its modules; 1.0 where none fired)."""
    marks: dict[int, float] = {}
    hooks = []
    for index, stage in enumerate(stages):
        for path in stage.modules:
            try:
                sub = module.get_submodule(path)
            except AttributeError:
                continue
            hooks.append(sub.register_forward_hook(
                lambda *_args, i=index: marks.__setitem__(i, max(marks.get(i, 0.0), time.perf_counter()))))
    best, shares = math.inf, [1.0] * len(stages)
    try:
        with evaluating(module), torch.inference_mode():
            for _ in range(3):  # the first may pay one-time set-up of the kernels, a busy machine a pause
                marks.clear()
                begun = time.perf_counter()
                module(images)
                took = time.perf_counter() - begun
                if took < best:
                    best = took
                    shares = [min(1.0, (marks[i] - begun) / took) if i in marks and took > 0 else 1.0
                              for i in range(len(stages))]
    finally:
        for hook in hooks:
            hook.remove()
    return best / max(1, len(images)), shares


def _timed_commit(module: torch.nn.Module) -> float:
    """Seconds an epoch's commit takes, about: the weights serialised three times (the last and best
    checkpoints, and the resumable state, whose AdamW moments are twice the weights it trains)."""
    import io

    begun = time.perf_counter()
    torch.save(module.state_dict(), io.BytesIO())
    return 3 * (time.perf_counter() - begun)


def _plan_cost(name: str, base: TrainConfig, module: torch.nn.Module, stages: list, ends: list[float],
               build_s: float, decode_s: float, forward_s: float, train_images: int, val_images: int) -> PlanCost:
    """One plan's set-up, step and evaluation, from the probe's per-image seconds (see estimate_race)."""
    from engine.training.feature_cache import uses_feature_cache
    from engine.training.prefix_cache import prefix_cut

    plan = race_plan(name, sum(1 for s in stages if not s.is_head))
    config = replace(base, plan=plan.to_dict())
    trains = set(plan.trainable_stage_names(stages, 0))
    first = next((i for i, stage in enumerate(stages) if stage.name in trains), len(stages) - 1)
    frozen = ends[first - 1] if first > 0 else 0.0  # the share of a forward pass below what trains
    top_s = forward_s * (1.0 - frozen)
    batch = min(base.batch_size, max(1, train_images))
    probe_close = 2 * min(batch, val_images) * (decode_s + forward_s)  # the race times two validation batches
    if str(base.data) not in BUILTIN_FACTS:  # each plan's set-up checks every image of a folder or zip
        build_s += (train_images + val_images) * decode_s
    if uses_feature_cache(plan, config) or prefix_cut(plan, config, stages, module) is not None:
        cache_s = (train_images + val_images) * (decode_s + forward_s * frozen)
        return PlanCost(build_s + cache_s + probe_close, batch * 3 * top_s, val_images * top_s)
    step = batch * (decode_s + forward_s + 2 * top_s)  # the whole forward; backward (about 2x) through what trains
    return PlanCost(build_s + probe_close, step, val_images * (decode_s + forward_s))


def create_race(runs_root: str | Path, base: TrainConfig, plans: tuple[str, ...], budget_s: float, *,
                eta: int = ETA, owner: int | None = None, estimate: RaceEstimate | None = None) -> list[RunDir]:
    """One queued run per plan, everything but the plan identical (data, split, seed, batch); the
    race itself (budget, eta, plan order, the estimate its budget was checked against) is written into
    each run's config. A budget the set-up and one slice per plan do not fit is refused first
    (``estimate``: one the caller made for these settings; else it is made here)."""
    plans = parse_plans(",".join(plans))
    if isinstance(eta, bool) or not isinstance(eta, int) or not 2 <= eta <= 10:
        raise EngineError(f"A race keeps the best 1/eta of the plans at each rung: eta is a whole number from 2 to 10 "
                          f"(got {eta!r}).")
    budget_value(budget_s)  # the cheap refusals before the probe
    estimate = estimate or estimate_race(base, plans)
    return _create(runs_root, base, plans, check_budget(budget_s, len(plans), eta, estimate), eta, owner, "race",
                   estimate)


def create_solo(runs_root: str | Path, base: TrainConfig, plan: str, budget_s: float) -> list[RunDir]:
    """One plan given the whole budget alone, trained exactly as a race trains (the same slicing, data,
    seed and LR; its one rung is the last, so annealed by the clock): the baseline a race's winner is
    measured against (bench/race.py)."""
    budget_value(budget_s)
    estimate = estimate_race(base, (plan,))
    return _create(runs_root, base, (plan,), check_budget(budget_s, 1, ETA, estimate), ETA, None, "solo", estimate)


def _create(runs_root: str | Path, base: TrainConfig, plans: tuple[str, ...], budget_s: float, eta: int,
            owner: int | None, kind: str, estimate: RaceEstimate | None = None) -> list[RunDir]:
    stages = _backbone_stages(base.model)
    group = f"{kind}-{secrets.token_hex(3)}"
    spec = {"budget_s": budget_s, "eta": eta, "plans": list(plans),
            "estimate": estimate.to_dict() if estimate is not None else None}
    configs = [replace(base, plan=race_plan(name, stages).to_dict(), group=group, label=LABELS[name],
                       schedule="constant", epochs=1, patience=None) for name in plans]
    runs = []
    for order, (name, config) in enumerate(zip(plans, configs)):
        runs.append(create_run(runs_root, {**config.to_dict(), "order": order, "race": {**spec, "plan": name}},
                               run_id=new_run_id(f"{group}-{name}"), owner=owner))
    return runs


def is_race(run: RunDir) -> bool:
    return isinstance(run.config_or_empty().get("race"), dict)


def race_runs(runs_root: str | Path, group: str) -> list[RunDir]:
    """The runs of a race, in plan order."""
    runs = [r for r in list_runs(runs_root) if r.config_or_empty().get("group") == group and is_race(r)]
    return sorted(runs, key=lambda r: o if isinstance(o := r.config_or_empty().get("order", 0), int) else 0)


def list_races(runs_root: str | Path) -> list[str]:
    """Race groups, newest first."""
    seen: list[str] = []
    for run in list_runs(runs_root):
        group = run.config_or_empty().get("group")
        if group and group not in seen and is_race(run):
            seen.append(group)
    return seen


# ------------------------------------------------------------------ one candidate
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
            test = test_evaluation(self.prep, self.runner, self.run)
            if test:
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


# ------------------------------------------------------------------ the race
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


def race_spec(runs: list[RunDir]) -> dict[str, Any]:
    spec = runs[0].config_or_empty().get("race") if runs else None
    if not isinstance(spec, dict):
        raise EngineError("These runs are not a race.")
    return spec


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
    for lane in lanes:
        lane.run.write_status(state="running", reason="", queue_position=None,
                              race={"started_at": wall0, "budget_s": budget, "rungs_planned": len(sizes),
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
    for r, size in enumerate(sizes):
        begun = time.perf_counter()  # what is left is split equally between the rungs that remain
        rung_end = begun + max(0.0, t0 + budget - begun) / (len(sizes) - r)
        turn = list(alive)
        for i, lane in enumerate(turn):
            now = time.perf_counter()
            if now >= t0 + budget:  # a hard stop: no slice starts after the budget
                spent = True
                break
            until = now + max(0.0, (rung_end - now) / (len(turn) - i))  # what is left of the rung, shared
            try:
                ok = lane.train_slice(until, cancelled, anneal=r + 1 == len(sizes))  # the last rung: alone
            except Diverged as exc:
                lane.finish("diverged", f"race: diverged in rung {r + 1}: {exc}", out_after=r + 1)
                alive.remove(lane)
                order.append(lane)
                continue
            if not ok:
                return _cancel(runs, lanes, r, t0, budget)
            say(f"rung {r + 1}/{len(sizes)}  {lane.label:<20} val acc "
                f"{lane.last.val_acc if lane.last else float('nan'):.4f}  at {time.perf_counter() - t0:6.1f} s")
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
        alive = [lane for lane in alive if lane.status == "running"]
        if spent or not alive:
            ended = r + 1
            break
    winner = alive[0] if alive else None  # a plan that finished no slice left ``alive`` above
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


def leaderboard(runs: list[RunDir]) -> list[dict[str, Any]]:
    """One row per plan, best place first: how far it got, its accuracy, its time, and in words why it
    ended where it did (a cancelled or refused plan's reason belongs beside it, not in a log). A plan
    that finished no slice has no place and is never the winner."""
    rows = []
    for run in runs:
        status = _race_status(run)
        race = status.get("race") if isinstance(status.get("race"), dict) else {}
        metrics = run.metrics()
        last = metrics[-1] if metrics else {}
        state = run.status()
        rows.append({
            "place": race.get("place") if metrics else None,
            "strategy": run.config_or_empty().get("label"),
            "winner": bool(race.get("winner")) and bool(metrics),
            "rungs": race.get("rungs", 0),
            "out_after_rung": race.get("out_after"),
            "val_acc": last.get("val_acc"),
            "best_val_acc": max((m["val_acc"] for m in metrics), default=None),
            "val_loss": last.get("val_loss"),
            "epochs": len(metrics),
            "images": sum(round(m.get("images_per_s", 0) * m.get("epoch_s", 0)) for m in metrics),
            "train_s": race.get("train_s"),
            "state": state.state,
            "reason": state.reason,
            "run_id": run.run_id,
        })
    return sorted(rows, key=lambda row: (row["place"] is None, row["place"] or 0,
                                         -(row["val_acc"] or 0.0)))


def _race_status(run: RunDir) -> dict[str, Any]:
    status = read_json(run.status_path, {})
    return status if isinstance(status, dict) else {}


def race_record(runs: list[RunDir]) -> dict[str, Any]:
    """What the race as a whole recorded (in its first run's status ``race``): when it started, its
    set-up seconds (``setup_s``, once every plan is set up) and, when it named no winner, why
    (``outcome``)."""
    race = _race_status(runs[0]).get("race") if runs else None
    return race if isinstance(race, dict) else {}


def race_curves(runs: list[RunDir]) -> list[dict[str, Any]]:
    """(plan, wall-clock seconds since the race started, validation accuracy) per closed epoch."""
    rows = []
    for run in runs:
        label = run.config_or_empty().get("label") or run.run_id
        for m in run.metrics():
            rows.append({"strategy": label, "epoch": m["epoch"], "race_s": m["elapsed_s"], "val_acc": m["val_acc"],
                         "val_loss": m["val_loss"]})
    return rows


def race_winner(runs: list[RunDir]) -> RunDir | None:
    """The run the race named winner; never one without a finished slice (no epoch, no score)."""
    for run in runs:
        if _race_status(run).get("race_winner") and run.metrics():
            return run
    return None


# ------------------------------------------------------------------ the device, the process
def train_race(runs: list[RunDir], *, lock: Any = None, wait: bool = False,
               say: Callable[[str], None] = lambda _line: None) -> RaceResult:
    """Run a race under the machine's device lock, held for the whole race as one job: ``wait``
    queues for it (every run's status says its place in line), otherwise a busy device is refused.
    Whatever ends the race early, no run is left reading "running"."""
    from engine.runs.locks import device_lock
    from engine.runs.process import Heartbeat, process_start
    from engine.runs.queue import CancelledInQueue, device_queue, in_line, wait_for_device
    from engine.training.run import _sigterm_as_interrupt

    device = TrainConfig.from_dict(runs[0].config()).device
    held = lock or device_lock(device, holder=f"race {runs[0].config_or_empty().get('group')}")
    for run in runs:  # this process races them (started again with --group, an earlier pid is dead): a
        run.write_status(pid=os.getpid(), pid_start=process_start(os.getpid()))  # status follows the live one

    def write_all(**fields: Any) -> None:
        for run in runs:
            if run.status().active:
                run.write_status(**fields)

    if lock is None and wait:
        def report(position: int, ahead: str) -> None:
            write_all(state="queued", queue_position=position, heartbeat=time.time(), reason=in_line(position, ahead))

        try:
            wait_for_device(held, device_queue(device), str(runs[0].path),
                            cancelled=lambda: any(r.cancel_requested() for r in runs), report=report)
        except CancelledInQueue as exc:
            _end_all(runs, "cancelled", str(exc))
            return RaceResult(group=str(runs[0].config_or_empty().get("group")), status="cancelled", winner=None,
                              seconds=0.0, budget_s=float(race_spec(runs)["budget_s"]), leaderboard=leaderboard(runs))
    elif lock is None:
        held.acquire()
    threads = race_threads()  # decided when its turn comes: the machine may have changed while it waited
    say(f"racing on {threads} thread{'s' if threads > 1 else ''} ({torch.get_num_threads()} available)")
    try:
        with _sigterm_as_interrupt(), Heartbeat(write_all), _threads(threads):
            return run_race(runs, say=say)
    except KeyboardInterrupt:
        _end_all(runs, "cancelled", "stopped by Ctrl-C or a termination signal")
        raise
    except EngineError as exc:
        _end_all(runs, "failed", str(exc))
        raise
    except BaseException as exc:
        _end_all(runs, "failed", f"internal error ({type(exc).__name__}); see log.txt")
        raise
    finally:
        held.release()


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
    from engine.runs.background import spawn_engine
    from engine.runs.process import process_start

    group = runs[0].config_or_empty()["group"]
    for run in runs:
        run.cancel_path.unlink(missing_ok=True)
        run.write_status(state="queued", pid=None, reason="", queue_position=None)
    pid = spawn_engine(["race", "--group", group, "--out", str(runs_root)], runs[0].log_path)
    for run in runs:
        run.write_status(pid=pid, pid_start=process_start(pid))
    return pid
