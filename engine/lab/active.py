"""Which unlabelled images to label next (active learning): the ones a trained run is least sure about,
spread over what the pool holds.

Why: labels are the expensive part of a small dataset. An image the model already classifies with
confidence teaches it little; one it hesitates on sits near a decision boundary, where a label moves
the boundary. But the most uncertain images are often near-copies of each other (ten frames of one
video, one object photographed ten times), and ten labels on one spot teach what one label teaches.

The rule, in two steps:

1. **Score** each image by the uncertainty of the run's calibrated probabilities (the logits divided
   by the run's temperature when it has one, ``engine.runs.calibration``, as ``predict --run`` does):
   ``margin`` (default): ``1 - (p1 - p2)``, one minus the gap between the two most probable classes;
   ``entropy``: the entropy of the probabilities divided by ``log(C)``. Both lie in [0, 1], 1 the most
   uncertain.
2. **Pick greedily**: the next image is the one with the highest ``score - diversity * s``, where ``s``
   is its largest cosine similarity (negatives count as 0) to the images already picked or labelled,
   in the features entering the run's classifier (``engine.training.feature_cache``, the features the
   feature map draws), centred on the pool's mean so that "similar" means similar among these images.
   An exact copy of a picked image has s = 1 and loses ``diversity`` points; an unrelated image loses
   about nothing. ``diversity`` 0 is the plain uncertainty order.

``bench/active.py`` measures the rule against random picking on digits (docs/active-learning.md).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from engine.core.errors import DataError, EngineError
from engine.core.memory import inference_batch
from engine.core.modes import evaluating
from engine.data.archive import is_hidden_name
from engine.data.images import IMAGE_SUFFIXES, ImageSource, open_image
from engine.training.feature_cache import outputs_and_head_inputs

if TYPE_CHECKING:
    from PIL import Image

    from engine.models.factory import ModelHandle
    from engine.runs.open_set import OpenSetRule
    from engine.runs.store import RunDir

SCORES = ("margin", "entropy")
DEFAULT_SCORE = "margin"
DEFAULT_DIVERSITY = 0.5
MAX_POOL = 10_000  # images scored at once: features of 10k images at 1,280 floats are ~50 MB
NOT_IMAGE = "not an image file type"


@dataclass
class Suggestion:
    """One image to label, as the list shows it."""

    path: str  # its name in the pool (relative to the pool folder, or the upload's name)
    predicted: str  # the run's guess
    score: float  # the uncertainty (module docstring), 0..1, 1 the most uncertain
    probability: float  # of the guess (calibrated)
    runner_up: str  # the second most probable class
    index: int  # its position in the pool as given
    # the run's open-set rule (engine/runs/open_set.py) says it is none of the classes: label it only if
    # a class is missing, else leave it out. None: the run has no rule
    unknown: bool | None = None


@dataclass
class SuggestReport:
    """The list ``suggest_labels`` gives, with what it was scored by."""

    run_id: str
    checkpoint: str
    score: str  # margin | entropy
    diversity: float
    scored: int  # readable images of the pool
    suggestions: list[Suggestion]  # most informative first (the greedy order)
    temperature: float | None = None  # the run's calibration divided the logits by this
    unreadable: list[dict[str, str]] = field(default_factory=list)  # {file, reason}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PoolScores:
    """A run's view of a pool: what ranking needs, computed once (a page keeps it while it reranks)."""

    names: list[str]  # the readable images, in pool order
    positions: list[int]  # each one's position in the pool as given
    probs: torch.Tensor  # (n, C) calibrated probabilities
    features: torch.Tensor  # (n, D) the classifier's inputs
    class_names: list[str]
    temperature: float | None = None
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    previews: list[Image.Image | None] = field(default_factory=list, repr=False)  # thumbnails when asked for


