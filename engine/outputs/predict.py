"""Prediction: the model's own eval transform, eval() + inference_mode(), batched top-k."""
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

if TYPE_CHECKING:
    from engine.data.images import ImageSource
    from engine.models.factory import ModelHandle


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
    # a small RGB thumbnail of what the model saw (predict_sources(preview=...)): pages show this,
    # never the raw upload, so a huge file is decoded once, reduced, by engine.images
    preview: Image.Image | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        data: dict = {"file": self.file, "topk": None if self.topk is None else [asdict(t) for t in self.topk]}
        if self.error is not None:
            data["error"] = self.error
        return data


def model_device(module: torch.nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def predict_images(
    handle: ModelHandle,
    images: Sequence[Image.Image],
    top_k: int = 5,
    batch_size: int | None = None,
    image_size: int | None = None,
) -> list[list[TopK]]:
    """Top-k classes for each PIL image (any mode: converted to RGB by the caller or here).

    ``batch_size`` None: slices sized to the model and image size (``core.memory.inference_batch``).
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
        with evaluating(module), torch.inference_mode():  # per batch: a shared model is not held for long
            logits = module(batch)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        probs = logits.float().softmax(dim=-1)
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
) -> list[FilePrediction]:
    """Predict for (name, path-or-bytes) pairs, one result per pair in the same order (names may
    repeat); unreadable ones get an error, the rest a top-k.

    Images are decoded reduced to what the model needs (input_target), ``batch_size`` files at a
    time, and predicted in model-sized slices, so memory stays bounded however many files come. ``preview``: also keep a thumbnail of at most
    that many pixels a side in each result.
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
        preds = predict_images(handle, [im for _, im in good], top_k=top_k)  # model-sized slices
        for (result, _), topk in zip(good, preds):
            result.topk = topk
    return out


def predict_files(handle: ModelHandle, paths: Sequence[str | Path], top_k: int = 5) -> list[FilePrediction]:
    return predict_sources(handle, [(str(p), Path(p)) for p in paths], top_k=top_k)
