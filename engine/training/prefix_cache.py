"""The frozen prefix, computed once: when a plan trains only the top stages of a network, the
stages below stay frozen (eval mode, BatchNorm on its stored statistics) and, without augmentation,
turn each image into the same activations every epoch. Feature extraction already caches what
enters the head; this is the same idea one cut lower. The first trainable stage's input is computed
once per image, and the top stages train on it through a *view* of the model that skips the frozen
part (the same parameter objects: what the view trains, the model has).

Why this pays: on a CPU at 96 px most of a last-2-stages step is the frozen stages' forward pass
(efficientnet_lite0: the early stages run at high resolution), so the trainable top alone is
2-3x faster per step, for what one inference pass over the data costs once.

Which modules to skip is read from one forward pass: every module called before the cut module that
is not its ancestor. The view is then checked on real images against the whole model (both in eval
mode). A model whose forward does more between its modules than calling them (a ViT adds its position
embeddings in functional code) fails the check and trains as before, on images.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.core.modes import evaluating, model_lock
from engine.training.feature_cache import module_inputs

if TYPE_CHECKING:
    from engine.anatomy.stages import Stage
    from engine.config import TrainConfig
    from engine.core.memory import MemoryBudget
    from engine.freeze.plan import FreezePlan

CACHE_SHARE = 0.25  # the cache may take at most this share of the memory the budget leaves free


def prefix_cut(plan: FreezePlan, config: TrainConfig, stages: list[Stage], module: nn.Module) -> str | None:
    """The module whose input is cached, when ``plan`` trains a top run of stages (the head and the
    backbone stages above some cut), never changes what trains, keeps BatchNorm frozen below, and the
    images are not augmented; None otherwise (including feature extraction: feature_cache.py's).

    The cut is the outermost module above the first trainable parameter that holds trainable
    parameters only: a stage's own module list can be coarser than that (timm's DenseNet names every
    stage by its container, ``features``)."""
    if config.feature_cache == "off" or config.augment or plan.unfreeze_schedule or plan.patterns \
            or plan.bn_policy != "freeze":
        return None
    trains = set(plan.trainable_stage_names(stages, 0))
    first = next((i for i, stage in enumerate(stages) if stage.name in trains), None)
    if first is None or first == 0 or stages[first].is_head:
        return None  # nothing frozen below, or only the head trains (the feature cache's case)
    if any(stage.name not in trains for stage in stages[first:]):
        return None  # a frozen stage between trainable ones runs on every step anyway
    if not stages[first].params:
        return None
    trainable = {p for stage in stages[first:] for p in stage.params}
    parts = stages[first].params[0].split(".")[:-1]
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if all(f"{name}.{p}" in trainable for p, _ in module.get_submodule(name).named_parameters()):
            return name
    return None


def skipped_modules(module: nn.Module, cut: str, x: torch.Tensor) -> list[str] | None:
    """The outermost modules a forward pass of ``x`` calls before ``cut`` that do not contain it; None
    when the cut is called with more than one input, never, or when a skipped module also runs after it."""
    order: list[str] = []
    cut_inputs: list[int] = []

    def record(name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            order.append(name)
            if name == cut:
                cut_inputs.append(len(args) + len(kwargs))
        return hook

    with evaluating(module), torch.inference_mode(), model_lock(module):
        hooks = [m.register_forward_pre_hook(record(name), with_kwargs=True)
                 for name, m in module.named_modules() if name]
        try:
            module(x)
        finally:
            for h in hooks:
                h.remove()
    if cut_inputs[:1] != [1]:
        return None
    at = order.index(cut)
    ancestors = {cut.rsplit(".", k)[0] for k in range(1, cut.count(".") + 1)}
    before = [n for n in order[:at] if n not in ancestors]
    if set(before) & set(order[at:]):
        return None  # a module the prefix shares with the top (e.g. one activation used throughout)
    chosen = set(before)
    outer = [n for n in dict.fromkeys(before) if not any(n.startswith(p + ".") for p in chosen)]
    return outer


def without_prefix(module: nn.Module, skipped: list[str]) -> nn.Module:
    """A view of ``module`` whose ``skipped`` modules pass their input through: shallow copies of the
    containers on the way to each, every other submodule (and so every parameter) shared."""
    copies: dict[str, nn.Module] = {}

    def copied(path: str) -> nn.Module:
        if path not in copies:
            parent, _, leaf = path.rpartition(".")
            original = module if not path else module.get_submodule(path)
            clone = copy.copy(original)
            clone._modules = type(original._modules)(original._modules)
            if path:
                copied(parent)._modules[leaf] = clone
            copies[path] = clone
        return copies[path]

    view = copied("")
    for name in skipped:
        parent, _, leaf = name.rpartition(".")
        copied(parent)._modules[leaf] = nn.Identity()
    return view


@dataclass
class TopView:
    """The model from a cut on: what trains on the cut's cached input."""

    module: nn.Module  # the view (its parameters are the model's own)
    per_image: int  # bytes one image's cached input takes
    skipped: list[str]  # the modules the view passes over (the exported script names them)


def prefix_view(module: nn.Module, cut: str, example: torch.Tensor) -> TopView | str:
    """The view that trains from ``cut``'s input; or why there is none (the view does not reproduce the
    model on ``example``, a few real images)."""
    skipped = skipped_modules(module, cut, example)
    if not skipped:
        return f"the model's forward does not reach '{cut}' through modules alone"
    view = without_prefix(module, skipped)
    with evaluating(module), evaluating(view), torch.inference_mode():
        whole = module(example)
        cached = module_inputs(module, cut, example)
        try:
            top = view(cached.clone())
        except Exception:  # noqa: BLE001 - code between the modules expected the image (a ViT's patch grid)
            top = None
    if not isinstance(whole, torch.Tensor) or not isinstance(top, torch.Tensor) or top.shape != whole.shape \
            or not torch.allclose(top.float(), whole.float(), rtol=1e-3, atol=1e-4 * max(1.0, whole.abs().max().item())):
        return "skipping the frozen stages does not reproduce the model's output"
    return TopView(view, cached[0].numel() * cached.element_size(), skipped)


def cache_fits(per_image: int, images: int, budget: MemoryBudget | None, used: int) -> bool:
    """Whether ``images`` cached inputs fit in CACHE_SHARE of what the budget leaves beside ``used``."""
    return budget is None or per_image * images <= CACHE_SHARE * max(0, budget.bytes - used)