def uncertainty(probs: torch.Tensor, score: str = DEFAULT_SCORE) -> torch.Tensor:
    """The uncertainty of each row of ``probs`` (n, C) by ``score`` (module docstring), in [0, 1]."""
    if score not in SCORES:
        raise EngineError(f"Unknown score '{score}': use {' or '.join(SCORES)}.")
    p = probs.double()
    if p.shape[1] < 2:
        return torch.zeros(p.shape[0], dtype=torch.float64)
    if score == "margin":
        top2 = p.topk(2, dim=1).values
        return (1.0 - (top2[:, 0] - top2[:, 1])).clamp(0.0, 1.0)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
    return (entropy / math.log(p.shape[1])).clamp(0.0, 1.0)


def rank_pool(scores: torch.Tensor, features: torch.Tensor | None, top: int, diversity: float = DEFAULT_DIVERSITY,
              labelled: Sequence[int] = ()) -> list[int]:
    """The greedy order (module docstring) of the first ``top`` rows: highest ``score - diversity * s``
    first, ``s`` the largest similarity to the rows already picked or in ``labelled`` (which are never
    listed). Ties go to the earlier row. ``features`` None or ``diversity`` 0: by score alone."""
    n = int(scores.shape[0])
    closest = torch.zeros(n, dtype=torch.float64)
    unit = None
    if features is not None and diversity > 0 and n:
        centred = features.double() - features.double().mean(0, keepdim=True)
        unit = torch.nn.functional.normalize(centred, dim=1)  # a zero row stays zero: similar to nothing
    taken = torch.zeros(n, dtype=torch.bool)

    def take(i: int) -> None:
        taken[i] = True
        if unit is not None:
            closest.copy_(torch.maximum(closest, (unit @ unit[i]).clamp_min(0.0)))

    for i in labelled:
        if 0 <= i < n:
            take(int(i))
    order: list[int] = []
    while len(order) < min(top, n) and not bool(taken.all()):
        value = scores.double() - diversity * closest if unit is not None else scores.double()
        value = value.masked_fill(taken, -math.inf)
        best = int(torch.argmax(value))  # the first of equal values
        order.append(best)
        take(best)
    return order


def suggest(pool: PoolScores, top: int, *, score: str = DEFAULT_SCORE, diversity: float = DEFAULT_DIVERSITY,
            labelled: Sequence[int] = (), open_set: OpenSetRule | None = None) -> list[Suggestion]:
    """The ``top`` images of a scored pool to label next; ``labelled``: rows (of ``pool.names``) labelled
    since it was scored: never listed, and the others are picked away from them too. ``open_set``: the
    run's rule marks the images that are none of its classes (they keep their place in the list)."""
    u = uncertainty(pool.probs, score)
    unknown = open_set.unknown(open_set.scores(pool.features)).tolist() if open_set is not None and len(u) else None
    order = rank_pool(u, pool.features, top, diversity, labelled)
    best = pool.probs.topk(min(2, pool.probs.shape[1]), dim=1)
    names = pool.class_names

    def runner_up(i: int) -> str:
        return names[int(best.indices[i, 1])] if best.indices.shape[1] > 1 else names[int(best.indices[i, 0])]

    return [Suggestion(path=pool.names[i], predicted=names[int(best.indices[i, 0])], score=float(u[i]),
                       probability=float(best.values[i, 0]), runner_up=runner_up(i), index=pool.positions[i],
                       unknown=None if unknown is None else bool(unknown[i]))
            for i in order]


