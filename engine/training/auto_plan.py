"""``--strategy auto``: the freeze plan chosen for the user, by the advisor and a short race on a sample.

A person who does not know which plan fits their images should not have to run a comparison first.
Before the first epoch, on the run's own training split (never its validation images):

1. **A sample.** Up to ``PER_CLASS`` training images of each class, two thirds to train on and one
   third held out (stratified, from the run's seed).
2. **The advisor** (engine/training/advice.py): data amount from the training split's images per class,
   task similarity from a linear probe on the frozen features of the sample. Its corner of the matrix
   names a plan, and its neighbour (one step more or less of the backbone trained) races it:
   similar -> feature extraction vs the last stage; enough data, not similar -> a full fine-tune vs
   the last two stages; little data, not similar -> the last stage vs the last two.
3. **The race.** Feature extraction is scored by the probe itself (a linear head fit to the sample's
   frozen features, scored on the held-out third: what feature extraction trains, to convergence, for
   the features already computed); each plan that trains backbone stages is trained ``PASSES`` passes
   over the sample's two thirds, through the engine's own set-up and epochs (the LRs a comparison
   and a race use, engine/freeze/presets.py), and scored on the same third.
4. **The pick.** The best held-out accuracy wins; within ``TIE`` of the advisor's plan, the advisor's
   plan (the sample is small: a point or two is noise, and the advisor's reasons hold).

The run then trains the picked plan on all its data. config.json records the plan as any other run's
(so a resume, an export and the exported script train exactly it) and ``auto_plan`` says how it was
chosen: the advice, each candidate's score and seconds, the pick and why. Too few images to hold any
out: the advisor's plan without a race, and the record says so.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from engine.data.datasets import TransformDataset
from engine.freeze.presets import LABELS, named_plan
from engine.runs.events import no_emit
from engine.training.advice import probe_accuracy, recommend, similarity_evidence
from engine.training.epoch import Diverged
from engine.training.feature_cache import compute_features

if TYPE_CHECKING:
    from engine.config import TrainConfig
    from engine.training.setup import Prepared

PER_CLASS = 24  # sample images per class (two thirds train, one third held out)
MAX_SAMPLE = 240  # at most this many in all (many classes: fewer per class)
PASSES = 2  # passes over the sample's training part for a plan that trains backbone stages
TIE = 0.02  # held-out accuracy within this of the advisor's plan: the advisor's plan
ORDER = ("fe", "last-1", "last-2", "full")  # less to more of the network trained
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


def is_pending(record: dict[str, Any] | None) -> bool:
    return bool(record) and record.get("status") != "chosen"


def choose_plan(config: TrainConfig, prep: Prepared, stop: Callable[[], bool] = lambda: False,
                say: Callable[[str], None] = lambda _line: None) -> AutoChoice | None:
    """The plan for this run's data (module docstring); None when ``stop`` cancelled it. ``prep`` is
    left as it was: every candidate trains a copy of its model."""
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
    say(f"auto plan: a sample of {len(fit_idx) + len(hold_idx)} training images "
        f"({len(fit_idx)} to train, {len(hold_idx)} held out)")
    found = _sample_features(config, prep, fit_idx + hold_idx, stop)
    if found is None:
        return None
    feats, y = found
    probe = _probe_candidate(feats, y, len(fit_idx))  # feature extraction's score, and the similarity evidence
    if probe.val_acc is not None and hold_idx:
        similarity: Any = similarity_evidence(probe.val_acc, y[len(fit_idx):], f"linear probe on frozen "
                                              f"'{handle.spec.head}' inputs of the sample, scored on its held-out third")
    else:  # too few images to hold any out: the advisor's middle ground
        similarity = "in between"
    advice = recommend(len(labels) / max(1, len(counts)), n_classes, similarity, counts)
    first, second = candidates_for(advice.similarity, advice.data_amount)
    advised = first
    sample = {"train": len(fit_idx), "held_out": len(hold_idx), "per_class": PER_CLASS}
    if not hold_idx:
        return AutoChoice(advised, named_plan(advised, backbone).to_dict(),
                          "too few images to hold any out: the advisor's plan, no race", advice.to_dict(),
                          sample=sample, seconds=time.perf_counter() - started)
    candidates = [probe]  # feature extraction is scored anyway: its row is free evidence, and it may win
    for name in (first, second):
        if name == "fe":
            continue
        if stop():
            return None
        candidate = _trained_candidate(name, config, prep, fit_idx, hold_idx, backbone, stop)
        if candidate is None:
            return None
        candidates.append(candidate)
        say(f"auto plan: {candidate.label}: " + (f"held-out acc {candidate.val_acc:.3f}" if candidate.val_acc
                                                 is not None else candidate.note) + f" ({candidate.seconds:.1f}s)")
    picked, why = pick(candidates, (first, second))
    return AutoChoice(picked, named_plan(picked, backbone).to_dict(), why, advice.to_dict(), candidates,
                      sample, time.perf_counter() - started)


def candidates_for(similarity: str, amount: str) -> tuple[str, str]:
    """The advisor's corner as two race plans: its own first, then the neighbour that races it."""
    if similarity == "similar":
        return "fe", "last-1"
    if amount == "enough":
        return "full", "last-2"
    return "last-1", "last-2"


