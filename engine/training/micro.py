"""Micro-batches: the user's batch, computed in slices that fit the memory budget.

Why: a training's peak memory is mostly what autograd keeps for the backward pass, and that grows
with the images in one forward. Slicing the batch of ``batch_size`` into micro-batches and adding
up their gradients before the one optimizer step keeps the effective batch, the number of steps
and the LR schedule exactly as the user set them, while the peak follows the slice.

Measured, not guessed: probe forwards of 2 and 4 images count the bytes autograd saves (through
``saved_tensors_hooks``, each storage once, parameters excluded); half the difference is the cost of one
more image in a slice. Measured on 2 CPU cores, efficientnet_lite0 at 224 px: ~79 MB an image,
peak RSS 1.21 / 1.57 / 2.33 / 3.32 GiB for slices of 4 / 8 / 16 / 32, i.e. the process before the
first step + gradients + optimizer state + slice x per-image, within a few percent.

BatchNorm, a stated choice: a layer in training mode normalises with the statistics of the slice it
sees (as "ghost batch norm" does), not of the whole batch. Slices of 8 or more are within noise of
the whole batch (tests/test_micro.py trains both at 224 px); frozen BN (bn policy "freeze") is not
affected at all.

When even one image does not fit, timm's gradient checkpointing (recompute activations in the
backward pass instead of keeping them) is switched on where the model has it, and measured again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.core.errors import EngineError
from engine.core.memory import MemoryBudget, current_rss, format_size
from engine.core.modes import buffers_restored, modes_restored
from engine.freeze.plan import set_train_mode

# On CPU a slice whose saved activations pass ~1 GB gets slower, not only bigger. Measured on 2 cores,
# efficientnet_lite0, channels_last, batch 32: at 224 px (79 MB an image) slices of 4 / 8 / 16 / 32 ran
# 26.4 / 24.9 / 26.2 / 17.3 img/s; at 96 px (14.5 MB an image) 64 / 113 / 125 / 137 img/s. Below the
# bound the whole batch is fastest; the memory budget can only make the slice smaller.
CPU_FASTEST_SLICE_BYTES = 1_000_000_000
# the allocator's own overhead and the transient gradients of the backward pass, over the count
HEADROOM = 1.08


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step of ``batch_size`` images is computed."""

    batch_size: int
    micro_batch: int
    grad_checkpointing: bool
    per_image: int  # bytes an image adds to a slice (measured: SliceCost.per_image)
    fixed: int  # bytes before the slice: the process, gradients, optimizer state
    budget: MemoryBudget | None

    @property
    def slices(self) -> int:
        return math.ceil(self.batch_size / self.micro_batch)

    @property
    def predicted_peak(self) -> int:
        return int(self.fixed + HEADROOM * self.micro_batch * self.per_image)

    def describe(self) -> str:
        """One line for the run's log and the Training page."""
        how = (f"batch {self.batch_size} as {self.slices} micro-batches of {self.micro_batch}"
               if self.slices > 1 else f"batch {self.batch_size} in one pass")
        extra = "; gradient checkpointing on" if self.grad_checkpointing else ""
        if self.per_image and self.budget is not None:
            extra += f"; predicted peak {format_size(self.predicted_peak)} within a budget of {self.budget}"
        return how + extra


# What else is alive while a layer runs, over its own input + output: the same factor an inference
# slice is sized with (engine/core/memory.py). Measured on 2 cores, efficientnet_lite0 at 224 px,
# last stage only, slices of 32: predicted 0.95 GB from the saved tensors, peaked at 1.36 GB; the
# frozen stages keep nothing for backward, but each layer's output is alive while the next one runs.
WORKING_FACTOR = 3


@dataclass(frozen=True)
class SliceCost:
    """Bytes per image in a training slice: what autograd keeps for backward (``saved``) and the
    largest layer's input + output (``working``: alive while it runs, kept or not)."""

    saved: int
    working: int

    @property
    def per_image(self) -> int:
        """The slice's cost per image: what is kept, or, where little is kept (frozen stages), what a
        layer works on, whichever is more."""
        return max(self.saved, WORKING_FACTOR * self.working)


