"""``fit``: a whole run. Set-up, epochs, checkpoints, early stopping, resume, cancel.

The loop pieces live in train.py; this module wires them to data, model, plan and run directory.
A cancel (or a kill) never leaves a half-written file: checkpoints are replaced atomically and
``last`` always describes a completed epoch, so a resumed run continues the same curves.

"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from engine.anatomy.stages import model_stages
from engine.core.device import (
    amp_dtype,
    default_workers,
    resolve_device,
    seed_everything,
)
from engine.core.errors import DataError, EngineError
from engine.data.datasets import TransformDataset, load_source, validate
from engine.data.splits import split_indices
from engine.data.transforms import eval_transform, train_transform
from engine.freeze.plan import (
    apply_plan,
    build_optimizer,
    optimizer_for_groups,
    param_groups,
    unfreeze_for_epoch,
)
from engine.models.factory import create_model
from engine.runs.checkpoint_file import load_weights
from engine.runs.events import EpochEnded, RunFinished, RunStarted, StepLogged, no_emit
from engine.runs.recorder import RunRecorder
from engine.training.checkpoint import (
    _disk_error,
    _save_checkpoints,
    read_commit,
    repair_after_crash,
)
from engine.training.epoch import Diverged, evaluate, train_one_epoch
from engine.training.feature_cache import (
    HeadOnly,
    cache_point,
    compute_features,
    uses_feature_cache,
)

if TYPE_CHECKING:
    from engine.config import TrainConfig
    from engine.models.factory import ModelHandle
    from engine.runs.events import Emit
    from engine.runs.store import RunDir


@dataclass
class Prepared:
    handle: ModelHandle
    train_ds: TransformDataset
    val_ds: TransformDataset
    image_size: int
    skipped: list


def prepare(config: TrainConfig, work_dir: str | None = None, weights: str | None = None) -> Prepared:
    """Data (validated, split) and model (head sized to the classes) for a config."""
    ds = load_source(config.data, work_dir=work_dir)
    report = validate(ds)
    if not report.ok:
        raise DataError("The data cannot be trained on: " + " ".join(report.problems))
    train_idx, val_idx = split_indices(ds, config)
    handle = create_model(config.model, weights=weights or config.weights, class_names=ds.class_names)
    size = config.image_size or handle.spec.input_size[-1]
    config.validate_for_model(handle.module, model_stages(handle.module, handle.spec.head), size)
    handle.spec.input_size = (3, size, size)  # inference must see what training saw
    if config.crop_pct is not None:
        handle.spec.crop_pct = float(config.crop_pct)
    train_ds = TransformDataset(ds, train_idx, train_transform(handle.spec, size, augment=config.augment, hflip=config.hflip))
    val_ds = TransformDataset(ds, val_idx, eval_transform(handle.spec, size))
    return Prepared(handle, train_ds, val_ds, size, [list(pair) for pair in report.skipped])


def _better(value: float, best: float | None, monitor: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if monitor == "val_acc" else value < best - min_delta


def fit(config: TrainConfig, run: RunDir | None = None, *, emit: Emit = no_emit,
        should_stop: Callable[[], bool] | None = None, resume: bool = False) -> RunResult:
    """Train per ``config``; with ``run``, record everything there; ``resume`` continues ``last``."""
    started = time.perf_counter()
    sink: Emit = RunRecorder(run, emit) if run is not None else emit
    stop = should_stop or (run.cancel_requested if run is not None else (lambda: False))
    plan = config.freeze_plan()
    seed_everything(config.seed)
    device = resolve_device(config.device)

    state: dict[str, Any] = {}
    if resume and run is not None and not run.train_state_path.is_file():
        resume = False  # stopped before its first epoch committed: the run simply starts again
        run.rewrite_metrics([])
    if resume:
        if run is None:
            raise EngineError("Nothing to resume: no run directory.")
        state = read_commit(run)
    prep = prepare(config, work_dir=str(run.path) if run else None,
                   weights="none" if resume else None)  # resumed weights come from the commit
    handle, module = prep.handle, prep.handle.module
    if resume:
        module.load_state_dict(state["model"] if "model" in state else load_weights(run.checkpoint("last")))
        repair_after_crash(run, handle, state, config)
    stages = model_stages(module, handle.spec.head)
    start_epoch = int(state.get("epoch", 0)) + 1  # epochs are 1-based
    report = apply_plan(module, stages, plan, epoch=start_epoch - 1)

    channels_last = config.channels_last if config.channels_last is not None else any(
        isinstance(m, torch.nn.Conv2d) for m in module.modules())
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device, config.amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    workers = config.num_workers if config.num_workers is not None else default_workers(device)
    loader_kw: dict[str, Any] = dict(batch_size=config.batch_size, num_workers=workers,
                                     pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    cached = uses_feature_cache(plan, config)
    train_model: torch.nn.Module = module
    if cached:
        point, drop = cache_point(handle, stages)
        plain = dict(loader_kw, shuffle=False)
        tr = compute_features(module, point, DataLoader(prep.train_ds, **plain), device, channels_last, stop)
        va = compute_features(module, point, DataLoader(prep.val_ds, **plain), device, channels_last, stop)
        if tr is None or va is None:
            return _finish(sink, "cancelled", "cancelled while computing features", None, None, 0, started, [], cached, run)
        train_model = HeadOnly(module.get_submodule(point), drop)
        train_src, val_src = TensorDataset(*tr), TensorDataset(*va)
        loader_kw.update(num_workers=0, persistent_workers=False, pin_memory=False)
        channels_last = False
    else:
        train_src, val_src = prep.train_ds, prep.val_ds

    generator = torch.Generator()
    train_loader = DataLoader(train_src, shuffle=True, drop_last=False, generator=generator, **loader_kw)
    val_loader = DataLoader(val_src, shuffle=False, **loader_kw)
    steps = len(train_loader)
    if steps == 0:
        raise DataError("No training images after the split.")

    optimizer = _make_optimizer(module, stages, plan, config, state)
    step_count = int(state.get("step", 0))
    best = state.get("best_value")
    best_epoch = state.get("best_epoch")
    best_acc = state.get("best_val_acc")
    stale = int(state.get("stale", 0))
    history = list(state.get("history") or []) if resume else []

    run_id = run.run_id if run else "-"
    sink(RunStarted(run_id=run_id, device=str(device), epochs=config.epochs, steps_per_epoch=steps,
                    train_images=len(prep.train_ds), val_images=len(prep.val_ds),
                    trainable_params=report.trainable_params, feature_cache=cached, skipped=prep.skipped))
    total_steps = config.epochs * steps
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs + 1):
        if epoch > start_epoch or resume:
            report, _added = unfreeze_for_epoch(module, stages, plan, epoch - 1, optimizer, config.weight_decay)
        torch.manual_seed(config.seed * 1000 + epoch)  # same batches and dropout, resumed or not
        generator.manual_seed(config.seed * 1000 + epoch)
        tick = time.perf_counter()

        def on_step(i: int, loss: float, seen: int, _epoch: int = epoch) -> None:
            elapsed = time.perf_counter() - tick
            rate = seen / max(elapsed, 1e-9)
            remaining = (steps - i) * elapsed / i + (config.epochs - _epoch) * steps * elapsed / i
            sink(StepLogged(epoch=_epoch, step=i, steps=steps, loss=loss, images_per_s=rate, eta_s=remaining))

        try:
            stats = train_one_epoch(train_model, train_loader, optimizer, device=device, step0=step_count,
                                    total_steps=total_steps, config=config, dtype=dtype, scaler=scaler,
                                    channels_last=channels_last, on_step=on_step, should_stop=stop)
        except Diverged as exc:
            return _finish(sink, "diverged", f"epoch {epoch}: {exc}", best_epoch, best_acc, epoch - 1,
                           started, history, cached, run)
        if stats is None:
            return _finish(sink, "cancelled", f"cancelled during epoch {epoch}", best_epoch, best_acc,
                           epoch - 1, started, history, cached, run)
        step_count += steps
        val_loss, val_acc = evaluate(train_model, val_loader, device, dtype, channels_last)
        ended = EpochEnded(
            epoch=epoch, train_loss=stats.loss, train_acc=stats.acc, val_loss=val_loss, val_acc=val_acc,
            lr={g["name"]: g["lr"] for g in optimizer.param_groups}, epoch_s=stats.seconds,
            images_per_s=stats.images / max(stats.seconds, 1e-9),
            trainable_params=report.trainable_params, elapsed_s=time.perf_counter() - started,
        )
        if not (math.isfinite(val_loss) and math.isfinite(stats.loss)):
            return _finish(sink, "diverged", f"epoch {epoch}: the loss became {val_loss if not math.isfinite(val_loss) else stats.loss}; "
                           "lower the learning rate (the last finite checkpoint is kept)", best_epoch, best_acc,
                           epoch - 1, started, history, cached, run)
        history.append(ended.to_dict())
        value = val_acc if config.monitor == "val_acc" else val_loss
        improved = _better(value, best, config.monitor, config.min_delta)
        if improved:
            best, best_epoch, best_acc, stale = value, epoch, val_acc, 0
        else:
            stale += 1
        if run is not None:
            try:
                _save_checkpoints(run, handle, optimizer, ended, improved, step_count,
                                  dict(best_value=best, best_epoch=best_epoch, best_val_acc=best_acc, stale=stale),
                                  history, config, sink)
            except OSError as exc:
                raise _disk_error(exc, epoch) from exc
        sink(ended)  # the metrics line follows the commit; a resume rewrites it from the commit anyway
        if config.patience is not None and stale >= config.patience and epoch < config.epochs:
            return _finish(sink, "finished", f"early stopped: no {config.monitor} improvement for "
                           f"{stale} epochs", best_epoch, best_acc, epoch, started, history, cached, run)
    reason = "completed"
    failed = prep.train_ds.failed + prep.val_ds.failed  # files that broke after validation (workers=0)
    if failed:
        reason += (f"; {len(failed)} file(s) became unreadable during training and were replaced by other "
                   "images (listed in status.json)")
        if run is not None:
            from pathlib import Path

            run.write_status(unreadable=[{"file": Path(src).name, "reason": why} for src, why in failed])
    return _finish(sink, "finished", reason, best_epoch, best_acc, epoch, started, history, cached, run)


def _make_optimizer(module, stages, plan, config: TrainConfig, state: dict[str, Any]) -> torch.optim.Optimizer:
    """Fresh, or rebuilt in the saved group layout (names) so a resumed state fits group by group."""
    if not state:
        return build_optimizer(module, stages, plan, config.weight_decay, kind=config.optimizer)
    layout = list(state.get("group_layout", []))
    by_name = {g["name"]: g for g in param_groups(module, stages, plan, config.weight_decay)}
    if sorted(layout) != sorted(by_name):
        raise EngineError("The saved optimizer does not match the plan at this epoch; cannot resume.")
    optimizer = optimizer_for_groups([by_name[n] for n in layout], config.optimizer)
    optimizer.load_state_dict(state["optimizer"])
    return optimizer


def _finish(sink: Emit, status: str, reason: str, best_epoch, best_acc, epochs_done: int, started: float,
            history: list, cached: bool, run: RunDir | None) -> RunResult:
    seconds = time.perf_counter() - started
    sink(RunFinished(status=status, reason=reason, best_epoch=best_epoch, best_val_acc=best_acc,
                     epochs_done=epochs_done, seconds=seconds))
    return RunResult(status=status, reason=reason, run_dir=str(run.path) if run else None,
                     best_epoch=best_epoch, best_val_acc=best_acc, epochs_done=epochs_done,
                     seconds=seconds, history=history, feature_cache=cached)


@dataclass
class RunResult:
    status: str
    reason: str
    run_dir: str | None
    best_epoch: int | None
    best_val_acc: float | None
    epochs_done: int
    seconds: float
    history: list[dict[str, Any]]
    feature_cache: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
