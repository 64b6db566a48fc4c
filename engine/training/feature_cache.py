"""Backbone features: what the head sees (the input of the classifier), for any model.

A forward pre-hook on the head captures its input, so this works whatever the family calls its
head and however it pools; no architecture-specific ``forward_features`` is needed.

"""
from __future__ import annotations

import contextlib
import itertools
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from engine.core.errors import EngineError
from engine.core.memory import inference_batch, large_buffers_mapped
from engine.core.modes import evaluating, model_lock
from engine.data.ahead import read_ahead
from engine.training.compiled_pass import CompiledPasses, compiled_extractor

if TYPE_CHECKING:
    from engine.anatomy.stages import Stage
    from engine.config import TrainConfig
    from engine.data.datasets import ImageSet, TransformDataset
    from engine.freeze.plan import FreezePlan
    from engine.models.factory import ModelHandle


class _Captured(Exception):
    """Raised from a hook to stop the forward once what it waits for is known."""


def head_inputs(module: nn.Module, head: str, x: torch.Tensor) -> torch.Tensor:
    """Features entering ``head`` for batch ``x`` (the head itself is not run), one row per image."""
    return module_inputs(module, head, x).flatten(1)


def module_inputs(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """What enters submodule ``name`` for batch ``x``; the forward stops there."""
    return _capture(module, [name], x, stop=True)[1][name]


def inputs_of(module: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What enters each submodule of ``names`` for batch ``x``, from one forward pass that stops once all
    are entered (the automatic plan, engine/training/auto_plan.py, takes the head's and each candidate
    cut's inputs of its sample at once)."""
    return _capture(module, names, x, stop=True)[1]


def outputs_and_head_inputs(module: nn.Module, head: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output (logits) for batch ``x`` and the features entering ``head``, from one forward:
    what needs both (engine.lab.active: uncertainty from the logits, diversity from the features; the
    open-set rule, engine/runs/open_set.py, beside the probabilities) pays for one pass, and the
    features are exactly those ``head_inputs`` gives."""
    out, found = _capture(module, [head], x, stop=False)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out, found[head].flatten(1)


def _capture(module: nn.Module, names: Sequence[str], x: torch.Tensor, *,
             stop: bool) -> tuple[object, dict[str, torch.Tensor]]:
    """(the forward's output or None when stopped, what entered each submodule of ``names``, by name);
    ``stop``: the forward ends once every one of them was entered."""
    box: dict[str, torch.Tensor] = {}
    wanted = list(dict.fromkeys(names))

    def grab(name: str, inputs: tuple) -> None:
        box.setdefault(name, inputs[0])
        if stop and len(box) == len(wanted):
            raise _Captured

    out = None
    with model_lock(module):  # the hooks must never meet another thread's forward
        handles = [module.get_submodule(name).register_forward_pre_hook(
            lambda _m, inputs, name=name: grab(name, inputs)) for name in wanted]
        try:
            out = module(x)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
    missing = [name for name in wanted if name not in box]
    if missing:
        raise RuntimeError(f"{', '.join(repr(n) for n in missing)} {'was' if len(missing) == 1 else 'were'} "
                           "never called during forward")
    return out, box


def extract_features(
    module: nn.Module,
    head: str,
    images: Sequence[Image.Image],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 32,
) -> torch.Tensor:
    """Eval-mode features of PIL images, batched, with BN using its stored statistics."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    chunks = []
    with evaluating(module), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(im) for im in images[start:start + batch_size]]).to(device)
            chunks.append(head_inputs(module, head, batch).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def uses_feature_cache(plan: FreezePlan, config: TrainConfig) -> bool:
    frozen_forever = (plan.strategy == "feature-extraction" and not plan.unfreeze_schedule
                      and not plan.patterns and plan.bn_policy == "freeze")
    return config.feature_cache != "off" and frozen_forever and not config.augment


def refuse_uncached(config: TrainConfig, cached: bool) -> None:
    """``feature_cache="on"`` is a promise: a run that would train on images is refused."""
    if config.feature_cache == "on" and not cached:
        raise EngineError("The feature cache needs a frozen part below what trains (feature extraction or the "
                          "last stages, BatchNorm frozen, no unfreezing) and augmentation off.")


class HeadOnly(nn.Module):
    """The part of the model after the cached features: (timm's pre-classifier dropout +) head."""

    def __init__(self, head: nn.Module, drop_rate: float):
        super().__init__()
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(x))


def cache_point(handle: ModelHandle, stages: list[Stage]) -> tuple[str, float]:
    """Which module's input to cache and which dropout the model applies just before it."""
    head_stage = stages[-1]
    if len(head_stage.modules) == 1 and head_stage.modules[0] != handle.spec.head and \
            handle.spec.source == "torchvision":
        return head_stage.modules[0], 0.0  # e.g. torchvision's classifier = Dropout + Linear
    return handle.spec.head, float(getattr(handle.module, "drop_rate", 0.0) or 0.0)


def known_and_computed(model: nn.Module, point: str, dataset: TransformDataset, known: dict[int, torch.Tensor],
                       loader_kw: dict, device: torch.device, channels_last: bool, should_stop: Callable[[], bool],
                       flatten: bool = True, compiled: CompiledPasses | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``compute_features`` of ``dataset`` where ``known`` (its image index -> what enters ``point``,
    computed the same way) already holds some rows: only the others run through the model. ``compiled``:
    as compute_inputs."""
    from torch.utils.data import Subset

    missing = [pos for pos, index in enumerate(dataset.indices) if index not in known]
    if len(missing) == len(dataset):
        return compute_features(model, point, DataLoader(dataset, **loader_kw), device, channels_last, should_stop,
                                flatten=flatten, compiled=compiled)
    computed = None
    if missing:
        computed = compute_features(model, point, DataLoader(Subset(dataset, missing), **loader_kw), device,
                                    channels_last, should_stop, flatten=flatten, compiled=compiled)
        if computed is None:
            return None
    rows = iter(range(len(missing)))
    feats, labels = [], []
    for index in dataset.indices:
        if index in known:
            row = known[index]
            feats.append(row.flatten() if flatten else row)
            labels.append(dataset.ds.labels[index])
        else:
            i = next(rows)
            feats.append(computed[0][i])
            labels.append(int(computed[1][i]))
    return torch.stack(feats), torch.tensor(labels)


def compute_inputs(model: nn.Module, points: Sequence[str], loader: Iterable, device: torch.device,
                   channels_last: bool, should_stop: Callable[[], bool], compiled: CompiledPasses | None = None,
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """What enters each module of ``points`` for every image of ``loader``, one forward per batch (stopped
    once all are entered), and the labels; None when stopped. With ``compiled`` (the run's graphs,
    engine/training/compiled_pass.py), a large enough pass runs a compiled graph: one already built that
    gives these points, or one built now and kept there for the run's other passes."""
    found: dict[str, list[torch.Tensor]] = {point: [] for point in points}
    labels = []
    wanted = tuple(points)
    graph = compiled.graph_for(points) if compiled is not None else None
    build = (graph is None and compiled is not None and wanted not in compiled.built
             and compiled.worth(len(getattr(loader, "dataset", ()))))
    batches = iter(loader)
    first = next(batches, None)
    with evaluating(model), torch.inference_mode(), contextlib.ExitStack() as stack:
        if build and first is not None and len(first[0]) > 1:
            with torch.inference_mode(False):
                example = first[0].to(device)
                graph = compiled.built[wanted] = compiled_extractor(model, points, example,
                                                                    lambda b: inputs_of(model, points, b))
        if graph is not None:
            # decoding overlaps the graph (engine/data/ahead.py), and decoded batches go back to the kernel: the
            # eager model's activations would be slowed by fresh pages (evaluation at 96 px: 0.8 s -> 1.5 s)
            stack.enter_context(large_buffers_mapped())
            batches = read_ahead(batches)
        for x, y in itertools.chain([first] if first is not None else [], batches):
            if should_stop():
                return None
            x = x.to(device)
            if channels_last and graph is None:  # a compiled graph takes the loader's layout as it is
                x = x.contiguous(memory_format=torch.channels_last)
            got = graph(x) if graph is not None else inputs_of(model, points, x)
            for point in points:
                found[point].append(got[point].float().contiguous().cpu())
            labels.append(y)
    return {point: torch.cat(parts) for point, parts in found.items()}, torch.cat(labels)


def compute_features(model: nn.Module, point: str, loader: Iterable, device: torch.device,
                     channels_last: bool, should_stop: Callable[[], bool],
                     flatten: bool = True, compiled: CompiledPasses | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What enters ``point`` for every image of ``loader`` (one row each when ``flatten``), and the
    labels; None when stopped. ``compiled``: as compute_inputs."""
    got = compute_inputs(model, [point], loader, device, channels_last, should_stop, compiled=compiled)
    if got is None:
        return None
    inputs = got[0][point]
    return (inputs.flatten(1) if flatten else inputs), got[1]


def embed(handle: ModelHandle, ds: ImageSet, indices: Sequence[int]) -> torch.Tensor:
    """Head-input features of ``ds[indices]`` in eval mode (BN with its stored statistics), in
    model-sized slices."""
    from engine.data.datasets import TransformDataset
    from engine.data.transforms import eval_transform

    module = handle.module
    dataset = TransformDataset(ds, indices, eval_transform(handle.spec))
    loader = DataLoader(dataset, batch_size=inference_batch(module, handle.spec.input_size))
    chunks = []
    with evaluating(module), torch.inference_mode():
        for x, _y in loader:
            chunks.append(head_inputs(module, handle.spec.head, x).float().cpu())
    if not chunks:
        raise EngineError("No images to embed.")
    return torch.cat(chunks)
