"""``--strategy auto``: the freeze plan chosen for the user, by the advisor and a short race on a sample.

A person who does not know which plan fits their images should not have to run a comparison first.
Before the first epoch, on the run's own training split (never its validation images):

1. **A sample.** Up to ``PER_CLASS`` training images of each class (``MAX_SAMPLE`` in all), two thirds to
   train on and one third held out (stratified, from the run's seed). One inference pass over it gives
   what enters the head and what enters the cut of each plan that trains on cached inputs
   (training/prefix_cache.py); those are kept (``Prepared.known``), so neither the candidates nor the
   run itself compute them again.
2. **The advisor** (engine/training/advice.py): data amount from the training split's images per class,
   task similarity from a linear probe on the sample's frozen features, cross-validated as the Model
   page's advisor does. Its corner of the matrix names a plan, and a neighbour races it:
   similar -> feature extraction vs the last stage; little data, not similar -> the last stage vs the
   last two. Both train on cached inputs, so ``PASSES`` passes over the sample cost a second or two and
   bring both near what they reach on it: a fair race. Enough data for a task unlike ImageNet -> a full
   fine-tune, without a race: it learns slower than the last stages at first and overtakes them later
   (digits at 96 px: after 10 steps on the sample 0.51 against the last two stages' 0.75; after 3
   epochs of all the data 0.981 against 0.969), which no race of seconds can see.
3. **The race.** Each candidate trains through the engine's own set-up and epochs with the LRs a
   comparison and a race use (engine/freeze/presets.py) and is scored on the held-out third.
4. **The pick.** The best held-out accuracy wins; within ``TIE`` of the advisor's plan, the advisor's
   plan (the sample is small: a point or two is noise, and the advisor's reasons hold). So where the
   probe itself is within ``TIE`` of perfect and the advisor says feature extraction, no race is run:
   nothing could overrule it (about a second saved: the photos of bench/time_to_accuracy.py).

The run then trains the pick on all its data. config.json records the plan as any other run's (so a
resume, an export and the exported script train exactly it) and ``auto_plan`` says how it was chosen:
the advice with its evidence, each candidate's score and seconds, the pick and why. Too few images to
hold any out: the advisor's plan without a race, and the record says so.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from engine.core.errors import EngineError
from engine.data.datasets import TransformDataset
from engine.freeze.presets import LABELS, named_plan
from engine.runs.events import no_emit
from engine.training.advice import recommend, similarity_from_features
from engine.training.epoch import Diverged
from engine.training.feature_cache import compute_inputs

if TYPE_CHECKING:
    from engine.config import TrainConfig
    from engine.training.setup import Prepared

PER_CLASS = 24  # sample images per class (two thirds train, one third held out)
MAX_SAMPLE = 240  # at most this many in all (many classes: fewer per class)
PASSES = 6  # passes over the sample's training part (cached inputs: a pass takes milliseconds to a second)
TIE = 0.02  # held-out accuracy within this of the advisor's plan: the advisor's plan
ORDER = ("fe", "last-1", "last-2", "full")  # less to more of the network trained
CACHED = ("fe", "last-1", "last-2")  # the plans a race trains on cached inputs (the frozen part run once)
PENDING = {"status": "pending"}  # config.json before the choice: ``fit`` chooses before its first epoch


@dataclass
class Candidate:
    plan: str  # a race plan name (engine/freeze/presets.py)
    label: str
    val_acc: float | None  # on the sample's held-out third; None: it failed (``note`` says why)
    val_loss: float | None = None
    seconds: float = 0.0
    method: str = ""
    note: str = ""


@dataclass
class AutoChoice:
    picked: str  # a race plan name
    plan: dict[str, Any]  # the FreezePlan it stands for, as config.json records it
    why: str
    advice: dict[str, Any]
    candidates: list[Candidate] = field(default_factory=list)
    sample: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        """What config.json's ``auto_plan`` keeps."""
        return {"status": "chosen", **asdict(self)}

    def summary(self) -> str:
        scores = ", ".join(f"{c.label} {c.val_acc:.3f}" if c.val_acc is not None else f"{c.label} failed"
                           for c in self.candidates)
        return (f"auto plan: {LABELS[self.picked]} ({self.why}){'; sample race: ' + scores if scores else ''}; "
                f"chosen in {self.seconds:.1f}s")


def is_pending(record: Any) -> bool:
    """config.json's ``auto_plan`` asks for a choice not made yet (anything but a dict reads as no)."""
    return isinstance(record, dict) and bool(record) and record.get("status") != "chosen"


