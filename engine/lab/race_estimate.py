"""What a race will cost before it starts, and the threads it takes (engine/lab/race.py runs it).

Before anything is written, a budget that set-up and one slice per plan in the first rung do not fit
is refused, naming the least that would (``check_budget`` with ``estimate_race``: a probe of this data,
model and image size on this machine). The race itself checks again after its set-ups, with what it
measured. A race takes the idle cores when its turn comes (``race_threads``), at least one and never
more than its caller runs with.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

import torch

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.core.modes import evaluating
from engine.data.datasets import BUILTIN_FACTS
from engine.freeze.presets import LABELS, named_plan
from engine.lab.race_plans import ETA, MIN_SLICE_S, budget_value, rung_sizes


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
    with threads(1):
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
def threads(count: int) -> Iterator[None]:
    """torch on ``count`` threads inside, the caller's count restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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

    plan = named_plan(name, sum(1 for s in stages if not s.is_head))
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