def score_pool(handle: ModelHandle, pool: Sequence[tuple[str, ImageSource]], *, temperature: float | None = None,
               preview: int | None = None) -> PoolScores:
    """Probabilities and classifier-input features of every readable image of ``pool`` (name, path or
    bytes), in one forward each, eval mode, model-sized slices. Every image goes through
    ``engine.data.images.open_image`` (header checked before any decode, decoded reduced to what the
    model needs); a file that is not an image, or does not decode, is listed in ``unreadable`` with its
    reason. ``preview``: also keep a thumbnail of at most that many pixels a side of each readable one.
    Raises DataError when nothing in the pool can be read."""
    from engine.data.transforms import eval_transform, input_target
    from engine.outputs.predict import model_device

    if len(pool) > MAX_POOL:
        raise DataError(f"The pool holds {len(pool):,} files; at most {MAX_POOL:,} are scored at once: split it.")
    spec = handle.spec
    module = handle.module
    transform, target = eval_transform(spec), input_target(spec)
    step = inference_batch(module, spec.input_size)
    device = model_device(module)
    out = PoolScores(names=[], positions=[], probs=torch.empty(0), features=torch.empty(0),
                     class_names=list(spec.class_names), temperature=temperature)
    probs, feats = [], []
    for start in range(0, len(pool), step):
        batch = []
        for pos in range(start, min(start + step, len(pool))):
            name, source = pool[pos]
            if isinstance(source, (str, Path)) and Path(source).suffix.lower() not in IMAGE_SUFFIXES:
                out.unreadable.append((name, NOT_IMAGE))
                continue
            try:
                image = open_image(source, name=name, target=target)
            except EngineError as exc:  # the reason alone: the entry names its file
                out.unreadable.append((name, str(exc).removeprefix(f"{name}: ")))
                continue
            out.names.append(name)
            out.positions.append(pos)
            if preview:
                thumb = image.copy()
                thumb.thumbnail((preview, preview))
                out.previews.append(thumb)
            batch.append(transform(image))
        if not batch:
            continue
        with evaluating(module), torch.inference_mode():
            logits, head_in = outputs_and_head_inputs(module, spec.head, torch.stack(batch).to(device))
        logits = logits.float()
        probs.append((logits if temperature is None else logits / temperature).softmax(-1).cpu())
        feats.append(head_in.float().cpu())
    if not probs:
        shown = "; ".join(f"{n}: {r}" for n, r in out.unreadable[:3]) + (" ..." if len(out.unreadable) > 3 else "")
        raise DataError(f"None of the {len(pool)} file(s) of the pool is a readable image ({shown}).")
    out.probs, out.features = torch.cat(probs), torch.cat(feats)
    return out


def pool_files(folder: str | Path) -> list[tuple[str, Path]]:
    """Every file under ``folder`` (sub-folders too, hidden names and links to folders skipped), as
    (name relative to the folder, path), sorted: what ``score_pool`` reads, and whose non-images it
    reports. Raises DataError for a missing folder or one holding no files."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"The pool {folder} is not a folder.")
    found: list[tuple[str, Path]] = []
    for here, dirs, files in os.walk(root, followlinks=False):  # a link to a folder is never entered
        dirs[:] = sorted(d for d in dirs if not is_hidden_name(d))
        for f in sorted(files):
            if not is_hidden_name(f):
                path = Path(here) / f
                found.append((path.relative_to(root).as_posix(), path))
    if not found:
        raise DataError(f"The pool {folder} holds no files: put the unlabelled images there.")
    return sorted(found)


def suggest_labels(run: RunDir, pool: Sequence[tuple[str, ImageSource]], top: int = 10, *,
                   score: str = DEFAULT_SCORE, diversity: float = DEFAULT_DIVERSITY,
                   kind: str = "best") -> SuggestReport:
    """The ``top`` images of ``pool`` (name, path or bytes) that ``run`` (its ``kind`` checkpoint, its
    calibration) would learn most from, most informative first, by the rule of the module docstring."""
    from engine.runs.calibration import run_temperature
    from engine.runs.load import load_run_model
    from engine.runs.open_set import run_open_set

    if top < 1:
        raise EngineError("--top must be at least 1.")
    if not math.isfinite(diversity) or diversity < 0:
        raise EngineError("--diversity must be a number, 0 or more.")
    uncertainty(torch.ones(1, 2), score)  # an unknown score is refused before the model loads
    handle = load_run_model(run.path, kind)
    temperature = run_temperature(run) if kind == "best" else None
    scored = score_pool(handle, pool, temperature=temperature)
    return SuggestReport(run_id=run.run_id, checkpoint=kind, score=score, diversity=diversity,
                         scored=len(scored.names), temperature=temperature,
                         suggestions=suggest(scored, top, score=score, diversity=diversity,
                                             open_set=run_open_set(run, handle.spec.num_classes) if kind == "best"
                                             else None),
                         unreadable=[{"file": f, "reason": r} for f, r in scored.unreadable])