def choose_plan(config: TrainConfig, prep: Prepared, stop: Callable[[], bool] = lambda: False) -> AutoChoice | None:
    """The plan for this run's data (module docstring); None when ``stop`` cancelled it. Every candidate
    trains a copy of ``prep``'s model; ``prep`` keeps the sample's cached inputs that the picked plan reads
    (``known``), and its model sits on the run's device and memory format, as set_up would put it."""
    from engine.anatomy.stages import model_stages

    started = time.perf_counter()
    ds = prep.train_ds.ds
    train_idx = list(prep.train_ds.indices)
    labels = [ds.labels[i] for i in train_idx]
    counts = {ds.class_names[c]: labels.count(c) for c in sorted(set(labels))}
    n_classes = len(ds.class_names)
    fit_idx, hold_idx = sample_split(train_idx, labels, config.seed, n_classes)
    handle = prep.handle
    backbone = sum(1 for s in model_stages(handle.module, handle.spec.head) if not s.is_head)
    cuts = cache_cuts(config, prep, backbone)
    found = _sample_features(config, prep, fit_idx + hold_idx, [c for c in cuts.values() if c], stop)
    if found is None:
        return None
    feats, y = found
    try:  # the Model page's advisor measures it so: its thresholds hold for this number
        similarity: Any = similarity_from_features(feats, y, handle.spec.head, seed=config.seed)
    except EngineError:  # a class with one sample image: no cross-validation; the advisor's middle ground
        similarity = "in between"
    advice = recommend(len(labels) / max(1, len(counts)), n_classes, similarity, counts)
    pair = candidates_for(advice.similarity, advice.data_amount)
    advised = pair[0]
    passes = race_passes(config.epochs, len(train_idx), len(fit_idx))
    sample = {"train": len(fit_idx), "held_out": len(hold_idx), "per_class": PER_CLASS, "passes": passes}
    no_race = why_no_race(pair, cuts, len(hold_idx), getattr(similarity, "probe_accuracy", None))
    if no_race:
        _keep_for(prep, cuts.get(advised))
        return AutoChoice(advised, named_plan(advised, backbone).to_dict(), f"{no_race}: the advisor's plan, no race",
                          advice.to_dict(), sample=sample, seconds=time.perf_counter() - started)
    candidates = []
    for name in pair:
        if stop():
            return None
        candidate = _trained_candidate(name, config, prep, (fit_idx, hold_idx), backbone, passes, stop)
        if candidate is None:
            return None
        candidates.append(candidate)
    picked, why = pick(candidates, pair)
    _keep_for(prep, cuts.get(picked))
    return AutoChoice(picked, named_plan(picked, backbone).to_dict(), why, advice.to_dict(), candidates,
                      sample, time.perf_counter() - started)


def why_no_race(pair: tuple[str, ...], cuts: dict[str, str | None], held_out: int, probe: float | None) -> str | None:
    """Why the advisor's plan (``pair[0]``) is taken without a race, or None: a race is run. ``probe``: the
    linear probe's cross-validated accuracy on the sample's frozen features."""
    if not held_out:
        return "too few images to hold any out"
    if len(pair) == 1:
        return ("a full fine-tune learns slower than the last stages at first and catches up later: a race of "
                "seconds on a sample would not judge it fairly")
    if not all(cuts.get(name) for name in pair):
        return ("these settings train every plan on images (augmentation, or the feature cache off): a race of a "
                "few passes would not judge them fairly")
    if pair[0] == "fe" and probe is not None and probe >= 1 - TIE:
        return (f"the frozen features already tell the sample's classes apart, probe {probe:.3f}, so no plan could "
                f"beat feature extraction by more than {TIE:.2f}")
    return None


def candidates_for(similarity: str, amount: str) -> tuple[str, ...]:
    """The advisor's corner as race plans, its own first: two plans that train on cached inputs (the frozen
    part runs once), so a race of a few passes brings both near what they reach on the sample. Enough data
    for a task unlike ImageNet: a full fine-tune alone (it cannot be raced fairly in seconds)."""
    if similarity == "similar":
        return "fe", "last-1"
    if amount == "enough":
        return ("full",)
    return "last-1", "last-2"


def pick(candidates: list[Candidate], pair: tuple[str, ...]) -> tuple[str, str]:
    """The winner of the advisor's ``pair`` (its own plan first) and why: the better held-out accuracy,
    unless the advisor's plan is within TIE of it (the sample is small: a point or two is noise)."""
    advised = pair[0]
    scored = [c for c in candidates if c.val_acc is not None and c.plan in pair]
    if not scored:
        return advised, "no candidate finished on the sample: the advisor's plan"
    best = max(scored, key=lambda c: (c.val_acc, -ORDER.index(c.plan)))
    mine = next((c for c in scored if c.plan == advised), None)
    if mine is None:
        return best.plan, "the advisor's plan did not finish on the sample"
    if best.val_acc - mine.val_acc <= TIE:
        return advised, ("the advisor's plan, best on the sample" if best is mine else
                         f"the advisor's plan, within {TIE:.2f} of the best on the sample")
    return best.plan, f"best on the sample by {best.val_acc - mine.val_acc:.3f}"


