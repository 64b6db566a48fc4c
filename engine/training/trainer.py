"""The trainer: one object that owns what the epochs run on (model, optimizer, loaders, device and
precision, the freeze plan) and puts an epoch together from the steps (engine/training/epoch.py) and
their policies (engine/training/policies.py).

    train_pass(batches, lr, callbacks, stop)   steps under the given policies    (fit, a race slice, the LR finder)
    close_epoch(epoch, stats, started)         evaluate, combine ranks, check    (fit, a race slice)
    run_epoch(epoch, state, sink, started, stop)   fit's epoch: seeded, scheduled, with progress events

``engine.training.setup.set_up`` builds one; ``fit``, a race's lanes and the LR finder drive it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from engine.core.faults import fault_point
from engine.data.mixing import batch_mixer
from engine.freeze.plan import unfreeze_for_epoch
from engine.runs.events import EpochEnded, StepLogged
from engine.training.distributed import Ranks, combine_scores, wrap
from engine.training.epoch import Diverged, EpochStats, Outputs, StepContext, evaluate_scores, train_steps
from engine.training.policies import LRPolicy, OnStep, Scheduled, StepCallback
from engine.training.sizes import epoch_size, recalibrate_batchnorm, recalibrates

if TYPE_CHECKING:
    from engine.anatomy.stages import Stage
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan, FreezeReport
    from engine.runs.events import Emit
    from engine.training.micro import BatchPlan
    from engine.training.state import TrainState


@dataclass(kw_only=True)
class Trainer:
    """What the epochs run on, built by ``set_up`` (by name: it has many parts)."""

    config: TrainConfig
    module: nn.Module  # the whole model: what checkpoints save
    model: nn.Module  # what trains: the module, or only its head (or top stages) on cached features
    stages: list[Stage]
    plan: FreezePlan
    report: FreezeReport
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    val_loader: DataLoader
    generator: torch.Generator
    device: torch.device
    dtype: torch.dtype | None
    scaler: Any
    channels_last: bool
    cached: bool
    batches: BatchPlan
    class_weight: torch.Tensor | None = None  # balance "weights": the training loss's class weights
    ranks: Ranks | None = None  # one of several processes (engine/training/distributed.py)
    wrapper: nn.Module | None = None  # with ranks: the DDP wrapper of ``model``, what the training steps call
    num_classes: int = 0
    image_size: int = 0  # what validation, checkpoints and exports use; progressive resizing's last size
    precision: str = "float32"  # the steps' precision and why (engine/training/precision.py)
    # a resumed run whose saved optimizer holds stages its epoch count would not have released yet (a
    # race counts gradual unfreezing in passes over the data): the plan never goes back before this epoch
    plan_floor: int = 0
    head: str | None = None  # the head's module name: an uncached epoch's evaluation keeps what enters it
    # the last epoch's validation outputs (logits, labels, head inputs) and that epoch: when it is the best,
    # the end of the run calibrates from them instead of a second pass (engine/training/calibration.py)
    last_val: Outputs | None = None
    last_val_epoch: int | None = None

    @property
    def steps(self) -> int:
        return len(self.train_loader)

    def unfreeze(self, epoch: int) -> None:
        """Gradual unfreezing: stages the plan releases by ``epoch`` join the optimizer (and, with
        several processes, a rebuilt DDP wrapper: DDP only reduces what needed gradients when built)."""
        self.report, added = unfreeze_for_epoch(self.module, self.stages, self.plan, max(epoch - 1, self.plan_floor),
                                                self.optimizer, self.config.weight_decay)
        if added and self.ranks is not None:
            self.wrapper = wrap(self.model, self.ranks)

    def seed_epoch(self, epoch: int) -> None:
        """The same batches and dropout for an epoch, resumed or not; with several processes the batches
        are one draw (the generator) and dropout/augmentation draw per rank (rank 0 as one process would)."""
        seed = self.config.seed * 1000 + epoch
        torch.manual_seed(seed + (7919 * self.ranks.rank if self.ranks else 0))
        self.generator.manual_seed(seed)

    def train_pass(self, *, lr: LRPolicy, batches: Iterable | None = None, callbacks: Sequence[StepCallback] = (),
                   stop: Callable[[], bool] = lambda: False, resize: int | None = None) -> EpochStats | None:
        """Training steps over ``batches`` (default: one pass over the training loader) under ``lr``;
        None when ``stop`` said so mid-pass; Diverged on a NaN/inf loss. ``resize``: the images' size in
        this pass (progressive resizing; run_epoch never asks it of cached features)."""
        config = self.config
        aug = config.augment_spec()
        mix = None if self.cached else batch_mixer(aug.mixup, aug.cutmix, self.num_classes, config.smoothing())
        return train_steps(StepContext(
            model=self.wrapper or self.model, optimizer=self.optimizer,
            batches=self.train_loader if batches is None else batches, lr=lr, device=self.device, dtype=self.dtype,
            scaler=self.scaler, channels_last=self.channels_last, micro_batch=self.batches.micro_batch,
            class_weight=self.class_weight, label_smoothing=config.smoothing(), mix=mix, grad_clip=config.grad_clip,
            callbacks=callbacks, should_stop=stop, sync=self.ranks.sum_tensor if self.ranks else None,
            resize=resize))

    def close_epoch(self, epoch: int, stats: EpochStats, started: float) -> EpochEnded:
        """The epoch's evaluation (every rank's share summed) and its record; Diverged on a NaN/inf loss.
        ``started``: when the run (or race) began, for ``elapsed_s``."""
        keep = not self.cached and self.ranks is None and self.head is not None  # the whole model, one process
        if self.ranks is not None:
            self.ranks.share_buffers(self.module)
        scores = evaluate_scores(self.model, self.val_loader, self.device, self.dtype, self.channels_last,
                                 keep=keep, head=self.head if keep else None)
        self.last_val, self.last_val_epoch = scores.outputs, epoch if keep else None
        if self.ranks is not None:  # each rank trained and evaluated its share: the sums of all of them
            ranks = self.ranks
            ranks.check_in_step(self.module)
            loss_sum, hits, images = ranks.sum([stats.loss * stats.images, stats.acc * stats.images, stats.images])
            stats = replace(stats, loss=loss_sum / max(1, images), acc=hits / max(1, images), images=int(images))
            scores = combine_scores(scores, self.num_classes, ranks)
        if not (math.isfinite(scores.loss) and math.isfinite(stats.loss)):
            bad = scores.loss if not math.isfinite(scores.loss) else stats.loss
            raise Diverged(f"the loss became {bad}; lower the learning rate (the last finite checkpoint is kept)")
        return EpochEnded(
            epoch=epoch, train_loss=stats.loss, train_acc=stats.acc, val_loss=scores.loss, val_acc=scores.acc,
            lr={g["name"]: g["lr"] for g in self.optimizer.param_groups}, epoch_s=stats.seconds,
            images_per_s=stats.images / max(stats.seconds, 1e-9), trainable_params=self.report.trainable_params,
            elapsed_s=time.perf_counter() - started, val_macro_f1=scores.macro_f1,
            val_balanced_acc=scores.balanced_acc,
        )

    def run_epoch(self, epoch: int, state: TrainState, sink: Emit, started: float,
                  stop: Callable[[], bool]) -> EpochEnded | None:
        """``fit``'s epoch: one seeded pass under the config's schedule with progress events, then its
        close; None when stopped mid-epoch; Diverged on a NaN/inf loss."""
        config, steps = self.config, self.steps
        self.seed_epoch(epoch)
        if self.ranks is not None:
            stop = agreed_stop(self.ranks, stop)
        tick = time.perf_counter()

        def progress(i: int, loss: float, seen: int) -> None:
            elapsed = time.perf_counter() - tick
            remaining = (steps - i) * elapsed / i + (config.epochs - epoch) * steps * elapsed / i
            sink(StepLogged(epoch=epoch, step=i, steps=steps, loss=loss, images_per_s=seen / max(elapsed, 1e-9),
                            eta_s=remaining))

        schedule = Scheduled(state.step, config.epochs * steps, config.schedule, config.warmup_frac)
        size = None if self.cached else epoch_size(epoch, config.epochs, config.progressive_from, self.image_size)
        stats = self.train_pass(lr=schedule, callbacks=[OnStep(progress)], stop=stop, resize=size)
        if stats is None:
            return None
        # on cached inputs too: a cached run keeps the numbers of its run on images
        if recalibrates(config.bn_recalibrate, size is not None, schedule.factor_at(steps - 1)):
            recalibrate_batchnorm(self.wrapper or self.model, self.train_loader, self.device,
                                  channels_last=self.channels_last, micro_batch=self.batches.micro_batch)
        return self.close_epoch(epoch, stats, started)


def agreed_stop(ranks: Ranks, stop: Callable[[], bool]) -> Callable[[], bool]:
    """Several processes stop at the same step: each step asks every rank (engine/training/distributed.py)."""
    agreed = ranks.agreed(stop)

    def every_rank() -> bool:
        halt = agreed()
        fault_point(f"rank{ranks.rank}", "step")  # WORKBENCH_FAULT=kill:rank1:step:N: a crashed rank's test
        return halt

    return every_rank
