"""The steps of an epoch, explicit as the textbook has it: per batch zero_grad -> forward -> loss ->
backward -> step; and the evaluation pass, in eval mode under inference_mode. How long a pass runs,
its learning rate and who hears each step are its policies (engine/training/policies.py); the
trainer (engine/training/trainer.py) puts an epoch together from these.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.core.errors import EngineError
from engine.core.modes import evaluating
from engine.data.mixing import Mixer
from engine.freeze.plan import set_train_mode
from engine.training.feature_cache import outputs_and_head_inputs
from engine.training.metrics import balanced_scores, confusion_matrix
from engine.training.policies import LRPolicy, StepCallback
from engine.training.sizes import resize_batch


class Diverged(EngineError):
    """The loss became NaN or infinite: the run stops and keeps its last finite checkpoint."""


@dataclass
class EpochStats:
    loss: float
    acc: float
    images: int
    seconds: float


@dataclass
class StepContext:
    """Everything a pass of training steps reads: the model and its optimizer as the trainer holds them,
    and the pass's policies (engine/training/policies.py): its batches (how long), its learning rate,
    its callbacks and when to stop."""

    model: nn.Module  # what the steps call: the model, its head on cached features, or their DDP wrapper
    optimizer: torch.optim.Optimizer
    batches: Iterable  # the loader, or a view of it that says how long (Deadline, Steps)
    lr: LRPolicy
    device: torch.device
    dtype: torch.dtype | None = None  # autocast's
    scaler: Any = None  # float16's GradScaler
    channels_last: bool = False
    micro_batch: int | None = None
    class_weight: torch.Tensor | None = None  # balance "weights": the training loss's class weights
    label_smoothing: float = 0.0
    mix: Mixer | None = None  # mixup/cutmix (engine/training/mixing.py): blended images, soft targets
    grad_clip: float = 0.0
    callbacks: Sequence[StepCallback] = ()
    should_stop: Callable[[], bool] = lambda: False
    sync: Callable[[torch.Tensor], torch.Tensor] | None = None  # sums a tensor over the ranks (DDP)
    resize: int | None = None  # progressive resizing: this pass trains on images scaled to this size


def train_steps(ctx: StepContext) -> EpochStats | None:
    """One pass of training steps; returns None if stopped mid-pass.

    Each batch is one optimizer step; with ``micro_batch`` its forward and backward run in slices
    whose gradients add up to the whole batch's (each slice's mean loss weighted by its share).
    ``class_weight`` (balance "weights", engine.data.balance.class_weights): the batch loss is the
    class-weighted mean, sum_i w_{y_i} l_i / sum_i w_{y_i} over the whole batch (what
    ``F.cross_entropy(weight=w)`` gives), so the slices still add up to it exactly.

    Under DistributedDataParallel (``model`` is the wrapper) the gradients are all-reduced once per
    step, on the last slice (``no_sync`` on the others); ``sync`` sums a tensor over the ranks, so a
    NaN loss on one rank stops every rank at the same step.

    ``mix`` (mixup/cutmix) blends the whole batch before it is sliced; the loss is then against its
    soft targets (smoothing already in them), and accuracy counts the argmax against the image's own
    label.
    """
    model, optimizer, device = ctx.model, ctx.optimizer, ctx.device
    set_train_mode(model, True)  # frozen stages stay in eval (freeze hooks)
    total_loss = correct = seen = 0
    start = time.perf_counter()
    weight = ctx.class_weight.to(device) if ctx.class_weight is not None else None
    for i, (x, y) in enumerate(ctx.batches):
        if ctx.should_stop():
            return None
        ctx.lr.apply(optimizer, i)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if ctx.resize is not None and x.ndim == 4:
            x = resize_batch(x, ctx.resize)
        soft = None
        if ctx.mix is not None:
            x, soft = ctx.mix(x, y)
        optimizer.zero_grad(set_to_none=True)
        batch_loss, hits = _forward_backward(ctx, x, y, weight, soft)
        if not torch.isfinite(ctx.sync(batch_loss.clone()) if ctx.sync is not None else batch_loss):
            raise Diverged(f"the training loss became {batch_loss.item()} at step {i + 1}; lower the learning rate "
                           "(the last finite checkpoint is kept)")
        _step(ctx)
        n = y.shape[0]
        step_loss = batch_loss.item()  # one device sync per step
        total_loss += step_loss * n
        correct += hits.item()
        seen += n
        for callback in ctx.callbacks:
            callback.on_step(i + 1, step_loss, seen)
    return EpochStats(total_loss / max(1, seen), correct / max(1, seen), seen, time.perf_counter() - start)


def _forward_backward(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                      soft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's forward and backward, in micro-batch slices: (its loss, its correct answers).
    ``soft``: mixed targets, one row per image (the loss is against them)."""
    model, device, n = ctx.model, ctx.device, y.shape[0]
    batch_loss = torch.zeros((), device=device)
    hits = torch.zeros((), dtype=torch.long, device=device)
    # equal slices of at least two images (a slice of one would break BatchNorm): 3 at micro 2 is one slice
    slices = min(-(-n // (ctx.micro_batch or n)), max(1, n // 2))
    batch_weight = weight[y].sum() if weight is not None else None  # the weighted mean's denominator
    targets = soft.tensor_split(slices) if soft is not None else y.tensor_split(slices)
    for k, (xs, ys, ts) in enumerate(zip(x.tensor_split(slices), y.tensor_split(slices), targets)):
        if ctx.channels_last and xs.ndim == 4:
            xs = xs.contiguous(memory_format=torch.channels_last)
        quiet = model.no_sync() if k < slices - 1 and hasattr(model, "no_sync") else contextlib.nullcontext()
        with quiet:
            with torch.autocast(device.type, dtype=ctx.dtype, enabled=ctx.dtype is not None):
                logits = model(xs)
                if soft is not None:  # smoothing is in the soft targets already
                    loss = F.cross_entropy(logits, ts) * (ys.shape[0] / n)
                elif weight is None:
                    loss = F.cross_entropy(logits, ys, label_smoothing=ctx.label_smoothing) * (ys.shape[0] / n)
                else:
                    loss = F.cross_entropy(logits, ys, weight=weight, label_smoothing=ctx.label_smoothing,
                                           reduction="sum") / batch_weight
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        batch_loss += loss.detach().float()
        hits += (logits.detach().argmax(-1) == ys).sum()
    return batch_loss, hits


def _step(ctx: StepContext) -> None:
    """The optimizer's step, gradients clipped first when the config asks (unscaled first under float16)."""
    model, optimizer, scaler = ctx.model, ctx.optimizer, ctx.scaler
    if scaler is not None:
        if ctx.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        if ctx.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        optimizer.step()


@dataclass
class Outputs:
    """What an evaluation pass kept, on the CPU in float32, one row per image in the loader's order:
    the logits, the labels and (when a head was named) the features entering the head."""

    logits: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor | None = None


@dataclass
class EvalScores:
    """One evaluation pass: the plain mean loss (never class-weighted, so curves stay comparable),
    accuracy, macro-F1 and balanced accuracy (engine.training.metrics), and the confusion matrix;
    ``outputs`` when the pass was asked to keep them (calibration and the open-set rule read them)."""

    loss: float
    acc: float
    macro_f1: float
    balanced_acc: float
    confusion: list[list[int]]
    outputs: Outputs | None = None


def evaluate_scores(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None = None,
                    channels_last: bool = False, *, keep: bool = False, head: str | None = None) -> EvalScores:
    """Loss, accuracy, macro-F1 and balanced accuracy in eval mode under inference_mode; the model's
    mode is restored. The one evaluation loop of training: ``keep`` also keeps every logit and label,
    and with ``head`` (the head's module name) the features entering it, from the same forwards."""
    total_loss = correct = seen = 0
    confusion: torch.Tensor | None = None
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    with evaluating(model), torch.inference_mode():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            features = None
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                if head is None:
                    logits = model(x)
                else:
                    logits, features = outputs_and_head_inputs(model, head, x)
            total_loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
            predicted = logits.argmax(-1)
            correct += (predicted == y).sum().item()
            seen += y.shape[0]
            counts = confusion_matrix(y, predicted, logits.shape[-1])
            confusion = counts if confusion is None else confusion + counts
            if keep:
                kept.append((logits.float().cpu(), y.cpu(), None if features is None else features.float().cpu()))
    macro_f1, balanced_acc = balanced_scores(confusion) if confusion is not None else (0.0, 0.0)
    outputs = None
    if keep:
        outputs = Outputs(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
        if kept:
            outputs = Outputs(torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept]),
                              torch.cat([k[2] for k in kept]) if head is not None else None)
    return EvalScores(total_loss / max(1, seen), correct / max(1, seen), macro_f1, balanced_acc,
                      confusion.tolist() if confusion is not None else [], outputs)


def evaluate(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None = None,
             channels_last: bool = False) -> tuple[float, float]:
    """(loss, accuracy) in eval mode under inference_mode; the model's mode is restored."""
    scores = evaluate_scores(model, loader, device, dtype, channels_last)
    return scores.loss, scores.acc