def sample_split(indices: list[int], labels: list[int], seed: int, n_classes: int) -> tuple[list[int], list[int]]:
    """Up to PER_CLASS images a class (MAX_SAMPLE in all), one third of each class held out (a class
    with one image: none held out)."""
    per_class = max(2, min(PER_CLASS, MAX_SAMPLE // max(1, n_classes)))
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in zip(indices, labels):
        by_class.setdefault(label, []).append(index)
    fit, hold = [], []
    for label in sorted(by_class):
        members = by_class[label]
        chosen = rng.sample(members, min(per_class, len(members)))
        held = len(chosen) // 3
        hold += chosen[:held]
        fit += chosen[held:]
    return fit, hold


def cache_cuts(config: TrainConfig, prep: Prepared, backbone: int) -> dict[str, str | None]:
    """Where each of the CACHED plans' cached inputs enter the model under these settings (None: that
    plan would train on images: augmentation, the feature cache off, a model the prefix cannot skip)."""
    from engine.anatomy.stages import model_stages
    from engine.training.feature_cache import cache_point, uses_feature_cache
    from engine.training.prefix_cache import prefix_cut

    handle = prep.handle
    stages = model_stages(handle.module, handle.spec.head)
    cuts: dict[str, str | None] = {}
    for name in CACHED:
        plan = named_plan(name, backbone)
        cuts[name] = (cache_point(handle, stages)[0] if uses_feature_cache(plan, config)
                      else prefix_cut(plan, config, stages, handle.module))
    return cuts


def _sample_features(config: TrainConfig, prep: Prepared, indices: list[int], cuts: list[str],
                     stop: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray] | None:
    """Frozen features (what enters the head) of sample images at the run's size, evaluation transform, in
    the layout and slices of the run's own feature pass; from the same forward, what enters each of
    ``cuts`` (where the race plans' cached inputs enter), kept in ``prep.known``: the candidates and then
    the run itself skip those images in their feature passes. None when stopped."""
    import torch
    from torch.utils.data import DataLoader

    from engine.core.device import resolve_device
    from engine.core.memory import inference_batch
    from engine.training.setup import channels_last_for

    handle = prep.handle
    module, device = handle.module, resolve_device(config.device)
    points = list(dict.fromkeys([handle.spec.head, *cuts]))
    channels_last = channels_last_for(config, module)
    module.to(device)  # what set_up does to this module next anyway
    if channels_last:
        module.to(memory_format=torch.channels_last)
    loader = DataLoader(TransformDataset(prep.train_ds.ds, indices, prep.val_ds.transform),
                        batch_size=inference_batch(module, (3, prep.image_size, prep.image_size)))
    computed = compute_inputs(module, points, loader, device, channels_last, stop, compiled=prep.compiled)
    if computed is None:
        return None
    found, labels = computed
    for cut in cuts:
        prep.known.setdefault(cut, {}).update(zip(indices, found[cut]))
    return found[handle.spec.head].flatten(1).numpy(), labels.numpy()


def _keep_for(prep: Prepared, cut: str | None) -> None:
    """Of the sample's cached inputs, only those the picked plan's run reads (none for a plan that trains on
    images): the others would be held in memory for the whole training."""
    for point in [p for p in prep.known if p != cut]:
        del prep.known[point]


def race_passes(epochs: int, train_images: int, sample_images: int) -> int:
    """Passes over the sample's training part: PASSES, or as many as the run will make over its own data
    when that is fewer (a tiny dataset for one epoch: 24 images against a sample part of 16 is one pass,
    not six). A race trained further than the run will train its pick judges a stage the run never reaches."""
    return max(1, min(PASSES, epochs * train_images // max(1, sample_images)))


def _trained_candidate(name: str, config: TrainConfig, prep: Prepared, split: tuple[list[int], list[int]],
                       backbone: int, passes: int, stop: Callable[[], bool]) -> Candidate | None:
    """A plan trained ``passes`` passes over the sample's training part, on a copy of the model."""
    from engine.training.setup import Prepared, set_up
    from engine.training.state import TrainState

    tick = time.perf_counter()
    ds = prep.train_ds.ds
    plan = named_plan(name, backbone)
    fit_idx, hold_idx = split
    trial = replace(config, plan=plan.to_dict(), epochs=passes, progressive_from=None, patience=None, auto_plan=None)
    sample = Prepared(copy.deepcopy(prep.handle), TransformDataset(ds, fit_idx, prep.train_ds.transform),
                      TransformDataset(ds, hold_idx, prep.val_ds.transform), prep.image_size, [],
                      known=prep.known, compiled=prep.compiled)
    state = TrainState.start(trial.monitor, trial.min_delta, None)
    label = LABELS[name]
    try:
        runner = set_up(trial, sample, state, None, stop)
        if runner is None:
            return None
        ended = None
        for epoch in range(1, passes + 1):
            ended = runner.run_epoch(epoch, state, no_emit, tick, stop)
            if ended is None:
                return None
            state.finish_epoch(ended, runner.steps)
    except Diverged as exc:
        return Candidate(name, label, None, seconds=time.perf_counter() - tick, note=f"diverged: {exc}")
    return Candidate(name, label, ended.val_acc, ended.val_loss, time.perf_counter() - tick,
                     method=f"{passes} pass{'es' if passes > 1 else ''} over the sample's training part")
