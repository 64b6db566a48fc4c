"""Everything the epochs run on, set up once: data and model (``prepare``), then device, freeze
plan, loaders, optimizer and feature cache (``set_up``).

``EpochRunner.run_epoch`` is one textbook epoch (train, then evaluate) plus what a real run needs
around it: the LR schedule, per-epoch seeds (the same batches whether resumed or not), progress
events and divergence checks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from engine.anatomy.stages import model_stages
from engine.core.device import amp_dtype, default_workers, resolve_device
from engine.core.errors import DataError, EngineError
from engine.core.faults import fault_point
from engine.core.memory import MemoryBudget, current_rss, detect_budget, format_size, inference_batch
from engine.data.balance import balanced_sampler, class_weights
from engine.data.datasets import TransformDataset, load_source, validate
from engine.data.overrides import Overrides, applied_overrides, save_run_overrides
from engine.data.splits import split_all
from engine.data.transforms import eval_transform, train_transform
from engine.freeze.plan import apply_plan, build_optimizer, optimizer_for_groups, param_groups, unfreeze_for_epoch
from engine.models.factory import create_model
from engine.runs.checkpoint_file import load_weights
from engine.runs.events import EpochEnded, StepLogged
from engine.training.distributed import (
    Ranks,
    ShardSampler,
    check_distributed,
    combine_scores,
    shard,
    shared_features,
    sync_batchnorm,
    wrap,
)
from engine.training.epoch import Diverged, evaluate, evaluate_scores, train_one_epoch
from engine.training.feature_cache import HeadOnly, cache_point, compute_features, refuse_uncached, uses_feature_cache
from engine.training.micro import BatchPlan, plan_batches
from engine.training.prefix_cache import cache_fits, prefix_cut, prefix_view
from engine.training.preflight import check_hosted_images, check_split

if TYPE_CHECKING:
    from engine.anatomy.stages import Stage
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan, FreezeReport
    from engine.models.factory import ModelHandle
    from engine.runs.events import Emit
    from engine.runs.store import RunDir
    from engine.training.state import TrainState


@dataclass
class Prepared:
    handle: ModelHandle
    train_ds: TransformDataset
    val_ds: TransformDataset
    image_size: int
    skipped: list
    test_ds: TransformDataset | None = None  # held out: evaluated once, at the end of the run
    layout: str = ""  # the data report's sentence on the layout and its split
    overrides: Overrides | None = None  # the decisions about single images it trains with (engine.data.overrides)


def prepare(config: TrainConfig, work_dir: str | None = None, weights: str | None = None,
            overrides: Overrides | None = None) -> Prepared:
    """Data (validated, split) and model (head sized to the classes) for a config. ``overrides``: the
    decisions to train with (a fresh run: the dataset's current ones); None: ``load_source``'s choice (a
    resumed run's ``work_dir``: those it started with, so its split does not move)."""
    ds = load_source(config.data, work_dir=work_dir, overrides=overrides)
    report = validate(ds)
    if not report.ok:
        raise DataError("The data cannot be trained on: " + " ".join(report.problems))
    config.check_hosted()
    train_idx, val_idx, test_idx = split_all(ds, config)
    check_split(train_idx, val_idx, test_idx, config.max_per_class)
    # a given split caps each (split, class) group: the per-class cap that fits is computed over those
    groups = list(zip(ds.splits, ds.labels)) if ds.splits is not None else ds.labels
    check_hosted_images(groups, len(train_idx) + len(val_idx) + len(test_idx), config)
    handle = create_model(config.model, weights=weights or config.weights, class_names=ds.class_names)
    size = config.image_size or handle.spec.input_size[-1]
    config.check_hosted(image_size=size)
    config.validate_for_model(handle.module, model_stages(handle.module, handle.spec.head), size)
    crop = float(config.crop_pct) if config.crop_pct is not None else handle.spec.crop_pct
    handle.spec = replace(handle.spec, input_size=(3, size, size), crop_pct=crop)  # inference sees what training saw
    train_ds = TransformDataset(ds, train_idx, train_transform(handle.spec, size, augment=config.augment, hflip=config.hflip))
    val_ds = TransformDataset(ds, val_idx, eval_transform(handle.spec, size))
    test_ds = TransformDataset(ds, test_idx, eval_transform(handle.spec, size)) if test_idx else None
    return Prepared(handle, train_ds, val_ds, size, [list(pair) for pair in report.skipped], test_ds, report.layout,
                    applied_overrides(ds))


def test_evaluation(prep: Prepared, runner: EpochRunner, run: RunDir | None) -> dict[str, Any] | None:
    """The held-out test split, evaluated once at the end of a run with its best checkpoint (the last
    weights when there is no run folder); recorded in the run's status.json as ``test``. None: no test split."""
    if prep.test_ds is None or not len(prep.test_ds):
        return None
    checkpoint, epoch = "last", None
    if run is not None and run.checkpoint("best").is_file():
        runner.module.load_state_dict(load_weights(run.checkpoint("best")))
        checkpoint, epoch = "best", (run.checkpoint_meta("best") or {}).get("epoch")
    loader = DataLoader(prep.test_ds, shuffle=False, batch_size=runner.batches.micro_batch, num_workers=0)
    loss, acc = evaluate(runner.module, loader, runner.device, runner.dtype, runner.channels_last)
    result = {"acc": acc, "loss": loss, "images": len(prep.test_ds), "checkpoint": checkpoint, "epoch": epoch,
              "unreadable": [{"file": src, "reason": why} for src, why in prep.test_ds.failed]}
    if run is not None:
        run.write_status(test=result)
    return result


def record_split(prep: Prepared, run: RunDir | None) -> None:
    """The run's status says which layout gave its split and how many images each part has; a test
    result of an earlier finish (a run extended by more epochs) is cleared until this one ends."""
    if run is not None:
        if prep.overrides is not None:  # evaluation, exports and a resume read the data with these
            save_run_overrides(run.path, prep.overrides)
        run.write_status(split={"layout": prep.layout, "train": len(prep.train_ds), "val": len(prep.val_ds),
                                "test": len(prep.test_ds) if prep.test_ds is not None else 0}, test=None)


def describe_test(result: dict[str, Any]) -> str:
    at = f", epoch {result['epoch']}" if result.get("epoch") else ""
    return (f"test acc {result['acc']:.4f}, loss {result['loss']:.4f} on {result['images']} held-out images "
            f"({result['checkpoint']} checkpoint{at})")


@dataclass
class EpochRunner:
    config: TrainConfig
    module: nn.Module  # the whole model: what checkpoints save
    model: nn.Module  # what trains: the module, or only its head on cached features
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
    trainer: nn.Module | None = None  # with ranks: the DDP wrapper of ``model``, what the training steps call
    num_classes: int = 0
    # a resumed run whose saved optimizer holds stages its epoch count would not have released yet (a
    # race counts gradual unfreezing in passes over the data): the plan never goes back before this epoch
    plan_floor: int = 0

    @property
    def steps(self) -> int:
        return len(self.train_loader)

    def unfreeze(self, epoch: int) -> None:
        """Gradual unfreezing: stages the plan releases by ``epoch`` join the optimizer (and, with
        several processes, a rebuilt DDP wrapper: DDP only reduces what needed gradients when built)."""
        self.report, added = unfreeze_for_epoch(self.module, self.stages, self.plan, max(epoch - 1, self.plan_floor),
                                                self.optimizer,
                                                self.config.weight_decay)
        if added and self.ranks is not None:
            self.trainer = wrap(self.model, self.ranks)

    def run_epoch(self, epoch: int, state: TrainState, sink: Emit, started: float,
                  stop: Callable[[], bool]) -> EpochEnded | None:
        """Train and evaluate one epoch; None when stopped mid-epoch; Diverged on a NaN/inf loss."""
        config, steps, ranks = self.config, self.steps, self.ranks
        # same batches and dropout, resumed or not; with several processes the batches are one draw
        # (the generator) and dropout/augmentation draw per rank (rank 0 as one process would)
        torch.manual_seed(config.seed * 1000 + epoch + (7919 * ranks.rank if ranks else 0))
        self.generator.manual_seed(config.seed * 1000 + epoch)
        if ranks is not None:
            agreed = ranks.agreed(stop)

            def stop() -> bool:  # every rank stops at the same step
                halt = agreed()
                fault_point(f"rank{ranks.rank}", "step")  # WORKBENCH_FAULT=kill:rank1:step:N: a crashed rank's test
                return halt
        tick = time.perf_counter()

        def on_step(i: int, loss: float, seen: int) -> None:
            elapsed = time.perf_counter() - tick
            remaining = (steps - i) * elapsed / i + (config.epochs - epoch) * steps * elapsed / i
            sink(StepLogged(epoch=epoch, step=i, steps=steps, loss=loss, images_per_s=seen / max(elapsed, 1e-9),
                            eta_s=remaining))

        stats = train_one_epoch(self.trainer or self.model, self.train_loader, self.optimizer, device=self.device,
                                step0=state.step, total_steps=config.epochs * steps, config=config, dtype=self.dtype,
                                scaler=self.scaler, channels_last=self.channels_last, on_step=on_step,
                                should_stop=stop, micro_batch=self.batches.micro_batch,
                                class_weight=self.class_weight, sync=ranks.sum_tensor if ranks else None)
        if stats is None:
            return None
        scores = evaluate_scores(self.model, self.val_loader, self.device, self.dtype, self.channels_last)
        if ranks is not None:  # each rank trained and evaluated its share: the sums of all of them
            ranks.check_in_step(self.module)
            loss_sum, hits, images = ranks.sum([stats.loss * stats.images, stats.acc * stats.images, stats.images])
            stats = replace(stats, loss=loss_sum / max(1, images), acc=hits / max(1, images), images=int(images))
            scores = combine_scores(scores, self.num_classes, ranks)
        val_loss, val_acc = scores.loss, scores.acc
        if not (math.isfinite(val_loss) and math.isfinite(stats.loss)):
            bad = val_loss if not math.isfinite(val_loss) else stats.loss
            raise Diverged(f"the loss became {bad}; lower the learning rate (the last finite checkpoint is kept)")
        return EpochEnded(
            epoch=epoch, train_loss=stats.loss, train_acc=stats.acc, val_loss=val_loss, val_acc=val_acc,
            lr={g["name"]: g["lr"] for g in self.optimizer.param_groups}, epoch_s=stats.seconds,
            images_per_s=stats.images / max(stats.seconds, 1e-9), trainable_params=self.report.trainable_params,
            elapsed_s=time.perf_counter() - started, val_macro_f1=scores.macro_f1,
            val_balanced_acc=scores.balanced_acc,
        )


def set_up(config: TrainConfig, prep: Prepared, state: TrainState, optimizer_state: dict[str, Any] | None,
           stop: Callable[[], bool], ranks: Ranks | None = None, reserve: int = 0) -> EpochRunner | None:
    """The plan applied at the epoch the run continues from, the model on its device, the loaders
    (features computed once when the backbone stays frozen) and the optimizer. None: cancelled
    while computing features. ``ranks``: this process's share of a distributed run
    (engine/training/distributed.py says what is shared how). ``reserve``: bytes of memory other
    models of this process will take later (a race's plans), left out of the micro-batch's room."""
    handle = prep.handle
    plan = config.freeze_plan()
    device = resolve_device(config.device)
    if ranks is not None:
        check_distributed(config, device, here=ranks.local_world)
        if device.type == "cuda":
            device = torch.device("cuda", ranks.local_rank)
        if config.sync_bn:
            handle.module = sync_batchnorm(handle.module)  # before the plan: its eval hooks sit on these modules
    module = handle.module
    stages = model_stages(module, handle.spec.head)
    plan_epoch = _resumed_plan_epoch(module, stages, plan, state.epoch, optimizer_state, config.weight_decay)
    report = apply_plan(module, stages, plan, epoch=plan_epoch)
    channels_last = config.channels_last if config.channels_last is not None else any(
        isinstance(m, nn.Conv2d) for m in module.modules())
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device, config.amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    workers = config.num_workers if config.num_workers is not None else default_workers(device)
    world = ranks.world if ranks is not None else 1
    loader_kw: dict[str, Any] = dict(batch_size=config.batch_size // world, num_workers=workers,
                                     pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    head_only = uses_feature_cache(plan, config)
    model: nn.Module = module
    train_src, val_src = prep.train_ds, prep.val_ds
    top = None if head_only else _top_view(config, prep, module, stages, plan, device, channels_last, reserve)
    cached = head_only or top is not None
    refuse_uncached(config, cached)
    if cached:  # the frozen part runs once over the data; only the head or the top trains, on its outputs
        point, drop = cache_point(handle, stages) if top is None else (top[0], 0.0)
        # one inference pass, in model-sized slices (core/memory.py)
        plain = dict(loader_kw, shuffle=False, batch_size=inference_batch(module, (3, prep.image_size, prep.image_size)))
        def features(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor] | None:
            return compute_features(module, point, loader, device, channels_last, stop, flatten=top is None)

        if ranks is None:
            tr, va = features(DataLoader(prep.train_ds, **plain)), features(DataLoader(prep.val_ds, **plain))
        else:  # each rank its shard, once; gathered on every rank
            tr = shared_features(features, prep.train_ds, plain, ranks)
            va = shared_features(features, prep.val_ds, plain, ranks) if tr is not None else None
        if tr is None or va is None:
            return None
        model = HeadOnly(module.get_submodule(point), drop) if top is None else top[1]
        train_src, val_src = TensorDataset(*tr), TensorDataset(*va)
        loader_kw.update(num_workers=0, persistent_workers=False, pin_memory=False)
        channels_last = channels_last and top is not None  # cached maps stay convolution inputs

    if len(train_src) == 0:
        raise DataError("No training images after the split.")
    generator = torch.Generator()
    # the training split's labels, in the order of train_src (the feature cache keeps it)
    train_labels = [prep.train_ds.ds.labels[i] for i in prep.train_ds.indices]
    # A last batch of one image cannot pass a BatchNorm in training mode whose maps are 1x1 (torch raises
    # "Expected more than 1 value per channel"): it is left out, as fastai does; shuffled, a different
    # image each epoch. Across ranks each rank's share ends the same way (the lone image is rank 0's).
    lone = len(train_src) % config.batch_size == 1 and len(train_src) > config.batch_size
    if ranks is not None:  # the one-process draw, every rank taking its share of each batch
        base = (balanced_sampler(train_labels, generator) if config.balance == "sampler"
                else RandomSampler(train_src, generator=generator))
        # the loader's generator too: each epoch's iterator draws a seed from it before the order, as in one process
        train_loader = DataLoader(train_src, sampler=ShardSampler(base, ranks.rank, ranks.world), drop_last=lone,
                                  generator=generator, **loader_kw)
    elif config.balance == "sampler":  # each class drawn equally often, from the per-epoch seeded generator
        train_loader = DataLoader(train_src, sampler=balanced_sampler(train_labels, generator), drop_last=lone,
                                  generator=generator, **loader_kw)
    else:
        train_loader = DataLoader(train_src, shuffle=True, drop_last=lone, generator=generator, **loader_kw)
    class_weight = (class_weights(train_labels, len(prep.train_ds.ds.class_names))
                    if config.balance == "weights" else None)
    optimizer = make_optimizer(module, stages, plan, config, optimizer_state)
    # what one training input looks like, without drawing an (augmented, random) sample to see it
    input_shape = tuple(train_src.tensors[0].shape[1:]) if cached else (3, prep.image_size, prep.image_size)
    batches = _plan_batches(config, module, model, stages, plan, plan_epoch, input_shape, device, channels_last, dtype,
                            world, ranks.local_world if ranks is not None else 1, reserve)
    # evaluation in the same slices: what fits a training step fits an inference pass
    val_loader = DataLoader(val_src if ranks is None else shard(val_src, ranks), shuffle=False,
                            **dict(loader_kw, batch_size=batches.micro_batch))
    return EpochRunner(config, module, model, stages, plan, report, optimizer, train_loader, val_loader, generator,
                       device, dtype, scaler, channels_last, cached, batches, class_weight, ranks,
                       wrap(model, ranks) if ranks is not None else None, len(handle.spec.class_names),
                       plan_floor=plan_epoch)


def _top_view(config: TrainConfig, prep: Prepared, module: nn.Module, stages: list[Stage], plan: FreezePlan,
              device: torch.device, channels_last: bool, reserve: int) -> tuple[str, nn.Module] | None:
    """For a plan that trains only the top stages: the cut module and the view of the model that trains
    from the cut's cached input (engine/training/prefix_cache.py); None when the plan
    changes what trains, the view does not reproduce the model, or the cache would not fit the memory
    budget. ``feature_cache="on"`` turns those into a refusal."""
    cut = prefix_cut(plan, config, stages, module)
    if cut is None:
        return None
    example = torch.stack([prep.val_ds[i][0] for i in range(min(2, len(prep.val_ds)))]).to(device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    found = prefix_view(module, cut, example)
    why = found if isinstance(found, str) else None
    if why is None:
        images = len(prep.train_ds) + len(prep.val_ds)
        if not cache_fits(found.per_image, images, detect_budget(config.memory_budget), current_rss() + reserve):
            why = f"the cached inputs of '{cut}' ({format_size(found.per_image * images)}) would not fit the memory budget"
    if why is None:
        return cut, found.module
    if config.feature_cache == "on":
        raise EngineError(f"The feature cache cannot be used for this run: {why}.")
    return None


def _plan_batches(config: TrainConfig, module: nn.Module, model: nn.Module, stages: list[Stage], plan: FreezePlan,
                  plan_epoch: int, input_shape: tuple[int, ...], device: torch.device, channels_last: bool,
                  dtype: torch.dtype | None, world: int = 1, here: int = 1, reserve: int = 0) -> BatchPlan:
    """The micro-batch, measured with the most of the model this run will ever train (the plan at its
    last epoch: gradual unfreezing only adds), so it holds for the whole run. With ``world``
    processes each plans its share of the batch; on the CPU the ``here`` processes of this machine share
    its memory budget."""
    apply_plan(module, stages, plan, epoch=config.epochs - 1)
    budget = detect_budget(config.memory_budget)
    if here > 1 and device.type == "cpu":
        budget = MemoryBudget(budget.bytes // here, f"{budget.source}, shared by {here} processes")
    try:
        return plan_batches(module, model, input_shape, batch_size=config.batch_size // world, device=device,
                            budget=budget, micro_batch=config.micro_batch,
                            optimizer_kind=config.optimizer, channels_last=channels_last, dtype=dtype,
                            reserve=reserve)
    finally:
        apply_plan(module, stages, plan, epoch=plan_epoch)


def _resumed_plan_epoch(module: nn.Module, stages: list[Stage], plan: FreezePlan, epoch: int,
                        saved: dict[str, Any] | None, weight_decay: float) -> int:
    """The plan's epoch for a run resuming at ``epoch``: that one, or a later one when the saved
    optimizer already holds stages released later. A race counts gradual unfreezing in passes over the
    data, so a winner that trained a few slices (its epochs) may have released every stage; resumed at
    its epoch count, the plan would freeze them again and the saved optimizer would not fit. The first
    epoch whose groups are the saved ones; unfreezing only adds, so only later epochs are tried."""
    layout = sorted(saved.get("group_layout", [])) if saved else []
    if not layout or not plan.unfreeze_schedule:
        return epoch
    for later in range(epoch, max(e for e, _n in plan.unfreeze_schedule) + 1):
        apply_plan(module, stages, plan, epoch=later)
        if sorted(g["name"] for g in param_groups(module, stages, plan, weight_decay)) == layout:
            return later
    return epoch


def make_optimizer(module: nn.Module, stages: list[Stage], plan: FreezePlan, config: TrainConfig,
                   saved: dict[str, Any] | None) -> torch.optim.Optimizer:
    """Fresh, or rebuilt in the saved group layout (names) so a resumed state fits group by group."""
    if not saved:
        return build_optimizer(module, stages, plan, config.weight_decay, kind=config.optimizer)
    layout = list(saved.get("group_layout", []))
    by_name = {g["name"]: g for g in param_groups(module, stages, plan, config.weight_decay)}
    if sorted(layout) != sorted(by_name):
        raise EngineError("The saved optimizer does not match the plan at this epoch; cannot resume.")
    optimizer = optimizer_for_groups([by_name[n] for n in layout], config.optimizer)
    optimizer.load_state_dict(saved["optimizer"])
    return optimizer
