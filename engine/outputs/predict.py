"""Prediction: the model's own eval transform, eval() + inference_mode(), batched top-k; optional
test-time augmentation by horizontal flip (``class_probs``, shared with evaluation)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from PIL import Image

from engine.core.errors import EngineError
from engine.core.memory import inference_batch
from engine.core.modes import evaluating
from engine.data.images import open_image, shrink_to
from engine.data.transforms import eval_transform, input_target
from engine.training.feature_cache import outputs_and_head_inputs

if TYPE_CHECKING:
    from engine.data.images import ImageSource
    from engine.models.factory import ModelHandle
    from engine.runs.open_set import OpenSetRule


@dataclass
class TopK:
    label: str
    index: int
    prob: float


@dataclass
class FilePrediction:
    file: str
    topk: list[TopK] | None = None
    error: str | None = None
    temperature: float | None = None  # the run's calibration divided the logits by this (None: not calibrated)
    # the run's open-set rule (engine/runs/open_set.py): none of its classes? None: no rule applied
    unknown: bool | None = None
    unknown_score: float | None = None  # the rule's score: distance to the nearest training image
    unknown_threshold: float | None = None  # above it, "unknown"
    # a small RGB thumbnail of what the model saw (predict_sources(preview=...)): pages show this,
    # never the raw upload, so a huge file is decoded once, reduced, by engine.images
    preview: Image.Image | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        data: dict = {"file": self.file, "topk": None if self.topk is None else [asdict(t) for t in self.topk]}
        if self.error is not None:
            data["error"] = self.error
        if self.temperature is not None:
            data["temperature"] = self.temperature
        if self.unknown is not None:
            data.update(unknown=self.unknown, unknown_score=self.unknown_score,
                        unknown_threshold=self.unknown_threshold)
        return data


def model_device(module: torch.nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def class_probs(
    module: torch.nn.Module, batch: torch.Tensor, *, tta: bool = False, max_batch: int | None = None,
    temperature: float | None = None, head: str | None = None, features: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax probabilities of ``batch`` (N, C, H, W, on the model's device): ``(plain, with_tta)``,
    ``with_tta`` None unless ``tta``. The one place predictions and evaluations run the model.

    Test-time augmentation (TTA) by horizontal flip: the model also sees the mirror of exactly the crop
    it was given, and the two softmax distributions are averaged. Probabilities, not logits: the mean
    of two distributions is a distribution whose confidence and log-loss read like a plain prediction's
    (so accuracy and loss compare side by side), and one view's large logits cannot outvote the other.
    It is off by default: it only helps where a mirrored image is the same class (photos of objects,
    animals, faces); digits, letters, text or left/right classes are not mirror-symmetric, and there
    it costs accuracy while doubling the compute.

    The mirror goes through the model on its own, after the images: two forwards of N, each in slices
    of at most ``max_batch`` (``core.memory.inference_batch``; None: all at once), never one forward of
    2N. On 2 CPU cores, efficientnet_lite0 at 224 px (bench/tta.py), two forwards of 2 and of 4 images
    took 50 and 120 ms against 58 and 132 ms for one forward of 4 and of 8 (1 image: the same 30 ms),
    and at a whole number of slices both run the same forwards; it also never holds a 2N-image copy.
    Under the model's lock, in eval mode and inference mode; float32 results on the model's device.
    ``temperature``: a calibrated run's T (engine/runs/calibration.py): the logits are divided by it
    before the softmax (the top-1 never changes); None: the plain softmax.
    ``head`` and ``features``: the features entering the head module ``head`` for each image (of the
    plain view) are appended to the list ``features``, from the same forwards (the open-set rule reads them).
    """
    step = max(1, max_batch or len(batch))

    def forward(views: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        outs = []
        for start in range(0, len(views), step):
            if keep is not None and head is not None:
                logits, kept = outputs_and_head_inputs(module, head, views[start:start + step])
                keep.append(kept.float())
            else:
                logits = module(views[start:start + step])
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            logits = logits.float()
            outs.append((logits if temperature is None else logits / temperature).softmax(dim=-1))
        return torch.cat(outs)

    with evaluating(module), torch.inference_mode():  # per call: a shared model is not held for long
        plain = forward(batch, features)
        if not tta:
            return plain, None
        return plain, (plain + forward(batch.flip(-1))) / 2


def predict_images(
    handle: ModelHandle,
    images: Sequence[Image.Image],
    top_k: int = 5,
    batch_size: int | None = None,
    image_size: int | None = None,
    tta: bool = False,
    temperature: float | None = None,
    open_set: OpenSetRule | None = None,
    unknown_scores: list[float] | None = None,
) -> list[list[TopK]]:
    """Top-k classes for each PIL image (any mode: converted to RGB by the caller or here).

    ``batch_size`` None: slices sized to the model and image size (``core.memory.inference_batch``).
    ``tta``: average with the horizontal mirror (``class_probs``; off by default, see there why).
    ``temperature``: a calibrated run's T, dividing the logits before the softmax (``class_probs``).
    ``open_set``: a run's open-set rule; each image's score under it is appended to ``unknown_scores``.
    """
    if not images:
        return []
    transform = eval_transform(handle.spec, image_size)
    target = input_target(handle.spec, image_size)
    k = max(1, min(top_k, handle.spec.num_classes))
    module = handle.module
    device = model_device(module)
    if batch_size is None:
        side = image_size or handle.spec.input_size[-1]
        batch_size = inference_batch(module, (3, side, side))
    results: list[list[TopK]] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.stack([transform(shrink_to(im.convert("RGB"), target)) for im in chunk]).to(device)
        features: list[torch.Tensor] | None = [] if open_set is not None else None
        plain, mirrored = class_probs(module, batch, tta=tta, max_batch=batch_size, temperature=temperature,
                                      head=handle.spec.head, features=features)
        if open_set is not None and unknown_scores is not None:
            unknown_scores.extend(open_set.scores(torch.cat(features)).tolist())
        probs = mirrored if tta else plain
        values, indices = probs.topk(k, dim=-1)
        for vals, idxs in zip(values.tolist(), indices.tolist()):
            results.append([TopK(label=handle.spec.class_names[i], index=i, prob=float(v)) for v, i in zip(vals, idxs)])
    return results


def predict_sources(
    handle: ModelHandle,
    sources: Sequence[tuple[str, ImageSource]],
    top_k: int = 5,
    batch_size: int = 32,
    preview: int | None = None,
    tta: bool = False,
    temperature: float | None = None,
    open_set: OpenSetRule | None = None,
) -> list[FilePrediction]:
    """Predict for (name, path-or-bytes) pairs, one result per pair in the same order (names may
    repeat); unreadable ones get an error, the rest a top-k.

    Images are decoded reduced to what the model needs (input_target), ``batch_size`` files at a
    time, and predicted in model-sized slices, so memory stays bounded however many files come. ``preview``: also keep a thumbnail of at most
    that many pixels a side in each result. ``tta``: average with the horizontal mirror (``class_probs``).
    ``temperature``: a calibrated run's T (``class_probs``); each result then names it.
    ``open_set``: a run's open-set rule: each result says whether its image is none of the classes.
    """
    target = input_target(handle.spec)
    out: list[FilePrediction] = []
    for start in range(0, len(sources), max(1, batch_size)):
        good: list[tuple[FilePrediction, Image.Image]] = []
        for name, src in sources[start:start + max(1, batch_size)]:
            result = FilePrediction(file=name)
            out.append(result)
            try:
                image = open_image(src, name=name, target=target)
            except EngineError as exc:  # the reason alone: the result names its file already
                result.error = str(exc).removeprefix(f"{name}: ")
                continue
            if preview:
                result.preview = image.copy()
                result.preview.thumbnail((preview, preview))
            good.append((result, image))
        scores: list[float] = []
        preds = predict_images(handle, [im for _, im in good], top_k=top_k, tta=tta,  # model-sized slices
                               temperature=temperature, open_set=open_set, unknown_scores=scores)
        flags = open_set.unknown(torch.tensor(scores)).tolist() if open_set is not None and scores else []
        for n, ((result, _), topk) in enumerate(zip(good, preds)):
            result.topk, result.temperature = topk, temperature
            if open_set is not None:
                result.unknown, result.unknown_score, result.unknown_threshold = flags[n], scores[n], open_set.threshold
    return out


def predict_files(handle: ModelHandle, paths: Sequence[str | Path], top_k: int = 5, tta: bool = False,
                  temperature: float | None = None, open_set: OpenSetRule | None = None) -> list[FilePrediction]:
    return predict_sources(handle, [(str(p), Path(p)) for p in paths], top_k=top_k, tta=tta, temperature=temperature,
                           open_set=open_set)