def pick(candidates: list[Candidate], pair: tuple[str, str]) -> tuple[str, str]:
    """The winner of the advisor's ``pair`` (its own plan first) and why: the better held-out accuracy,
    unless the advisor's plan is within TIE of it. Feature extraction's probe row, when it is not one
    of the pair, is evidence only: a converged probe against plans trained a few steps is no fair race."""
    advised = pair[0]
    scored = [c for c in candidates if c.val_acc is not None and c.plan in pair]
    if not scored:
        return advised, "no candidate finished on the sample: the advisor's plan"
    best = max(scored, key=lambda c: (c.val_acc, -ORDER.index(c.plan)))
    mine = next((c for c in scored if c.plan == advised), None)
    if mine is not None and best.val_acc - mine.val_acc <= TIE:
        return advised, ("the advisor's plan, best on the sample" if best is mine else
                         f"the advisor's plan, within {TIE:.2f} of the best on the sample")
    return best.plan, f"best on the sample by {best.val_acc - (mine.val_acc if mine else 0.0):.3f}"


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


def _sample_features(config: TrainConfig, prep: Prepared, indices: list[int],
                     stop: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray] | None:
    """Frozen features (what enters the head) of sample images, at the run's size, evaluation transform,
    in the layout and slices the run's own feature pass uses (channels-last: 1.5 s instead of 2.1 s for
    120 photos at 224 px); None when stopped."""
    import torch
    from torch.utils.data import DataLoader

    from engine.core.device import resolve_device
    from engine.core.memory import inference_batch
    from engine.training.setup import channels_last_for

    module, device = prep.handle.module, resolve_device(config.device)
    channels_last = channels_last_for(config, module)
    module.to(device)  # what set_up does to this module next anyway
    if channels_last:
        module.to(memory_format=torch.channels_last)
    source = TransformDataset(prep.train_ds.ds, indices, prep.val_ds.transform)
    loader = DataLoader(source, batch_size=inference_batch(module, (3, prep.image_size, prep.image_size)))
    found = compute_features(module, prep.handle.spec.head, loader, device, channels_last, stop)
    return None if found is None else (found[0].numpy(), found[1].numpy())


def _probe_candidate(feats: np.ndarray, y: np.ndarray, n_fit: int) -> Candidate:
    """Feature extraction's score: a linear head fit to the frozen features of the sample's training part."""
    tick = time.perf_counter()
    fit_y = y[:n_fit]
    if len(np.unique(fit_y)) < 2:
        return Candidate("fe", LABELS["fe"], None, note="one class in the sample's training part")
    acc = probe_accuracy(feats[:n_fit], fit_y, feats[n_fit:], y[n_fit:])
    return Candidate("fe", LABELS["fe"], acc, seconds=time.perf_counter() - tick,
                     method="linear probe on the frozen features")


def _trained_candidate(name: str, config: TrainConfig, prep: Prepared, fit_idx: list[int], hold_idx: list[int],
                       backbone: int, stop: Callable[[], bool]) -> Candidate | None:
    """A plan trained PASSES passes over the sample's training part, on a copy of the model."""
    from engine.training.setup import Prepared, set_up
    from engine.training.state import TrainState

    tick = time.perf_counter()
    ds = prep.train_ds.ds
    plan = named_plan(name, backbone)
    trial = replace(config, plan=plan.to_dict(), epochs=PASSES, progressive_from=None, patience=None, auto_plan=None)
    sample = Prepared(copy.deepcopy(prep.handle), TransformDataset(ds, fit_idx, prep.train_ds.transform),
                      TransformDataset(ds, hold_idx, prep.val_ds.transform), prep.image_size, [])
    state = TrainState.start(trial.monitor, trial.min_delta, None)
    label = LABELS[name]
    try:
        runner = set_up(trial, sample, state, None, stop)
        if runner is None:
            return None
        ended = None
        for epoch in range(1, PASSES + 1):
            ended = runner.run_epoch(epoch, state, no_emit, tick, stop)
            if ended is None:
                return None
            state.finish_epoch(ended, runner.steps)
    except Diverged as exc:
        return Candidate(name, label, None, seconds=time.perf_counter() - tick, note=f"diverged: {exc}")
    return Candidate(name, label, ended.val_acc, ended.val_loss, time.perf_counter() - tick,
                     method=f"{PASSES} passes over the sample's training part")
