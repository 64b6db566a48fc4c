"""What a start would be refused for, checked before anything is written.

A run that fails in the background a second after Start leaves a failed run in everyone's list for a
mistake the settings already showed (one image per class, a plan that freezes everything, a dataset
over a shared server's caps). These checks read the data as a listing (no image is decoded: every
image is checked when the run starts) and build the model without weights, so they take about as long
as listing the folder.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

from engine.config import TrainConfig
from engine.core.errors import DataError, EngineError
from engine.core.hosting import hosted_limits, per_class_that_fits

if TYPE_CHECKING:
    from engine.data.imageset import ImageSet
    from engine.freeze.plan import FreezePlan


def check_split(train: list[int], val: list[int], test: list[int], max_per_class: int | None) -> None:
    """Every score, the early stop and a race's ranking read validation images: a split without any
    cannot train."""
    if val:
        return
    cap = f" (at most {max_per_class} per class)" if max_per_class else ""
    raise DataError(f"No validation images: split for training, the {len(train) + len(test)} images{cap} left none "
                    "to measure the run with, since each class keeps one to train on. Use at least 2 images per "
                    "class" + (" (raise --max-per-class)." if cap else "."))


def check_hosted_images(labels: list, used: int, config: TrainConfig) -> None:
    """On a shared server a run uses at most ``HostedLimits.images`` images: say which per-class cap fits."""
    limits = hosted_limits()
    if limits is None or used <= limits.images:
        return
    counts = list(Counter(labels).values())
    fits = per_class_that_fits(counts, limits.images)
    if config.max_per_class:
        fits = min(fits, config.max_per_class)
    raise DataError(f"This app runs on a shared server (hosted mode), where a run uses at most {limits.images:,} "
                    f"images; this one would use {used:,}. Set max images per class to {fits} "
                    f"(--max-per-class {fits}) or use a smaller dataset.")


def check_data(config: TrainConfig) -> ImageSet:
    """The data listed and checked as a run would read it, split included; returns the listing."""
    from engine.data.datasets import load_source, validate
    from engine.data.splits import split_all
    ds = load_source(config.data, verify=False)
    report = validate(ds)
    if not report.ok:
        raise DataError("The data cannot be trained on: " + " ".join(report.problems))
    train, val, test = split_all(ds, config)
    check_split(train, val, test, config.max_per_class)
    groups = list(zip(ds.splits, ds.labels)) if ds.splits is not None else ds.labels
    check_hosted_images(groups, len(train) + len(val) + len(test), config)
    return ds


def check_startable(config: TrainConfig, plans: dict[str, FreezePlan] | None = None) -> None:
    """Everything a start of ``config`` (or of one run per plan in ``plans``, as a comparison does) is
    refused for: the shared server's caps, the data and its split, and each plan against the model."""
    from engine.anatomy.stages import model_stages
    from engine.freeze.plan import apply_plan, build_optimizer
    from engine.models.factory import create_model

    config.check_hosted()
    ds = check_data(config)
    handle = create_model(config.model, weights="none", class_names=list(ds.class_names))
    stages = model_stages(handle.module, handle.spec.head)
    size = config.image_size or handle.spec.input_size[-1]
    config.check_hosted(image_size=size)
    for label, plan in (plans or {"": config.freeze_plan()}).items():
        planned = replace(config, plan=plan.to_dict())
        try:
            planned.validate_for_model(handle.module, stages, size)
            apply_plan(handle.module, stages, plan, epoch=planned.epochs - 1)
            build_optimizer(handle.module, stages, plan)  # refuses a plan that freezes every parameter
        except EngineError as exc:
            if not label:
                raise  # a ConfigError keeps its field: the page says it beside that setting
            raise EngineError(f"strategy {label}: {exc}") from exc
