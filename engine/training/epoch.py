"""One epoch, explicit as the textbook has it: per batch zero_grad -> forward -> loss ->
backward -> step; then an evaluation pass in eval mode under inference_mode.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.errors import EngineError
from engine.core.modes import evaluating
from engine.freeze.plan import set_train_mode
from engine.training.metrics import balanced_scores, confusion_matrix

if TYPE_CHECKING:
    from engine.config import TrainConfig


class Diverged(EngineError):
    """The loss became NaN or infinite: the run stops and keeps its last finite checkpoint."""


def lr_factor(step: int, total: int, schedule: str, warmup_frac: float) -> float:
    """Multiplier of every group's planned LR at optimizer step ``step`` (0-based)."""
    if schedule == "constant":
        return 1.0
    warm = max(1, int(round(total * (0.25 if schedule == "onecycle" else warmup_frac))))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


@dataclass
class EpochStats:
    loss: float
    acc: float
    images: int
    seconds: float


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                    device: torch.device, step0: int, total_steps: int,
                    config: TrainConfig, dtype: torch.dtype | None, scaler: Any, channels_last: bool,
                    on_step: Callable[[int, float, int], None], should_stop: Callable[[], bool],
                    micro_batch: int | None = None, class_weight: torch.Tensor | None = None,
                    sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    lr_at: Callable[[int], float] | None = None) -> EpochStats | None:
    """One pass over the training data; returns None if stopped mid-epoch.

    Each batch is one optimizer step; with ``micro_batch`` its forward and backward run in slices
    whose gradients add up to the whole batch's (each slice's mean loss weighted by its share).
    ``class_weight`` (balance "weights", engine.data.balance.class_weights): the batch loss is the
    class-weighted mean, sum_i w_{y_i} l_i / sum_i w_{y_i} over the whole batch (what
    ``F.cross_entropy(weight=w)`` gives), so the slices still add up to it exactly.

    Under DistributedDataParallel (``model`` is the wrapper) the gradients are all-reduced once per
    step, on the last slice (``no_sync`` on the others); ``sync`` sums a tensor over the ranks, so a
    NaN loss on one rank stops every rank at the same step.

    ``lr_at(i)``: the LR factor of this epoch's step ``i`` in place of the config's schedule (a race's
    last rung anneals by the clock, engine.lab.race).
    """
    set_train_mode(model, True)  # frozen stages stay in eval (freeze hooks)
    total_loss = correct = seen = 0
    start = time.perf_counter()
    weight = class_weight.to(device) if class_weight is not None else None
    for i, (x, y) in enumerate(loader):
        if should_stop():
            return None
        _set_lr(optimizer, lr_at(i) if lr_at is not None else
                lr_factor(step0 + i, total_steps, config.schedule, config.warmup_frac))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        n = y.shape[0]
        batch_loss = torch.zeros((), device=device)
        hits = torch.zeros((), dtype=torch.long, device=device)
        # equal slices of at least two images (a slice of one would break BatchNorm): 3 at micro 2 is one slice
        slices = min(-(-n // (micro_batch or n)), max(1, n // 2))
        batch_weight = weight[y].sum() if weight is not None else None  # the weighted mean's denominator
        for k, (xs, ys) in enumerate(zip(x.tensor_split(slices), y.tensor_split(slices))):
            if channels_last and xs.ndim == 4:
                xs = xs.contiguous(memory_format=torch.channels_last)
            quiet = model.no_sync() if k < slices - 1 and hasattr(model, "no_sync") else contextlib.nullcontext()
            with quiet:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    logits = model(xs)
                    if weight is None:
                        loss = F.cross_entropy(logits, ys, label_smoothing=config.label_smoothing) * (ys.shape[0] / n)
                    else:
                        loss = F.cross_entropy(logits, ys, weight=weight, label_smoothing=config.label_smoothing,
                                               reduction="sum") / batch_weight
                (scaler.scale(loss) if scaler is not None else loss).backward()
            batch_loss += loss.detach().float()
            hits += (logits.detach().argmax(-1) == ys).sum()
        if not torch.isfinite(sync(batch_loss.clone()) if sync is not None else batch_loss):
            raise Diverged(f"the training loss became {batch_loss.item()} at step {i + 1}; lower the learning rate "
                           "(the last finite checkpoint is kept)")
        if scaler is not None:
            if config.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
        step_loss = batch_loss.item()  # one device sync per step
        total_loss += step_loss * n
        correct += hits.item()
        seen += n
        on_step(i + 1, step_loss, seen)
    return EpochStats(total_loss / max(1, seen), correct / max(1, seen), seen, time.perf_counter() - start)


@dataclass
class EvalScores:
    """One evaluation pass: the plain mean loss (never class-weighted, so curves stay comparable),
    accuracy, macro-F1 and balanced accuracy (engine.training.metrics), and the confusion matrix."""

    loss: float
    acc: float
    macro_f1: float
    balanced_acc: float
    confusion: list[list[int]]


def evaluate_scores(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None = None,
                    channels_last: bool = False) -> EvalScores:
    """Loss, accuracy, macro-F1 and balanced accuracy in eval mode under inference_mode; the model's
    mode is restored."""
    total_loss = correct = seen = 0
    confusion: torch.Tensor | None = None
    with evaluating(model), torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x)
            total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
            predicted = logits.argmax(-1)
            correct += (predicted == y).sum().item()
            seen += y.shape[0]
            counts = confusion_matrix(y, predicted, logits.shape[-1])
            confusion = counts if confusion is None else confusion + counts
    macro_f1, balanced_acc = balanced_scores(confusion) if confusion is not None else (0.0, 0.0)
    return EvalScores(total_loss / max(1, seen), correct / max(1, seen), macro_f1, balanced_acc,
                      confusion.tolist() if confusion is not None else [])


def evaluate(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None = None,
             channels_last: bool = False) -> tuple[float, float]:
    """(loss, accuracy) in eval mode under inference_mode; the model's mode is restored."""
    scores = evaluate_scores(model, loader, device, dtype, channels_last)
    return scores.loss, scores.acc
