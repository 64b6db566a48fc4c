"""``python -m engine ...``: everything the app does, from a terminal.

Each subcommand is one engine call plus formatting. User errors (EngineError) print one line on
stderr and exit 2; ``--json`` prints exactly one JSON document on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

from engine.core.errors import EngineError, RunError
from engine.core.paths import data_root, runs_root
from engine.models.registry import DEFAULT_MODEL


def _print_json(data: Any) -> None:
    """Strict JSON: a NaN or infinity (a class with no validation images has no accuracy) is null,
    since JSON has no such numbers and strict parsers refuse Python's NaN."""
    json.dump(_finite(data), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def cmd_models(args: argparse.Namespace) -> int:
    from engine.models.catalog import search

    entries = search(args.filter or "", source=args.source, packaged_only=args.packaged)
    if args.json:
        _print_json([e.to_dict() for e in entries])
        return 0
    for e in entries:
        tag = "  [packaged weights]" if e.packaged else ""
        print(f"{e.name:<48} {e.family:<20} {_human(e.params):>8}{tag}")
    print(f"{len(entries)} models", file=sys.stderr)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from engine.anatomy.tree import summarize
    from engine.models.factory import create_model

    handle = create_model(args.model, weights=args.weights, num_classes=args.num_classes,
                          check_output=False)
    size = args.input_size or handle.spec.input_size[-1]
    summary = summarize(handle.module, (3, size, size), max_depth=args.depth)
    if args.json:
        data = summary.to_dict()
        data.update(model=handle.spec.name, spec=handle.spec.to_dict())
        _print_json(data)
        return 0
    print(f"{handle.spec.name}  weights={handle.spec.weights}  head={handle.spec.head}")
    print(f"{'module':<50} {'type':<24} {'params':>10} {'trainable':>10}  output")
    for row in summary.rows:
        label = ("  " * row.depth) + (row.name.rsplit(".", 1)[-1] if row.name else "(model)")
        print(f"{label:<50} {row.type:<24} {row.params:>10,} {row.trainable:>10,}  {row.output_shape}")
    print(f"input {summary.input_shape} -> output {summary.output_shape}")
    print(f"total params {summary.total_params:,}  trainable {summary.trainable_params:,}  "
          f"buffer elements {summary.total_buffers:,}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from engine.models.factory import create_model
    from engine.outputs.predict import predict_files

    temperature = rule = None
    if args.run:
        from engine.runs.calibration import run_temperature
        from engine.runs.load import load_run_model
        from engine.runs.open_set import run_open_set
        from engine.runs.store import open_run

        run = open_run(args.out, args.run)
        handle = load_run_model(run.path)
        temperature = run_temperature(run)  # a calibrated run's probabilities are the calibrated ones
        if args.open_set == "on":
            rule = run_open_set(run, handle.spec.num_classes)
    else:
        handle = create_model(args.model, weights=args.weights)
    results = predict_files(handle, args.images, top_k=args.top_k, tta=args.tta, temperature=temperature,
                            open_set=rule)
    if args.json:
        _print_json([r.to_dict() for r in results])
    else:
        for r in results:
            if r.error:
                print(f"{r.file}: ERROR {r.error}")
                continue
            print(r.file + (f"  UNKNOWN: not one of the run's classes (distance {r.unknown_score:.3f} > "
                            f"{r.unknown_threshold:.3f}); nearest class below" if r.unknown else ""))
            for t in r.topk or []:
                print(f"  {t.prob:6.1%}  {t.label}  (#{t.index})")
        if rule is not None:
            print(f"(open set: unknown when the distance to the nearest training image is above "
                  f"{rule.threshold:.3f}; --open-set off to turn it off)")
        elif args.run and args.open_set == "on":
            print("(open set: this run has no open-set rule yet: python -m engine calibrate RUN fits one)")
        if temperature is not None:
            print(f"(calibrated probabilities: logits divided by the run's temperature {temperature:.3f})")
    if results and all(r.error for r in results):
        print(f"error: none of the {len(results)} image(s) could be read (reasons above)", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


def cmd_freeze(args: argparse.Namespace) -> int:
    from engine.anatomy.stages import model_stages
    from engine.freeze.plan import FreezePlan, apply_plan
    from engine.models.factory import create_model

    handle = create_model(args.model, weights=args.weights, num_classes=args.num_classes,
                          check_output=False)
    extra = {"bn_policy": args.bn, "head_lr": args.head_lr, "backbone_lr_ratio": args.backbone_lr_ratio,
             "stage_lr_decay": args.stage_lr_decay}
    plan = FreezePlan.parse(args.strategy, **extra)
    if plan.strategy == "custom":
        plan = FreezePlan.custom(stages=_split(args.stages), patterns=_split(args.patterns), **extra)
    report = apply_plan(handle.module, model_stages(handle.module, handle.spec.head), plan)
    if args.json:
        data = report.to_dict()
        data["model"] = handle.spec.name
        _print_json(data)
        return 0
    print(f"{handle.spec.name}: {plan.strategy}, BN in frozen stages: {plan.bn_policy}")
    print(f"{'stage':<34} {'params':>12} {'trainable':>12} {'lr':>10} {'BN fixed':>9}")
    for row in report.stages:
        lr = f"{row.lr:.2e}" if row.lr else "frozen"
        print(f"{row.name:<34} {row.params:>12,} {row.trainable:>12,} {lr:>10} {row.bn_fixed:>4}/{row.bn_layers}")
    print(f"trainable {report.trainable_params:,} of {report.total_params:,} "
          f"({report.trainable_pct:.1f}%), frozen BN layers: {len(report.frozen_bn)}")
    return 0


def _progress_printer(enabled: bool):
    """A one-line progress bar on a terminal; epoch lines always."""
    from engine.runs.events import EpochEnded, PlanChosen, RunFinished, RunStarted, StepLogged

    def emit(event) -> None:
        if isinstance(event, PlanChosen):
            sys.stderr.write(f"{event.summary}\n")
        if isinstance(event, RunStarted) and enabled and event.batches:
            sys.stderr.write(f"{event.batches}\n")
        if isinstance(event, RunStarted) and event.skipped:
            from pathlib import Path

            shown = "; ".join(f"{Path(f).name} ({why})" for f, why in event.skipped[:20])
            more = f"; and {len(event.skipped) - 20} more" if len(event.skipped) > 20 else ""
            sys.stderr.write(f"skipped {len(event.skipped)} file(s) the data check refused: {shown}{more}\n")
        if isinstance(event, StepLogged) and enabled:
            filled = int(30 * event.step / event.steps)
            sys.stderr.write(f"\repoch {event.epoch} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{event.step}/{event.steps} loss {event.loss:.3f} "
                             f"{event.images_per_s:.0f} img/s ETA {event.eta_s:.0f}s ")
            sys.stderr.flush()
        elif isinstance(event, EpochEnded):
            sys.stderr.write(("\n" if enabled else "") + f"epoch {event.epoch}: train loss {event.train_loss:.3f} "
                             f"acc {event.train_acc:.3f} | val loss {event.val_loss:.3f} acc {event.val_acc:.3f} "
                             f"| {event.epoch_s:.1f}s {event.images_per_s:.0f} img/s\n")
        elif isinstance(event, RunFinished):
            sys.stderr.write(f"{event.status}: {event.reason} ({event.seconds:.1f}s)\n")
    return emit


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """What a training is: model, data, freeze plan and settings (train and lr-find share them)."""
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--weights", default="packaged", help="packaged|hub|none|PATH")
    p.add_argument("--data", default="digits", help="digits | lfw | FOLDER | ZIP")
    p.add_argument("--strategy", default="full", help="feature-extraction | full | last-n:N | auto (the advisor and "
                   "a short race on a sample of the training images choose, before the first epoch; --lr, --bn and "
                   "--unfreeze then do not apply)")
    p.add_argument("--unfreeze", help="gradual unfreezing: EPOCHS:STAGES,... e.g. 2:1,3:3 = after 2 epochs the top backbone stage "
                   "trains too, after 3 epochs the top three")
    p.add_argument("--bn", default="freeze", choices=["freeze", "adapt", "train"])
    p.add_argument("--lr", type=float, default=2e-3, help="head learning rate")
    p.add_argument("--backbone-lr-ratio", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=1)
    _add_batch_args(p)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--progressive-from", default="auto", metavar="PX|auto|off",
                   help="progressive resizing: the first epoch trains at PX, each later one larger, the last at "
                   "--image-size (validation always at --image-size); auto (default): from 192 px on, the first "
                   "epoch at 4/7 of the size (128 of 224) when there are 2 or more epochs; off: every epoch at the size")
    p.add_argument("--bn-recalibrate", default="auto", choices=["auto", "on", "off"],
                   help="measure the training BatchNorm layers' running statistics again from 256 training images "
                   "at an epoch's end: auto (default) when the epoch ends at half the peak LR or more, where the "
                   "running averages lag the weights; on: every epoch; off: never")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--max-per-class", type=int)
    p.add_argument("--augment", nargs="?", const="default", default=False, metavar="SPEC",
                   help="augment the training images: bare = default (crop:0.7), or a SPEC such as "
                   "flip,rotate:15,color:0.3,crop:0.7,randaug:9,mixup:0.2,cutmix:1,smooth:0.1 (docs/augmentation.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int)
    p.add_argument("--feature-cache", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--patience", type=int, help="early stopping patience (epochs)")
    p.add_argument("--monitor", default="val_acc", choices=["val_acc", "val_loss"])
    p.add_argument("--balance", default="none", choices=["none", "weights", "sampler"],
                   help="class imbalance: weights = class-weighted training loss (inverse frequency, mean 1), "
                   "sampler = batches draw each class equally often (default: none)")


def _add_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="images per optimizer step")
    p.add_argument("--memory-budget", help="peak memory the training may use, e.g. 1.5GB (default: the "
                   "container's limit, or the RAM, minus 1 GB for the app)")
    p.add_argument("--micro-batch", type=int, help="images per forward/backward slice (default: the largest "
                   "that fits the budget and is fast); gradients add up to --batch-size")


def _config_from_args(args: argparse.Namespace):
    from engine.config import TrainConfig
    from engine.freeze.plan import FreezePlan

    auto = str(args.strategy).strip().lower() == "auto"
    if auto:  # the plan is chosen on the data before the first epoch (engine/training/auto_plan.py)
        from engine.training.auto_plan import PENDING

        plan = FreezePlan.default()
    else:
        plan = FreezePlan.parse(args.strategy, head_lr=args.lr, backbone_lr_ratio=args.backbone_lr_ratio,
                                bn_policy=args.bn, unfreeze_schedule=_schedule(args.unfreeze))
    config = TrainConfig(
        model=args.model, weights=args.weights, data=args.data, plan=plan.to_dict(), epochs=args.epochs,
        auto_plan=dict(PENDING) if auto else None,
        batch_size=args.batch_size, image_size=args.image_size, seed=args.seed, split_seed=args.seed,
        val_fraction=args.val_fraction, max_per_class=args.max_per_class, augment=args.augment,
        device=args.device, feature_cache=args.feature_cache, patience=args.patience,
        monitor=args.monitor, num_workers=args.workers, memory_budget=args.memory_budget,
        micro_batch=args.micro_batch, balance=args.balance, nproc=getattr(args, "nproc", 1),
        progressive_from=_progressive_from(args.progressive_from, args.image_size, args.epochs),
        sync_bn=getattr(args, "sync_bn", False), bn_recalibrate=args.bn_recalibrate,
    )
    config.check_hosted()  # on a shared server: refused before anything is on disk
    return config


def _progressive_from(text: str, image_size: int | None, epochs: int) -> int | None:
    """--progressive-from as config.json records it: a size, or None; 'auto' resolved here (training/sizes.py)."""
    from engine.config import ConfigError
    from engine.training.sizes import auto_start

    value = str(text).strip().lower()
    if value == "auto":
        return auto_start(image_size, epochs)
    if value in ("off", "none", "0"):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError("progressive_from", f"--progressive-from takes a size in px, auto or off (got {text!r}).") from None


def _schedule(text: str | None) -> tuple[tuple[int, int], ...]:
    from engine.freeze.plan import FreezePlan

    try:
        return FreezePlan.parse_schedule(text)
    except EngineError as exc:
        raise EngineError(f"--unfreeze: {exc}") from exc


def _refuse_if_active(run) -> None:
    from engine.runs.status import ACTIVE_STATES

    status = run.status()
    if status.state in ACTIVE_STATES and status.pid not in (None, os.getpid()):
        raise RunError(f"Run {run.run_id} is already {status.state}; wait for it or cancel it.")


def cmd_train(args: argparse.Namespace) -> int:
    check_runs_folder(args.out)
    if args.rank_worker:  # one of several processes torchrun started (engine/training/launch.py)
        from engine.training.launch import rank_main

        return rank_main(args, config_from_args=_config_from_args, main_emit=_progress_printer(False))
    address = _where_to_train(args)
    if address is not None:  # the work is on the cluster: no device lock here, no place in this machine's queue
        return _train_on_cluster(args, address)
    out_existed = os.path.isdir(args.out)
    run, resume, lock = _run_to_train(args)
    if args.background:
        return _train_in_background(args, run, resume)
    result = _train_here(args, run, resume=resume, lock=lock, out_existed=out_existed)
    return _report_training(args, run, result)


def _where_to_train(args: argparse.Namespace) -> str | None:
    """The Ray cluster a training goes to (None: this machine). ``--cluster`` says it (``--cluster ""``: here).
    Else a run that trained on a cluster resumes there; a new run or a resume from the command line follows
    WORKBENCH_CLUSTER; a run the app created (``--run-dir``) never does: the app said where when it started it."""
    from engine.cluster.client import cluster_address

    if args.cluster is not None:
        return cluster_address(args.cluster)
    target = args.resume or (args.run_dir if args.resume_flag else None)
    if target:
        from engine.runs.store import open_run

        try:
            record = open_run(args.out, target).status().cluster or {}
        except EngineError:  # no such run: the resume's own checks say so, after its settings' check
            record = {}
        address = record.get("address")
        if isinstance(address, str) and address:
            return address
    return None if args.run_dir else cluster_address(None)


def _train_on_cluster(args: argparse.Namespace, address: str) -> int:
    """``--cluster``: submit the run as a Ray job and follow it here (engine/cluster/submit.py); the run
    folder is in --out from the start. ``--background``: a separate process submits and follows."""
    from engine.cluster.client import check_cluster
    from engine.cluster.submit import train_on_cluster
    from engine.runs.store import extend_run, open_run

    check_cluster(address)  # unreachable or too old: one line, before anything is written (a resume's epochs too)
    run, resume = None, False
    if args.run_dir:  # a background follower, or attaching again to a run whose job may still run
        run = open_run(args.out, args.run_dir)
        resume = args.resume_flag or run.train_state_path.is_file()
    elif args.resume is not None:
        changed = sorted(getattr(args, "given", set()) - RESUME_OPTIONS)
        if changed:
            raise EngineError(f"--resume continues a run with the settings it started with; {', '.join(changed)} "
                              "cannot change (only --epochs can).")
        run = open_run(args.out, args.resume)
        _refuse_if_active(run)
        if args.epochs_given:
            from engine.training.run import check_resumable

            check_resumable(run, args.epochs)
            extend_run(run, args.epochs)
        resume = True
    if args.background:
        from engine.cluster.submit import check_start, start_in_background

        if run is None:
            from engine.runs.store import create_run

            config = _config_from_args(args).to_dict()
            check_start(address, config)  # the data planned: a refusal writes nothing
            run = create_run(args.out, config)
        pid = start_in_background(run, args.out, address, resume=resume)
        if args.json:
            _print_json({"run_id": run.run_id, "run_dir": str(run.path), "pid": pid, "cluster": address})
        else:
            print(run.path)
        return 0
    config = run.config() if run is not None else _config_from_args(args).to_dict()
    printer = _progress_printer(sys.stderr.isatty() and not args.json)
    run, result = train_on_cluster(address, config=config, out=args.out, run=run, resume=resume,
                                   attach=not args.resume_flag, emit=printer)
    return _report_training(args, run, result)


def _run_to_train(args: argparse.Namespace) -> tuple[Any, bool, Any]:
    """The run to train (opened, resumed or created), whether it resumes, and the device lock when one was taken."""
    from engine.runs.store import create_run, open_run

    if args.run_dir:  # worker mode: the config is already in the run directory
        run = open_run(args.out, args.run_dir)
        return run, args.resume_flag or run.train_state_path.is_file(), None
    if args.resume is not None:
        run, lock = _run_to_resume(args)
        return run, True, lock
    config = _config_from_args(args)  # every setting validated before anything is on disk
    lock = None
    if not args.background:
        lock = _take_device_lock(config.device)  # a busy device refuses before a run folder exists
    run = create_run(args.out, config.to_dict(), owner=None if args.background else os.getpid())
    return run, False, lock


def _run_to_resume(args: argparse.Namespace) -> tuple[Any, Any]:
    """``--resume RUN``: the run, checked before it is touched and extended when --epochs is given; the device lock
    when one was taken."""
    from engine.runs.store import extend_run, open_run

    if not args.resume.strip():
        raise EngineError("--resume needs a run id or a run folder (python -m engine runs lists them).")
    changed = sorted(getattr(args, "given", set()) - RESUME_OPTIONS)
    if changed:  # they were silently ignored: the run goes on with its own settings
        raise EngineError(f"--resume continues a run with the settings it started with; {', '.join(changed)} "
                          "cannot change (only --epochs can). Start a new run to train another way.")
    run = open_run(args.out, args.resume)
    _refuse_if_active(run)  # before touching its config
    if not run.train_state_path.is_file() and (run.metrics() or run.status().imported_from):
        raise RunError(f"run {run.run_id} has no training state to resume from"
                       + (" (a run bundle carries its best weights, not the optimizer state)"
                          if run.status().imported_from else "")
                       + "; start a new run with its settings instead.")
    lock = None
    if args.epochs_given:
        from engine.training.run import check_resumable

        check_resumable(run, args.epochs)  # before the run is touched: a refusal leaves it as it was
        if not args.background:
            lock = _take_device_lock(run.config().get("device", "auto"))
        extend_run(run, args.epochs)
    return run, lock


def _train_in_background(args: argparse.Namespace, run: Any, resume: bool) -> int:
    """``--background``: a separate process trains the run (queued when the device is busy); this prints where."""
    from engine.runs.background import start_background
    from engine.runs.locks import device_lock

    queued = not device_lock(run.config().get("device", "auto")).is_free()
    pid = start_background(run, args.out, resume=resume)
    if args.json:
        _print_json({"run_id": run.run_id, "run_dir": str(run.path), "pid": pid, "queued": queued})
    else:
        print(run.path)
        if queued:
            print("queued: another training is using the device; this one starts when it is free "
                  "(python -m engine runs shows its place in line)", file=sys.stderr)
    return 0


def _train_here(args: argparse.Namespace, run: Any, *, resume: bool, lock: Any, out_existed: bool) -> Any:
    """Train in this process with progress on stderr; a new run refused before it started leaves nothing on disk."""
    from engine.runs.events import RunStarted
    from engine.training.run import train_run

    started: list[bool] = []
    printer = _progress_printer(sys.stderr.isatty() and not args.json)

    def emit(event) -> None:
        if isinstance(event, RunStarted):
            started.append(True)
        printer(event)

    try:
        return train_run(run, resume=resume, emit=emit, lock=lock, wait=bool(args.run_dir))
    except EngineError:
        if not (args.run_dir or args.resume) and not started:
            import shutil

            shutil.rmtree(run.path, ignore_errors=True)  # refused before training began: leave nothing
            if not out_existed:
                try:
                    os.rmdir(args.out)  # the folder this command made, if nothing else is in it now
                except OSError:
                    pass
        raise


def _report_training(args: argparse.Namespace, run: Any, result: Any) -> int:
    """The finished training in one line (or one JSON document); exit 1 unless it finished or was cancelled."""
    if args.json:
        _print_json({"run_id": run.run_id, "run_dir": str(run.path), "status": result.status,
                     "reason": result.reason, "best_val_acc": result.best_val_acc,
                     "best_epoch": result.best_epoch, "epochs": result.epochs_done,
                     "seconds": round(result.seconds, 2), "feature_cache": result.feature_cache})
    else:
        print(f"{run.path}  {result.summary()}")
    if result.status == "diverged":
        print(f"error: the run diverged: {result.reason}", file=sys.stderr)
    elif result.status == "failed":  # several processes: how they ended (engine/training/launch.py)
        print(f"error: {result.reason}", file=sys.stderr)
    return 0 if result.status in ("finished", "cancelled") else 1


RESUME_OPTIONS = frozenset({"--resume", "--epochs", "--out", "--background", "--json", "--cluster"})  # what a resume may say


def _take_device_lock(device: str, holder: str = "a training started from the command line"):
    """The device, now, for work in the foreground (engine/runs/lifecycle.py): refused when busy or when
    others wait in line for it (``--background`` joins the line instead)."""
    from engine.runs.lifecycle import take_the_device_now

    return take_the_device_now(device, holder)


def check_runs_folder(out: str) -> None:
    """``--out`` must be a folder (or not exist yet): never a file, never empty."""
    from pathlib import Path

    if not str(out).strip():
        raise EngineError("--out must name a folder for the runs.")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise EngineError(f"--out {out} is a file, not a folder for runs.")


def cmd_compare(args: argparse.Namespace) -> int:
    from engine.freeze.plan import FreezePlan
    from engine.lab.compare import (
        comparison_table,
        create_comparison,
        demo_config,
        demo_plans,
        group_runs,
    )
    from engine.runs.background import start_group_background
    from engine.training.run import train_run

    if args.group:  # worker mode: train the group's unfinished runs in order
        runs = group_runs(args.out, args.group)
        if not runs:
            raise EngineError(f"No comparison '{args.group}' in {args.out}.")
    else:
        base = demo_config()
        base = _base_config_from_args(base, args)
        plans = demo_plans() if not args.strategies else {
            s: FreezePlan.parse(s, head_lr=1e-2 if s.startswith("feature") else 2e-3, backbone_lr_ratio=1.0)
            for s in _split(args.strategies)}
        runs = create_comparison(args.out, base, plans, owner=None if args.background else os.getpid())
        if args.background:
            pid = start_group_background(runs, args.out)
            group = runs[0].config()["group"]
            _print_json({"group": group, "runs": [r.run_id for r in runs], "pid": pid}) if args.json else print(group)
            return 0
    from engine.runs.process import process_start

    for run in runs:  # this process owns the queue: a run waiting its turn is not mistaken for a dead one
        if run.status().active:
            run.write_status(pid=os.getpid(), pid_start=process_start(os.getpid()))
    try:
        for run in runs:
            state = run.status().state
            if state == "finished":
                continue
            train_run(run, resume=run.checkpoint("last").is_file(), wait=bool(args.group),
                      emit=_progress_printer(sys.stderr.isatty() and not args.json))
            if run.status().state == "cancelled":
                break
    finally:  # stopped, cancelled or failed: the runs still waiting their turn end too, not as "interrupted"
        for run in runs:
            status = run.status()
            if status.state == "queued" and status.pid == os.getpid():
                run.write_status(state="cancelled", reason="the comparison stopped before its turn",
                                 queue_position=None, finished_at=time.time())
    rows = comparison_table(runs)
    if args.json:
        _print_json({"group": runs[0].config().get("group"), "runs": rows})
    else:
        for row in rows:
            print(f"{row['strategy']:<22} best val acc {row['best_val_acc']}  train {row['train_time_s']}s  "
                  f"trainable {row['trainable_params']}")
    return 0


def cmd_race(args: argparse.Namespace) -> int:
    """Race freeze plans under a wall-clock budget (engine/lab/race.py); prints the leaderboard."""
    from engine.lab.race_estimate import check_budget, estimate_race
    from engine.lab.race_plans import budget_value, parse_plans
    from engine.lab.race_process import start_race_background, train_race
    from engine.lab.race_registry import create_race, race_runs

    check_runs_folder(args.out)
    lock = None
    if args.group:  # worker mode: the app's background process
        runs = race_runs(args.out, args.group)
        if not runs:
            raise EngineError(f"No race '{args.group}' in {args.out}.")
    else:
        plans = parse_plans(args.plans)
        budget_value(args.budget)  # a budget that is no number of seconds, before the probe of the set-up
        from engine.config import TrainConfig

        base = TrainConfig(model=args.model, weights=args.weights, data=args.data, image_size=args.image_size,
                           batch_size=args.batch_size, max_per_class=args.max_per_class, seed=args.seed,
                           split_seed=args.seed, memory_budget=args.memory_budget, micro_batch=args.micro_batch,
                           device=args.device)
        base.check_hosted()
        estimate = estimate_race(base, plans)  # a budget the set-up eats is refused before anything exists
        check_budget(args.budget, len(plans), args.eta, estimate)
        if not args.background:
            # a busy device refuses before any run folder exists
            lock = _take_device_lock(base.device, holder="a race started from the command line")
        runs = create_race(args.out, base, plans, args.budget, eta=args.eta,
                           owner=None if args.background else os.getpid(), estimate=estimate)
        if args.background:
            pid = start_race_background(runs, args.out)
            group = runs[0].config()["group"]
            _print_json({"group": group, "runs": [r.run_id for r in runs], "pid": pid}) if args.json else print(group)
            return 0
    say = (lambda line: print(line, file=sys.stderr)) if not args.json else (lambda _line: None)
    try:
        result = train_race(runs, lock=lock, wait=bool(args.group), say=say)
    except EngineError:
        if not args.group and not any(r.metrics() for r in runs):  # refused before any step: leave nothing
            import shutil

            for run in runs:
                shutil.rmtree(run.path, ignore_errors=True)
        raise
    if args.json:
        _print_json(result.to_dict())
        return 0
    print(f"race {result.group}: {result.status} in {result.seconds:.1f} s of a {result.budget_s:g} s budget "
          f"(set-up {result.setup_s:.1f} s)")
    for row in result.leaderboard:
        acc = f"{row['best_val_acc']:.4f}" if row["best_val_acc"] is not None else "-"
        out = "winner" if row["winner"] else (f"out after rung {row['out_after_rung']}" if row["out_after_rung"]
                                              else row["state"])
        print(f"{row['place'] or '-':>2}. {row['strategy']:<20} best val acc {acc}  {row['epochs']} epochs  "
              f"{row['train_s'] or 0:.1f} s  {out:<18} {row['run_id']}")
        if not row["winner"] and row["state"] != "finished" and row["reason"]:
            print(f"    {row['reason']}")
    if result.reason:
        print(result.reason)
    return 0


def _base_config_from_args(base, args: argparse.Namespace):
    from dataclasses import replace

    return replace(base, data=args.data, epochs=args.epochs, image_size=args.image_size, model=args.model,
                   weights=args.weights, max_per_class=args.max_per_class, batch_size=args.batch_size,
                   memory_budget=args.memory_budget, micro_batch=args.micro_batch)


DATA_ARGS = {"mislabeled": ("RUN",), "suggest": ("RUN",), "relabel": ("DATA", "IMAGE", "CLASS"), "exclude": ("DATA", "IMAGE"),
             "restore": ("DATA", "IMAGE"), "undo": ("DATA",), "overrides": ("DATA",)}


def cmd_data(args: argparse.Namespace) -> int:
    """Cleaning the data from the evidence: the possibly mislabelled images of a run, and decisions about
    single images kept in the dataset's overrides file (engine.data.overrides); files are never touched."""
    from engine.data import decisions
    from engine.data import overrides as ov

    need = DATA_ARGS[args.action]
    if len(args.items) != len(need):
        raise EngineError(f"data {args.action} takes {' '.join(need)}; got {len(args.items)} argument(s).")
    if args.action == "mislabeled":
        from engine.lab.mislabeled import rank_mislabeled
        from engine.runs.store import open_run

        check_runs_folder(args.out)
        ranking = rank_mislabeled(open_run(args.out, args.items[0]), kind=args.checkpoint, top=args.top)
        if args.json:
            _print_json(ranking.to_dict())
            return 0
        print(f"{ranking.run_id} ({ranking.checkpoint}): the {len(ranking.suspects)} highest-loss of "
              f"{ranking.images} train and val images")
        for s in ranking.suspects:
            print(f"{s.loss:7.3f}  {s.split:<5} {s.image:<40} given {s.given}, predicted {s.predicted} "
                  f"({s.probability:.0%})")
        return 0
    if args.action == "suggest":
        return _data_suggest(args)
    if args.pool is not None:
        raise EngineError("--pool is for data suggest only.")
    data = args.items[0]
    if args.action in ("relabel", "exclude", "restore"):
        decision = decisions.decide(data, args.items[1], args.action, args.items[2] if args.action == "relabel" else None)
        result: dict[str, Any] = {"decision": decision.to_dict()}
        line = f"{decision.line()}: applies to the next training and data report"
    elif args.action == "undo":
        undone = decisions.undo(data)
        result = {"undone": undone.to_dict() if undone else None}
        line = f"undone: {undone.line()}" if undone else "nothing to undo: no decisions"
    else:
        current = decisions.current(data)
        state = current.state()
        result = {"file": str(ov.overrides_path(data)), **current.to_dict(),
                  "relabel": {k: d.label for k, d in state.items() if d.action == "relabel"},
                  "exclude": [k for k, d in state.items() if d.action == "exclude"]}
        if not args.json:
            for d in current.decisions:
                print(f"{d.at or '-':<21} {d.line()}")
        line = (f"{len(result['relabel'])} relabelled, {len(result['exclude'])} excluded "
                f"({len(current.decisions)} decisions in {ov.overrides_path(data).name})")
    if args.json:
        _print_json(result)
    else:
        print(line)
    return 0


def _data_suggest(args: argparse.Namespace) -> int:
    """The unlabelled images of ``--pool`` the run would learn most from (engine.lab.active)."""
    from engine.lab.active import DEFAULT_DIVERSITY, DEFAULT_SCORE, pool_files, suggest_labels
    from engine.runs.store import open_run

    if not args.pool:
        raise EngineError("data suggest needs --pool FOLDER: the folder of unlabelled images to choose from.")
    check_runs_folder(args.out)
    run = open_run(args.out, args.items[0])
    report = suggest_labels(run, pool_files(args.pool), top=args.top, score=args.score or DEFAULT_SCORE,
                            diversity=DEFAULT_DIVERSITY if args.diversity is None else args.diversity,
                            kind=args.checkpoint)
    if args.json:
        _print_json([{"path": s.path, "predicted": s.predicted, "score": s.score, "probability": s.probability,
                      "runner_up": s.runner_up, **({} if s.unknown is None else {"unknown": s.unknown})}
                     for s in report.suggestions])
    else:
        print(f"{report.run_id} ({report.checkpoint}): the {len(report.suggestions)} of {report.scored} images to "
              f"label next ({report.score} uncertainty, diversity {report.diversity:g})")
        for s in report.suggestions:
            print(f"{s.score:6.3f}  {s.path:<40} predicted {s.predicted} ({s.probability:.0%}), "
                  f"else {s.runner_up}" + ("  [looks like none of the classes]" if s.unknown else ""))
    if report.unreadable:  # said on stderr, so --json stays one document
        shown = "; ".join(f"{u['file']}: {u['reason']}" for u in report.unreadable[:5])
        more = f" and {len(report.unreadable) - 5} more" if len(report.unreadable) > 5 else ""
        print(f"skipped {len(report.unreadable)} file(s) of the pool: {shown}{more}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from engine.outputs.evaluate import evaluate_run
    from engine.runs.store import open_run

    check_runs_folder(args.out)
    result = evaluate_run(open_run(args.out, args.run), kind=args.checkpoint, split=args.split, tta=args.tta)
    if args.json:
        _print_json(result.to_dict())
    else:
        scores = result.to_dict()
        print(f"{result.run_id} ({args.checkpoint}): {args.split} acc {scores[args.split + '_acc']:.4f}, "
              f"loss {scores[args.split + '_loss']:.4f} on {scores[args.split + '_images']} images"
              + (" with TTA" if result.tta else ""))
        if result.tta:
            print(result.tta.line())
        for name, acc in result.per_class_acc.items():
            print(f"  {name:<20} {acc:.3f}")
        if result.changed:
            print(f"note: {result.changed}", file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from engine.outputs.calibration import calibrate_run, describe_calibration
    from engine.runs.store import open_run

    check_runs_folder(args.out)
    run = open_run(args.out, args.run)
    record = calibrate_run(run)
    if args.json:
        _print_json({"run_id": run.run_id, "calibration": record})
    else:
        print(f"{run.run_id}: {describe_calibration(record)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from engine.runs.store import describe_run, list_runs

    check_runs_folder(args.out)
    if args.action == "cancel":
        return _runs_cancel(args)
    if args.action != "list" or args.target:
        return _runs_bundle(args)
    rows = [describe_run(r).to_dict() for r in list_runs(args.out)]
    if args.json:
        _print_json(rows)
        return 0
    for row in rows:
        acc = f"{row['best_val_acc']:.4f}" if isinstance(row["best_val_acc"], (int, float)) else "-"
        note = f"  ({row['reason']})" if row["reason"] and row["state"] not in ("running", "finished") else ""
        print(f"{row['run_id']:<32} {row['state']:<12} {str(row['model']):<32} epochs {row['epochs']:<7} "
              f"best {acc}{note}")
    print(f"{len(rows)} runs in {args.out}", file=sys.stderr)
    return 0


def _runs_cancel(args: argparse.Namespace) -> int:
    """``runs cancel RUN``: stop a training, here or on a Ray cluster (its job is stopped), and wait until it
    has ended: the process that trains it stops at its next step. A cluster run whose follower is gone (the
    app restarted) is stopped from here, and what its job hands back is read back first."""
    from engine.runs.background import request_cancel
    from engine.runs.store import open_run

    if not args.target:
        raise EngineError("use `runs cancel RUN`: the run's id or folder.")
    run = open_run(args.out, args.target)
    status = run.status()
    raw = _recorded_state(run)
    if status.on_cluster and status.state == "interrupted" and raw in ("queued", "running"):
        from engine.cluster.submit import cancel_run

        state = cancel_run(run)
    elif not status.active:
        print(f"run {run.run_id} is not training ({status.state}): nothing to cancel", file=sys.stderr)
        return 0
    else:
        request_cancel(run)
        state = _wait_until_ended(run, args.wait)
    print(f"run {run.run_id}: {state}" + ("" if state in ("cancelled", "finished", "failed") else
                                         f" (asked to stop {args.wait:g} s ago; it stops at its next step)"))
    return 0


def _recorded_state(run: Any) -> str:
    """The state status.json records, before the liveness check turns a dead process's run interrupted."""
    from engine.core.files import read_json
    from engine.runs.status import RunStatus

    return RunStatus.from_dict(read_json(run.status_path, {})).state


def _wait_until_ended(run: Any, wait_s: float) -> str:
    """The run's state once it has left the active states, or after ``wait_s``: a cancel is taken at the
    trainer's next step (a cluster job's within Ray's stop grace), so the caller can say how it ended."""
    import time

    deadline = time.monotonic() + wait_s
    status = run.status()
    while status.active and time.monotonic() < deadline:
        time.sleep(0.5)
        status = run.status()
    return status.state


def _runs_bundle(args: argparse.Namespace) -> int:
    """``runs export RUN -o FILE.zip`` / ``runs import FILE.zip``: a run as one file, for another machine."""
    from pathlib import Path

    from engine.runs.bundle import export_bundle_file, import_bundle

    if args.action == "list" or not args.target:
        raise EngineError("use `runs` to list, `runs export RUN -o FILE.zip` or `runs import FILE.zip`.")
    if args.action == "import":
        run = import_bundle(Path(args.target), args.out)
        status = run.status()
        if args.json:
            _print_json({"run_id": run.run_id, "run_dir": str(run.path), "state": status.state,
                         "imported_from": status.imported_from})
        else:
            print(run.run_id)
            print(f"imported {Path(args.target).name} as run {run.run_id} in {args.out}", file=sys.stderr)
        return 0
    from engine.outputs.code import script_for_run
    from engine.runs.store import open_run

    run = open_run(args.out, args.target)
    target = Path(args.output or f"{run.run_id}.zip")
    manifest = export_bundle_file(run, target, script_for=script_for_run)
    size = target.stat().st_size
    if args.json:
        _print_json({"run_id": run.run_id, "path": str(target), "bytes": size, "files": sorted(manifest["files"])})
    else:
        print(target)
        print(f"wrote {target.name} ({size / 1e6:.1f} MB): run {run.run_id}, import it with "
              f"`python -m engine runs import {target.name}`", file=sys.stderr)
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from engine.lab.feature_map import model_map, run_maps
    from engine.models.registry import resolve

    try:
        resolve(args.source)
        is_model = True
    except EngineError:
        if ":" in args.source:  # a run id never has one: an unknown model, said as such
            raise
        is_model = False
    if is_model:
        if not args.data:
            raise EngineError("a model needs --data (digits, lfw or a folder) to map.")
        maps = [model_map(args.source, args.data, weights=args.weights, image_size=args.image_size, method=args.method,
                          k=args.k, max_per_class=args.max_per_class)]
    else:
        from engine.runs.store import open_run

        maps = run_maps(str(open_run(args.out, args.source).path), method=args.method, k=args.k)
    if args.json:
        _print_json([m.to_dict() for m in maps])
        return 0
    for m in maps:
        axes = f"; PCA axes explain {100 * sum(m.explained):.0f}% of the variance" if m.explained else ""
        lowered = f" (k lowered from {args.k}: the smallest class has {m.k + 1} images)" if m.k < args.k else ""
        print(f"{m.model}: {len(m.points)} images, {m.dims} features, {m.k}-NN accuracy {m.knn_acc:.3f}{lowered}{axes}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.config import TrainConfig
    from engine.core.files import read_json
    from engine.lab.lr_find import SweepJob, lr_find, run_sweep_job

    if args.config:
        data = read_json(Path(args.config), None)
        if not isinstance(data, dict):
            raise EngineError(f"{args.config} is not a readable config.json.")
        config = TrainConfig.from_dict(data)
    else:
        config = _config_from_args(args)
    if args.save:
        sweep = run_sweep_job(config, SweepJob(args.save), steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
    else:
        live = sys.stderr.isatty() and not args.json

        def progress(step: int, lr: float, loss: float) -> None:
            if live:
                sys.stderr.write(f"\rstep {step}/{args.steps}: lr {lr:.2e}, loss {loss:.4f} ")

        sweep = lr_find(config, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, on_point=progress)
        if live:
            sys.stderr.write("\n")
    if args.json:
        _print_json(sweep.to_dict())
        return 0
    every = max(1, len(sweep.lrs) // 12)
    for lr, loss, smooth in list(zip(sweep.lrs, sweep.losses, sweep.smoothed))[::every]:
        print(f"lr {lr:10.2e}   loss {loss:8.4f}   smoothed {smooth:8.4f}")
    print(f"ended: {sweep.ended}")
    if sweep.suggestion is None:
        print("no suggestion: the loss never fell; try a wider range (--start-lr, --end-lr) or more --steps")
    else:
        print(f"suggested head LR: {sweep.suggestion:.2e} ({sweep.rule}); minimum/10: {sweep.min_over_10:.2e}; "
              f"the plan's was {sweep.head_lr:g}")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    """The dataset builder from a terminal: the same folders, checks and refusals as the browser's."""
    from pathlib import Path

    from engine.data.builder import BuiltDataset, built_datasets

    root = Path(args.root)
    if args.action == "list":
        names = built_datasets(root)
        if args.json:
            _print_json(names)
        else:
            print("\n".join(names) or "no built datasets", file=sys.stdout if names else sys.stderr)
        return 0
    need = {"create": 0, "show": 0, "add-class": 1, "add": 2, "remove": 2, "rename": 2, "delete": 1}[args.action]
    if len(args.items) < need:
        raise EngineError(f"dataset {args.action} needs {need} more argument(s) after the dataset name.")
    if args.action == "create":
        ds = BuiltDataset.create(args.name, root)
        print(ds.root)
        return 0
    ds = BuiltDataset.open(args.name, root)
    items = args.items
    if args.action == "add-class":
        print(f"class '{ds.add_class(items[0])}' added to {ds.name}")
    elif args.action == "add":  # add NAME CLASS FILE...: the class is made when new
        if items[0] not in ds.classes():
            ds.add_class(items[0])
        result = ds.add_files(items[0], map(Path, items[1:]))
        for shown, reason in result.refused:
            print(f"refused {shown}: {reason}", file=sys.stderr)
        print(f"{items[0]}: {result.summary()}")
        return 0 if result.added or result.already else 2
    elif args.action == "remove":
        ds.remove_image(items[0], items[1])
        print(f"removed {items[1]} from class '{items[0]}'")
    elif args.action == "rename":
        print(f"class '{items[0]}' is now '{ds.rename_class(items[0], items[1])}'")
    elif args.action == "delete":
        print(f"deleted class '{items[0]}' ({ds.delete_class(items[0])} images)")
    classes = ds.classes()
    if args.json:
        _print_json({"dataset": ds.name, "path": str(ds.root), "classes": classes})
    elif args.action == "show":
        for name, files in classes.items():
            print(f"{name:<24} {len(files)} images")
    return 0


def cmd_augment_preview(args: argparse.Namespace) -> int:
    """``augment-preview``: one training image of --data through --augment SPEC, n times, as a PNG grid
    (the Training page's preview)."""
    from pathlib import Path

    from engine.core.files import check_output_file
    from engine.data.augment import parse_augment
    from engine.data.augment_preview import augment_preview, preview_images

    spec = parse_augment(args.augment)  # a bad SPEC is refused before the data is read
    target = Path(args.output)
    if target.suffix.lower() != ".png":
        raise EngineError(f"-o {args.output}: the grid is a PNG; name a .png file, e.g. grid.png.")
    if not target.parent.is_dir():
        raise EngineError(f"-o {args.output}: the folder {target.parent} does not exist.")
    check_output_file(target, Path(args.out))
    images = preview_images(args.data, split_seed=args.seed)
    grid = augment_preview(images, spec, n=args.n, seed=args.seed, image_size=args.image_size)
    grid.save(target)
    if args.json:
        _print_json({"output": str(target), "augment": spec.text(), "size": list(grid.size), "n": args.n})
    else:
        print(f"wrote {target}: {args.n} versions of one training image of {args.data} with "
              f"'{spec.text() or 'no augmentation'}'", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.runs.store import open_run

    check_runs_folder(args.out)
    run = open_run(args.out, args.run)
    if args.format != "script":
        return _export_model(args, run)
    if args.quantize:
        raise EngineError(f"--quantize {args.quantize} applies to --format onnx only.")
    from engine.outputs.code import script_for_run

    text = script_for_run(run)
    if not args.output or args.output == "-":
        sys.stdout.write(text)
        return 0
    target = Path(args.output)
    if target.is_dir():
        raise EngineError(f"-o {args.output} is a folder; name the file to write, e.g. {target / 'train.py'}.")
    from engine.core.files import check_output_file

    check_output_file(target, run.path.parent)
    target.write_text(text)
    print(f"wrote {target}: `python {target.name}` reproduces run {run.run_id} (plain torch + timm)",
          file=sys.stderr)
    return 0


def _export_model(args: argparse.Namespace, run: Any) -> int:
    """onnx | torchscript | safetensors: the run's best model as files, checked against PyTorch."""
    from pathlib import Path

    from engine.outputs.run_export import export_run

    report = export_run(run, args.format, args.output, args.quantize)
    parity = report.get("parity")
    if args.json:
        _print_json(report)
    else:
        for path in report["files"]:
            print(path)
        first = Path(report["files"][0])
        if parity:
            verdict = "matches" if parity["ok"] else "does NOT match"
            print(f"wrote {first.name} ({first.stat().st_size / 1e6:.1f} MB): {verdict} PyTorch (max |logit "
                  f"difference| {parity['max_abs_diff']:.1e}, tolerance {parity['tolerance']:.0e})", file=sys.stderr)
        else:
            print(f"wrote {first.name} + {Path(report['files'][1]).name} (the model spec: architecture, classes, "
                  "preprocessing): model_from_spec(ModelSpec.from_dict(json['spec']), load_file(weights)) rebuilds "
                  "the run's model", file=sys.stderr)
        if args.format == "onnx":
            print(f"class names and preprocessing are in its metadata; `python predict_onnx.py --model {first.name} "
                  "IMAGE...` predicts with onnxruntime + numpy + pillow (no torch)", file=sys.stderr)
        q = report.get("int8")
        if q:
            print(f"{q['method']}: {Path(q['path']).name} ({q['bytes_int8'] / 1e6:.1f} MB, float32 "
                  f"{q['bytes_float32'] / 1e6:.1f} MB); validation accuracy {q['val_acc_float32']:.4f} -> {q['val_acc_int8']:.4f} "
                  f"({100 * q['val_acc_change']:+.2f} points) on {q['images']} images (onnxruntime), "
                  f"same top-1 as float32 on {100 * q['top1_agreement']:.1f}%", file=sys.stderr)
    if parity and not parity["ok"]:
        print(f"error: the {args.format} export does not match PyTorch (max |logit difference| "
              f"{parity['max_abs_diff']:.1e} > {parity['tolerance']:.0e}); the file is written but not trustworthy",
              file=sys.stderr)
        return 1
    return 0


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL, --weights (none: structure does not depend on weights), --num-classes, --json."""
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--weights", default="none",
                   help="packaged|hub|none|PATH (shapes and counts do not depend on weights)")
    p.add_argument("--num-classes", type=_at_least(2, 100_000), help="replace the head with one of this size")
    p.add_argument("--json", action="store_true")


def _at_least(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high], refused in one line otherwise.

    (Training settings are checked by TrainConfig itself; these guard the other commands.)
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad value is one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list/search the model catalog (timm + torchvision)")
    p.add_argument("--filter", default="", help="substring of the name or family")
    p.add_argument("--source", choices=["timm", "torchvision"])
    p.add_argument("--packaged", action="store_true", help="only models with offline weights")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)


def _add_summary_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="module tree, parameter counts and output shapes")
    _add_model_args(p)
    p.add_argument("--input-size", type=_at_least(8, 4096), help="square input size (default: the model's)")
    p.add_argument("--depth", type=_at_least(0, 1000), help="only list modules up to this depth")
    p.set_defaults(func=cmd_summary)


def _add_freeze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("freeze", help="apply a freeze plan and report what trains")
    _add_model_args(p)
    p.add_argument("--strategy", default="feature-extraction",
                   help="feature-extraction | full | last-n:N | custom")
    p.add_argument("--stages", help="custom: comma-separated stage names that train")
    p.add_argument("--patterns", help="custom: comma-separated globs of parameter names that train")
    p.add_argument("--bn", default="freeze", choices=["freeze", "adapt", "train"],
                   help="BatchNorm in frozen stages")
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--backbone-lr-ratio", type=float, default=0.1)
    p.add_argument("--stage-lr-decay", type=float, default=1.0)
    p.set_defaults(func=cmd_freeze)


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-k classes for images")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--weights", default="packaged", help="packaged|hub|none|PATH")
    p.add_argument("--top-k", type=_at_least(1, 1000), default=5)
    p.add_argument("--run", help="use a trained run's best checkpoint (id or path)")
    p.add_argument("--open-set", choices=("on", "off"), default="on", help="with --run: say when an image is none "
                   "of the run's classes (distance to the nearest training image above the run's threshold; "
                   "docs/open-set.md)")
    p.add_argument("--out", default=str(runs_root()), help="runs folder")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average the probabilities of "
                   "each image and its horizontal mirror (not for digits or text: they are not mirror-symmetric)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on images (a run directory records everything)")
    _add_recipe_args(p)
    p.add_argument("--out", default=str(runs_root()), help="runs folder")
    p.add_argument("--resume", help="continue a run (id or path) from its last checkpoint")
    p.add_argument("--background", action="store_true", help="start in a separate process and return")
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--resume-existing", dest="resume_flag", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=_at_least(1, 1024), default=1,
                   help="processes training together (DistributedDataParallel via torchrun): one per GPU, or a share "
                   "of the CPU cores; --batch-size is split among them (default: 1)")
    p.add_argument("--sync-bn", action="store_true", help="with --nproc: trainable BatchNorm normalises over all "
                   "processes' images (SyncBatchNorm; CUDA only)")
    p.add_argument("--_rank-worker", dest="rank_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cluster", help="train on a Ray cluster: its dashboard's address, http://HOST:8265 (default: "
                   "$WORKBENCH_CLUSTER); --nproc N becomes N Ray Train workers (docs/cluster.md)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)


def _add_lr_find_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lr-find", help="sweep the learning rate on a fresh copy of the model and suggest one "
                                       "(nothing is saved to a run)")
    _add_recipe_args(p)
    p.add_argument("--config", help="a run's config.json to take the recipe from (instead of the options above)")
    p.add_argument("--steps", type=_at_least(5, 10_000), default=100, help="optimizer steps in the sweep")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=1.0)
    p.add_argument("--save", help=argparse.SUPPRESS)  # the app's background job file
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lr_find)


def _add_features_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="the feature space the head sees: 2-D map and k-NN separability, for a "
                                        "pretrained model or a run (beside its pretrained backbone)")
    p.add_argument("source", help="a model name (timm:..., tv:...) or a run (id in --out, or folder)")
    p.add_argument("--data", help="model: digits | lfw | FOLDER (a run uses its own validation images)")
    p.add_argument("--weights", default="packaged", help="model: packaged|hub|none|PATH")
    p.add_argument("--image-size", type=_at_least(8, 4096))
    p.add_argument("--max-per-class", type=_at_least(1, 10_000), default=50, help="model: at most this many images per class before the 80/20 split; the map shows the "
                   "validation share (about a fifth of them)")
    p.add_argument("--method", default="pca", choices=["pca", "umap"])
    p.add_argument("--k", type=_at_least(1, 100), default=5, help="neighbours of the k-NN score")
    p.add_argument("--out", default=str(runs_root()), help="runs folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_features)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train several strategies on the same data, split and budget")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--weights", default="packaged")
    p.add_argument("--data", default="digits")
    p.add_argument("--strategies", help="comma-separated, e.g. feature-extraction,full,last-n:2 "
                                        "(default: feature extraction vs full fine-tune)")
    p.add_argument("--epochs", type=int, default=2)
    _add_batch_args(p)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--max-per-class", type=int)
    p.add_argument("--out", default=str(runs_root()), help="runs folder")
    p.add_argument("--background", action="store_true")
    p.add_argument("--group", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)


def _add_dataset_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="build a dataset image by image in the data folder (as the Training "
                                       "page's builder): create, add images to a class, remove, rename, delete")
    p.add_argument("action", choices=["list", "create", "show", "add-class", "add", "remove", "rename", "delete"],
                   help="list | create NAME | show NAME | add-class NAME CLASS | add NAME CLASS FILE... | "
                        "remove NAME CLASS FILE | rename NAME OLD NEW | delete NAME CLASS")
    p.add_argument("name", nargs="?", default="", help="the dataset (a folder in the data folder)")
    p.add_argument("items", nargs="*", help="class, files or new name, as the action needs")
    p.add_argument("--root", default=str(data_root()), help="data folder (default: the app's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dataset)


def _add_race_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("race", help="race freeze plans under a wall-clock budget (successive halving); the "
                                    "winner is a normal run")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--weights", default="packaged")
    p.add_argument("--data", default="digits")
    p.add_argument("--budget", type=float, default=120.0, help="seconds for the whole race (default 120)")
    p.add_argument("--plans", help="comma-separated, from fe,last-1,last-2,full,gradual (default: all five)")
    p.add_argument("--eta", type=_at_least(2, 10), default=2, help="each rung keeps the best 1/ETA of the plans, "
                   "rounded up (default 2: 5 -> 3 -> 2 -> 1; 3: 5 -> 2 -> 1, fewer and longer slices)")
    _add_batch_args(p)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--max-per-class", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(runs_root()), help="runs folder")
    p.add_argument("--background", action="store_true")
    p.add_argument("--group", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_race)


def _add_runs_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list the runs in a runs folder (damaged ones say why); export or import "
                                    "one as a bundle (.zip); cancel one (here or on its Ray cluster)")
    p.add_argument("action", nargs="?", default="list", choices=["list", "export", "import", "cancel"],
                   help="list (default) | export RUN -o FILE.zip | import FILE.zip | cancel RUN")
    p.add_argument("target", nargs="?", help="export, cancel: run id or folder; import: the bundle (.zip)")
    p.add_argument("--wait", type=float, default=120.0, help="cancel: seconds to wait for the run to end "
                   "(a cluster job stops within Ray's 30 s stop grace)")
    p.add_argument("-o", "--output", help="export: the bundle to write (default: RUN_ID.zip)")
    p.add_argument("--out", default=str(runs_root()), help="runs folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run's checkpoint on its validation (or held-out test) split")
    p.add_argument("run")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--split", default="val", choices=["val", "test"],
                   help="val (default): the split the run was validated on; test: its held-out test split")
    p.add_argument("--out", default=str(runs_root()), help="runs folder")
    p.add_argument("--tta", action="store_true", help="also with test-time augmentation (each image and its "
                   "horizontal mirror, probabilities averaged): accuracy and loss with and without, and the change")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


def _add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit a run's temperature on its validation split (temperature scaling; "
                                         "finished runs get it at the end): ECE before and after")
    p.add_argument("run", help="run id (in --out) or path of a run folder")
    p.add_argument("--out", default=str(runs_root()), help="runs folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="clean the data from the evidence: a run's possibly mislabelled images, and "
                                    "decisions about single images kept in the dataset's overrides file")
    p.add_argument("action", choices=list(DATA_ARGS),
                   help="; ".join(f"{a} {' '.join(n)}" for a, n in DATA_ARGS.items()))
    p.add_argument("items", nargs="*", help="the run, or the data (digits, lfw, a folder or a .zip) and its image "
                                            "(path inside the dataset, or digits[17]) and class")
    p.add_argument("--top", type=_at_least(1, 100_000), default=20, help="mislabeled, suggest: how many to list")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--out", default=str(runs_root()), help="runs folder (mislabeled, suggest)")
    p.add_argument("--pool", help="suggest: the folder of unlabelled images to choose from (sub-folders too)")
    p.add_argument("--score", choices=["margin", "entropy"],
                   help="suggest: the uncertainty (margin, the default: 1 - (p1 - p2); entropy: normalised)")
    p.add_argument("--diversity", type=float,
                   help="suggest: how much an image's similarity to those already listed counts against it "
                        "(0: uncertainty alone; default 0.5)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run as a standalone training script (plain torch + timm), or its best "
                                      "model as ONNX (+ predict_onnx.py), TorchScript or safetensors")
    p.add_argument("run", help="run id (in --out) or path of a run folder")
    p.add_argument("--format", default="script", choices=["script", "onnx", "torchscript", "safetensors"],
                   help="script (default): a Python file, no engine import | onnx: RUN.onnx with classes and "
                        "preprocessing in its metadata, and predict_onnx.py beside it | torchscript: RUN.pt | "
                        "safetensors: RUN.safetensors + RUN.json")
    p.add_argument("--quantize", choices=["int8", "int8-static"],
                   help="onnx: also write RUN.int8.onnx and report the validation accuracy of both (onnxruntime); "
                        "int8: dynamic quantisation, no data needed; int8-static: per-channel QDQ calibrated on 64 "
                        "training images (keeps CNN accuracy far better)")
    p.add_argument("-o", "--output", help="file to write (default: standard output for script, RUN_ID.onnx/.pt/"
                   ".safetensors otherwise)")
    p.add_argument("--out", default=str(runs_root()), help="runs folder")
    p.add_argument("--json", action="store_true", help="model formats: one JSON document on stdout")
    p.set_defaults(func=cmd_export)


def _add_augment_preview_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("augment-preview", help="write a grid of one training image augmented N times (what "
                                               "--augment SPEC does to the data), as the Training page shows it")
    p.add_argument("--data", default="digits", help="digits | lfw | FOLDER | ZIP")
    p.add_argument("--augment", nargs="?", const="default", default="default", metavar="SPEC",
                   help="the SPEC (default: default = crop:0.7); see docs/augmentation.md")
    p.add_argument("--image-size", type=_at_least(16, 1024), default=96, help="tile size in px (default 96)")
    p.add_argument("-n", type=_at_least(1, 64), default=8, help="augmented versions (default 8)")
    p.add_argument("--seed", type=_at_least(0, 2**32 - 1), default=0)
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.add_argument("--out", default=str(runs_root()), help=argparse.SUPPRESS)  # never written into
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_augment_preview)


# the order ``python -m engine --help`` lists the commands in
SUBCOMMANDS = (_add_models_parser, _add_summary_parser, _add_freeze_parser, _add_predict_parser, _add_train_parser,
               _add_lr_find_parser, _add_augment_preview_parser, _add_features_parser, _add_compare_parser,
               _add_dataset_parser, _add_race_parser,
               _add_runs_parser, _add_eval_parser, _add_calibrate_parser, _add_data_parser, _add_export_parser)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one sub-parser per command, in the order ``--help`` lists them."""
    parser = _Parser(prog="python -m engine", description="Transfer-learning workbench engine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    args.epochs_given = "--epochs" in args.given
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a path the user gave: missing, not allowed, full disk
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line here, the trace only when asked for
        if os.environ.get("WORKBENCH_DEBUG"):
            raise
        print(f"error: internal error ({type(exc).__name__}: {str(exc)[:200]}); run again with "
              "WORKBENCH_DEBUG=1 for the traceback", file=sys.stderr)
        return 1