def slice_cost(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, *,
               channels_last: bool = False, dtype: torch.dtype | None = None) -> SliceCost:
    """Bytes per image, from probe forwards of 2 and 4 images (half the difference).

    The model runs as in training (frozen parts stay in eval); its BatchNorm statistics and the
    random number generators are put back, so the probe leaves no trace on the run.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def count(n: int) -> tuple[int, int]:
        seen: dict[int, int] = {}
        largest = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        def working(_m: nn.Module, inputs: tuple, output: object) -> None:
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                        for t in (*inputs, output) if isinstance(t, torch.Tensor)}  # each once: an Identity's
            largest[0] = max(largest[0], sum(storages.values()))  # output is its input

        x = torch.zeros(n, *input_shape, device=device)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        hooks = [m.register_forward_hook(working) for m in model.modules() if not list(m.children())]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                    torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(x)
            del out
        finally:
            for h in hooks:
                h.remove()
        return sum(seen.values()), largest[0]

    with modes_restored(model), buffers_restored(model), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        set_train_mode(model, True)
        two, four = count(2), count(4)  # not 1: BatchNorm refuses a batch of one in training
    return SliceCost(saved=max(0, (four[0] - two[0]) // 2), working=max(0, (four[1] - two[1]) // 2))


def saved_bytes_per_image(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, *,
                          channels_last: bool = False, dtype: torch.dtype | None = None) -> int:
    """Bytes autograd keeps for the backward pass per image (``slice_cost``'s ``saved``)."""
    return slice_cost(model, input_shape, device, channels_last=channels_last, dtype=dtype).saved


def _state_bytes(module: nn.Module, optimizer_kind: str) -> int:
    """Gradients plus optimizer state of the trainable parameters, before the first step makes them."""
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    per_param = {"adamw": 2, "sgd": 1}.get(optimizer_kind, 2)  # Adam: two moments; SGD: momentum
    return trainable * (1 + per_param)


def _set_checkpointing(module: nn.Module, on: bool) -> bool:
    setter = getattr(module, "set_grad_checkpointing", None)
    if setter is None:
        return False
    setter(on)
    return True


@dataclass(frozen=True)
class Placement:
    """Where and how the training steps run: the device, autocast's dtype, the memory format."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False


def plan_batches(module: nn.Module, model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int,
                 place: Placement, budget: MemoryBudget | None, micro_batch: int | None = None,
                 optimizer_kind: str = "adamw", reserve: int = 0) -> BatchPlan:
    """The micro-batch for ``model`` (what trains: the whole module, or its head on cached
    features) under ``budget``: the given ``micro_batch``, or the largest slice that fits and is
    no slower on this device.

    ``module`` is the whole model (its parameters are what gradients and optimizer state cover).
    ``reserve``: bytes that other models in this process will take later (a race's plans), kept free.
    """
    if micro_batch is not None:
        return BatchPlan(batch_size, min(micro_batch, batch_size), False, 0, 0, budget)
    device, dtype, channels_last = place.device, place.dtype, place.channels_last
    cost = slice_cost(model, input_shape, device, channels_last=channels_last, dtype=dtype)
    if cost.saved == 0:  # nothing kept for backward (all frozen): one pass
        return BatchPlan(batch_size, batch_size, False, 0, 0, budget)
    per_image = cost.per_image
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        room, fixed = free * 0.9 - _state_bytes(module, optimizer_kind) - reserve, 0
        fastest = batch_size  # a GPU is fastest with the whole batch when it fits
    else:
        fixed = current_rss() + _state_bytes(module, optimizer_kind) + reserve
        room = (budget.bytes if budget else float("inf")) - fixed
        fastest = max(1, CPU_FASTEST_SLICE_BYTES // per_image)
    fits = int(room // (HEADROOM * per_image)) if room > 0 else 0
    if fits >= 1:
        return BatchPlan(batch_size, max(1, min(batch_size, fastest, fits)), False, per_image, fixed, budget)
    if _set_checkpointing(module, True):
        if model is not module:  # a view of the model's top (prefix_cache.py) keeps its own flag
            _set_checkpointing(model, True)
        light = saved_bytes_per_image(model, input_shape, device, channels_last=channels_last, dtype=dtype)
        # what is kept is only the segment boundaries (``light``); the backward recomputes one segment at
        # a time and holds its activations. Measured (efficientnet_lite0, 224 px, slices of 7): the peak
        # passed the boundary-only prediction by ~0.43 of a full image per image, so half is counted.
        squeezed = max(light + cost.saved // 2, WORKING_FACTOR * cost.working)
        fits = int(room // (HEADROOM * squeezed)) if room > 0 and light else 0
        if fits >= 1:
            return BatchPlan(batch_size, max(1, min(batch_size, fits)), True, squeezed, fixed, budget)
        _set_checkpointing(module, False)
        _set_checkpointing(model, False)
    need = fixed + HEADROOM * per_image
    images = model is module  # else the head or the top stages on cached features, the rest already frozen
    what = f"one image at {input_shape[-1]} px needs" if images else "the cached features of one image need"
    advice = ("Lower the image size, freeze more of the model, or raise --memory-budget." if images
              else "Raise --memory-budget.")
    raise EngineError(
        f"{what} about {format_size(need)} to train this way ({format_size(fixed)} of it before the first "
        f"image: this process, gradients and optimizer state), more than the memory budget of {budget}. {advice}")
