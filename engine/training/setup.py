"""Everything the epochs run on, set up once: data and model (``prepare``), then device, freeze
plan, loaders, optimizer and feature cache (``set_up``), handed over as a Trainer
(engine/training/trainer.py), which holds the epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from engine.anatomy.stages import model_stages
from engine.core.device import amp_dtype, default_workers, resolve_device
from engine.core.errors import DataError, EngineError
from engine.core.memory import MemoryBudget, current_rss, detect_budget, format_size, inference_batch
from engine.core.paths import machine_cache_dir
from engine.data.balance import balanced_sampler, class_weights
from engine.data.datasets import TransformDataset, load_source, validate
from engine.data.overrides import Overrides, applied_overrides, save_run_overrides
from engine.data.splits import split_all
from engine.data.transforms import eval_transform, train_transform
from engine.freeze.plan import apply_plan, build_optimizer, optimizer_for_groups, param_groups
from engine.models.factory import create_model
from engine.training.compiled_pass import CompiledPasses
from engine.training.distributed import (
    Ranks,
    ShardSampler,
    check_distributed,
    shard,
    shared_features,
    sync_batchnorm,
    wrap,
)
from engine.training.feature_cache import (
    HeadOnly,
    cache_point,
    compute_features,
    known_and_computed,
    refuse_uncached,
    uses_feature_cache,
)
from engine.training.micro import BatchPlan, Placement, plan_batches
from engine.training.precision import Precision, cpu_precision
from engine.training.prefix_cache import cache_fits, prefix_cut, prefix_view
from engine.training.preflight import check_hosted_images, check_split
from engine.training.trainer import Trainer

if TYPE_CHECKING:
    from engine.anatomy.stages import Stage
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan
    from engine.models.factory import ModelHandle
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
    layout_note: str = ""  # the data report's sentence on the layout and its split
    overrides: Overrides | None = None  # the decisions about single images it trains with (engine.data.overrides)
    # module name -> {image index -> what enters that module}, computed in eval mode at the image size without
    # augmentation (the automatic plan's sample, engine/training/auto_plan.py): the feature pass skips those images
    known: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    # the run's compiled frozen passes (engine/training/compiled_pass.py): a graph built for the sample serves
    # the feature pass after it; None: a fresh set for these images (the sample's Prepared shares the run's)
    compiled: CompiledPasses | None = None

    def __post_init__(self) -> None:
        if self.compiled is None:
            self.compiled = CompiledPasses(self.image_size ** 2, run_images=len(self.train_ds) + len(self.val_ds))


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
    train_ds = TransformDataset(ds, train_idx, train_transform(handle.spec, size, augment=config.augment_spec()))
    val_ds = TransformDataset(ds, val_idx, eval_transform(handle.spec, size))
    test_ds = TransformDataset(ds, test_idx, eval_transform(handle.spec, size)) if test_idx else None
    return Prepared(handle, train_ds, val_ds, size, [list(pair) for pair in report.skipped], test_ds, report.layout_note,
                    applied_overrides(ds))


def record_split(prep: Prepared, run: RunDir | None) -> None:
    """The run's status says which layout gave its split and how many images each part has; a test
    result and calibration of an earlier finish (a run extended by more epochs) are cleared until this one ends."""
    if run is not None:
        if prep.overrides is not None:  # evaluation, exports and a resume read the data with these
            save_run_overrides(run.path, prep.overrides)
        run.write_status(split={"layout": prep.layout_note, "train": len(prep.train_ds), "val": len(prep.val_ds),
                                "test": len(prep.test_ds) if prep.test_ds is not None else 0}, test=None,
                         calibration=None)


def describe_test(result: dict[str, Any]) -> str:
    at = f", epoch {result['epoch']}" if result.get("epoch") else ""
    return (f"test acc {result['acc']:.4f}, loss {result['loss']:.4f} on {result['images']} held-out images "
            f"({result['checkpoint']} checkpoint{at})")


def set_up(config: TrainConfig, prep: Prepared, state: TrainState, optimizer_state: dict[str, Any] | None,
           stop: Callable[[], bool], ranks: Ranks | None = None, reserve: int = 0) -> Trainer | None:
    """The plan applied at the epoch the run continues from, the model on its device, the loaders
    (features computed once when the backbone stays frozen) and the optimizer. None: cancelled
    while computing features. ``ranks``: this process's share of a distributed run
    (engine/training/distributed.py says what is shared how). ``reserve``: bytes of memory other
    models of this process will take later (a race's plans), left out of the micro-batch's room."""
    handle = prep.handle
    plan = config.freeze_plan()
    device = _device(config, prep, ranks)
    module = handle.module
    stages = model_stages(module, handle.spec.head)
    plan_epoch = _resumed_plan_epoch(module, stages, plan, state.epoch, optimizer_state, config.weight_decay)
    report = apply_plan(module, stages, plan, epoch=plan_epoch)
    channels_last = channels_last_for(config, module)
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    place = Placement(device, amp_dtype(device, config.amp), channels_last)
    scaler = torch.amp.GradScaler("cuda") if place.dtype == torch.float16 else None
    loader_kw = _loader_options(config, device, ranks)
    trains = _what_trains(config, prep, stages, plan, place, loader_kw, stop, ranks, reserve)
    if trains is None:
        return None
    if len(trains.train_src) == 0:
        raise DataError("No training images after the split.")
    if trains.cached:
        loader_kw.update(num_workers=0, persistent_workers=False, pin_memory=False)
    generator = torch.Generator()
    # the training split's labels, in the order of train_src (the feature cache keeps it)
    train_labels = [prep.train_ds.ds.labels[i] for i in prep.train_ds.indices]
    train_loader = _train_loader(config, trains.train_src, train_labels, generator, loader_kw, ranks)
    class_weight = (class_weights(train_labels, len(prep.train_ds.ds.class_names))
                    if config.balance == "weights" else None)
    optimizer = make_optimizer(module, stages, plan, config, optimizer_state)
    # what one training input looks like, without drawing an (augmented, random) sample to see it
    input_shape = (tuple(trains.train_src.tensors[0].shape[1:]) if trains.cached
                   else (3, prep.image_size, prep.image_size))
    batches = _plan_batches(config, module, trains.model, stages, plan, plan_epoch, input_shape, trains.place, ranks,
                            reserve)
    # after the plan: the probe's transient memory must not count as the process's fixed share (a float32 plan
    # holds in bf16 too: its activations are smaller)
    precision = _precision(config, trains, input_shape, ranks, batches.micro_batch)
    trains.place = replace(trains.place, dtype=precision.dtype)
    # evaluation in the same slices: what fits a training step fits an inference pass
    val_loader = DataLoader(trains.val_src if ranks is None else shard(trains.val_src, ranks), shuffle=False,
                            **dict(loader_kw, batch_size=batches.micro_batch))
    return Trainer(config=config, module=module, model=trains.model, stages=stages, plan=plan, report=report,
                   optimizer=optimizer, train_loader=train_loader, val_loader=val_loader, generator=generator,
                   device=device, dtype=trains.place.dtype, scaler=scaler, channels_last=trains.place.channels_last,
                   precision=precision.reason,
                   cached=trains.cached, batches=batches, class_weight=class_weight, ranks=ranks,
                   wrapper=wrap(trains.model, ranks) if ranks is not None else None,
                   num_classes=len(handle.spec.class_names), plan_floor=plan_epoch, head=handle.spec.head,
                   image_size=prep.image_size)


def channels_last_for(config: TrainConfig, module: nn.Module) -> bool:
    """Whether the steps run channels-last: as the config says, else for any convolutional network."""
    return config.channels_last if config.channels_last is not None else any(
        isinstance(m, nn.Conv2d) for m in module.modules())


def _device(config: TrainConfig, prep: Prepared, ranks: Ranks | None) -> torch.device:
    """The device the steps run on; with several processes, checked and made this rank's."""
    device = resolve_device(config.device)
    if ranks is not None:
        check_distributed(config, device, here=ranks.local_world)
        if device.type == "cuda":
            device = torch.device("cuda", ranks.local_rank)
        if config.sync_bn:  # before the plan: its eval hooks sit on these modules
            prep.handle.module = sync_batchnorm(prep.handle.module)
    return device


def _loader_options(config: TrainConfig, device: torch.device, ranks: Ranks | None) -> dict[str, Any]:
    workers = config.num_workers if config.num_workers is not None else default_workers(device)
    world = ranks.world if ranks is not None else 1
    return dict(batch_size=config.batch_size // world, num_workers=workers, pin_memory=device.type == "cuda",
                persistent_workers=workers > 0)


@dataclass
class _Trains:
    """What the steps train and on what: the whole model on images, or (the frozen part run once) its
    head or top stages on cached features."""

    model: nn.Module
    train_src: Any
    val_src: Any
    cached: bool
    place: Placement  # cached flat features are no convolution input: channels_last only for a top view


def _what_trains(config: TrainConfig, prep: Prepared, stages: list[Stage], plan: FreezePlan, place: Placement,
                 loader_kw: dict[str, Any], stop: Callable[[], bool], ranks: Ranks | None,
                 reserve: int) -> _Trains | None:
    """The model and its data; None: cancelled while computing features."""
    handle, module = prep.handle, prep.handle.module
    head_only = uses_feature_cache(plan, config)
    top = None if head_only else _top_view(config, prep, module, stages, plan, place, reserve)
    cached = head_only or top is not None
    refuse_uncached(config, cached)
    if not cached:
        return _Trains(module, prep.train_ds, prep.val_ds, False, place)
    # the frozen part runs once over the data; only the head or the top trains, on its outputs
    point, drop = cache_point(handle, stages) if top is None else (top[0], 0.0)
    # one inference pass, in model-sized slices (core/memory.py)
    plain = dict(loader_kw, shuffle=False, batch_size=inference_batch(module, (3, prep.image_size, prep.image_size)))

    compiled = prep.compiled  # one build for the sample's and the training and validation passes

    def features(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor] | None:
        return compute_features(module, point, loader, place.device, place.channels_last, stop, flatten=top is None,
                                compiled=compiled)

    def some_known(dataset: TransformDataset) -> tuple[torch.Tensor, torch.Tensor] | None:
        return known_and_computed(module, point, dataset, prep.known.get(point, {}), plain, place.device,
                                  place.channels_last, stop, flatten=top is None, compiled=compiled)

    if ranks is None:
        tr = some_known(prep.train_ds)
        va = some_known(prep.val_ds) if tr is not None else None
    else:  # each rank its shard, once; gathered on every rank
        tr = shared_features(features, prep.train_ds, plain, ranks)
        va = shared_features(features, prep.val_ds, plain, ranks) if tr is not None else None
    if tr is None or va is None:
        return None
    model = HeadOnly(module.get_submodule(point), drop) if top is None else top[1]
    # cached maps stay convolution inputs
    return _Trains(model, TensorDataset(*tr), TensorDataset(*va), True,
                   replace(place, channels_last=place.channels_last and top is not None))


def _train_loader(config: TrainConfig, train_src: Any, train_labels: list[int], generator: torch.Generator,
                  loader_kw: dict[str, Any], ranks: Ranks | None) -> DataLoader:
    """Shuffled from the per-epoch seeded ``generator``, or class-balanced (balance "sampler")."""
    # A last batch of one image cannot pass a BatchNorm in training mode whose maps are 1x1 (torch raises
    # "Expected more than 1 value per channel"): it is left out, as fastai does; shuffled, a different
    # image each epoch. Across ranks each rank's share ends the same way (the lone image is rank 0's).
    lone = len(train_src) % config.batch_size == 1 and len(train_src) > config.batch_size
    if ranks is not None:  # the one-process draw, every rank taking its share of each batch
        base = (balanced_sampler(train_labels, generator) if config.balance == "sampler"
                else RandomSampler(train_src, generator=generator))
        # the loader's generator too: each epoch's iterator draws a seed from it before the order, as in one process
        return DataLoader(train_src, sampler=ShardSampler(base, ranks.rank, ranks.world), drop_last=lone,
                          generator=generator, **loader_kw)
    if config.balance == "sampler":  # each class drawn equally often, from the per-epoch seeded generator
        return DataLoader(train_src, sampler=balanced_sampler(train_labels, generator), drop_last=lone,
                          generator=generator, **loader_kw)
    return DataLoader(train_src, shuffle=True, drop_last=lone, generator=generator, **loader_kw)


def _top_view(config: TrainConfig, prep: Prepared, module: nn.Module, stages: list[Stage], plan: FreezePlan,
              place: Placement, reserve: int) -> tuple[str, nn.Module] | None:
    """For a plan that trains only the top stages: the cut module and the view of the model that trains
    from the cut's cached input (engine/training/prefix_cache.py); None when the plan
    changes what trains, the view does not reproduce the model, or the cache would not fit the memory
    budget. ``feature_cache="on"`` turns those into a refusal."""
    cut = prefix_cut(plan, config, stages, module)
    if cut is None:
        return None
    example = torch.stack([prep.val_ds[i][0] for i in range(min(2, len(prep.val_ds)))]).to(place.device)
    if place.channels_last:
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


def _precision(config: TrainConfig, trains: _Trains, input_shape: tuple[int, ...], ranks: Ranks | None,
               micro_batch: int) -> Precision:
    """The training steps' autocast dtype: CUDA's as amp_dtype says; on a CPU, bf16 when asked for, or
    under 'auto' when a probe finds it faster (engine/training/precision.py); never on cached features."""
    place = trains.place
    if place.device.type != "cpu" or config.amp == "off":
        return Precision(place.dtype, f"{config.amp}: {place.dtype or 'float32'}".replace("torch.", ""))
    if config.amp == "bf16":
        return Precision(torch.bfloat16, "bfloat16: asked for (amp bf16)")
    if trains.cached or (ranks is not None and ranks.world > 1) or config.amp != "auto":
        return Precision(None, "float32")
    return cpu_precision(trains.model, input_shape, min(micro_batch, 8), channels_last=place.channels_last,
                         key=f"{config.model}|{sum(p.numel() for p in trains.model.parameters() if p.requires_grad)}",
                         cache_dir=machine_cache_dir())


def _plan_batches(config: TrainConfig, module: nn.Module, model: nn.Module, stages: list[Stage], plan: FreezePlan,
                  plan_epoch: int, input_shape: tuple[int, ...], place: Placement, ranks: Ranks | None,
                  reserve: int = 0) -> BatchPlan:
    """The micro-batch, measured with the most of the model this run will ever train (the plan at its
    last epoch: gradual unfreezing only adds), so it holds for the whole run. With several processes
    each plans its share of the batch; on the CPU the processes of this machine share its memory budget."""
    world, here = (ranks.world, ranks.local_world) if ranks is not None else (1, 1)
    apply_plan(module, stages, plan, epoch=config.epochs - 1)
    budget = detect_budget(config.memory_budget)
    if here > 1 and place.device.type == "cpu":
        budget = MemoryBudget(budget.bytes // here, f"{budget.source}, shared by {here} processes")
    try:
        return plan_batches(module, model, input_shape, batch_size=config.batch_size // world, place=place,
                            budget=budget, micro_batch=config.micro_batch, optimizer_kind=config.optimizer,
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
