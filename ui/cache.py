"""Cached engine calls: a rerun of a page never rebuilds a model or re-reads a dataset.

Models live in one size-bounded LRU (ui/model_cache.py; read-only, shared by every session, never
trained in place); derived data is ``st.cache_data`` (small values keyed by their inputs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from ui.model_cache import SizedLRU, model_cache_bytes

if TYPE_CHECKING:
    from engine.outputs.evaluate import EvaluationReport
    from engine.runs.store import RunDir


@st.cache_resource
def shared_models() -> SizedLRU:
    """The one model cache of this server process, bounded by size (ui/model_cache.py)."""
    return SizedLRU(model_cache_bytes())


def _cached(key: tuple, build, message: str):
    models = shared_models()
    if key in models:
        return models.get(key, build)
    with st.spinner(message):
        return models.get(key, build)


def load_model(name: str, weights: str, num_classes: int | None = None):
    """A read-only model shared by all sessions; training always builds its own copy."""
    from engine.models.factory import create_model

    return _cached(("model", name, weights, num_classes),
                   lambda: create_model(name, weights=weights, num_classes=num_classes), "Loading model...")


@st.cache_data(show_spinner=False)
def catalog_rows() -> list[dict[str, Any]]:
    from engine.models.catalog import catalog

    return [e.to_dict() for e in catalog()]


@st.cache_data(show_spinner="Tracing the model...", max_entries=16)
def model_summary(name: str, weights: str, num_classes: int | None, size: int) -> dict[str, Any]:
    from engine.anatomy.tree import summarize

    handle = load_model(name, weights, num_classes)
    data = summarize(handle.module, (3, size, size)).to_dict()
    data["spec"] = handle.spec.to_dict()
    return data


@st.cache_data(show_spinner=False, max_entries=32)
def freeze_preview(name: str, weights: str, num_classes: int | None, plan_json: str) -> dict[str, Any]:
    from engine.anatomy.stages import model_stages
    from engine.freeze.plan import FreezePlan, preview_plan

    handle = load_model(name, weights, num_classes)
    stages = model_stages(handle.module, handle.spec.head)
    return preview_plan(handle.module, stages, FreezePlan.from_dict(json.loads(plan_json))).to_dict()


@st.cache_data(show_spinner="Reading the dataset...", max_entries=8)
def dataset_overview(source: str, per_class: int = 6, stamp: tuple = ()) -> dict[str, Any]:
    """Counts, validation report (with the layout found and the images per given split) and a few
    thumbnails per class (small arrays, cache-friendly). ``stamp`` (engine.data.builder.source_stamp)
    is only part of the key: a folder that changed since (an image added, a class renamed) is read again."""
    import numpy as np

    from engine.core.errors import ImageError
    from engine.data.datasets import load_source, validate

    ds = load_source(source)
    report = validate(ds)
    thumbs: dict[str, list] = {c: [] for c in ds.class_names}
    skipped = list(report.skipped)
    for i, label in enumerate(ds.labels):
        name = ds.class_names[label]
        if len(thumbs[name]) < per_class:
            try:
                img = ds.image(i, target=96)  # decoded reduced (JPEG at up to 1/8), never full size
            except ImageError as exc:  # changed since it was checked: listed, the others still shown
                shown = getattr(ds.loaders[i], "name", ds.sources[i])  # the name inside the dataset
                skipped.append((shown, str(exc).removeprefix(f"{shown}: ")))
                continue
            img.thumbnail((96, 96))
            thumbs[name].append(np.asarray(img))
    return {"counts": report.counts, "problems": report.problems, "warnings": report.warnings,
            "skipped": skipped, "n_images": report.n_images, "thumbs": thumbs,
            "layout": report.layout_note, "split_counts": report.split_counts, "imbalance": report.imbalance}


@st.cache_data(show_spinner=False, max_entries=8)
def dataset_sample(source: str, per_class: int = 12, seed: int = 0, stamp: tuple = ()) -> tuple[list, list[int]]:
    """A small, seeded, per-class sample of images and labels (for the advisor's estimates); keyed by
    ``stamp`` (engine.data.stamp.source_stamp) too, so a relabel or an exclusion is sampled at once.

    Images come decoded reduced to a 256 px shortest side (what a 224 px model at crop 0.875 needs);
    one that became unreadable since the folder was checked is left out.
    """
    from engine.core.errors import ImageError
    from engine.data.datasets import load_source
    from engine.data.splits import subsample_per_class

    ds = load_source(source)
    images, labels = [], []
    for i in subsample_per_class(ds.labels, per_class, seed):
        try:
            images.append(ds.image(i, target=256))
        except ImageError:
            continue
        labels.append(ds.labels[i])
    return images, labels


def load_trained(run_path: str, mtime: float):
    """A run's best checkpoint; keyed by its mtime, so a newer best loads again."""
    from engine.runs.load import load_run_model

    return _cached(("run", run_path, mtime), lambda: load_run_model(run_path), "Loading the trained model...")


def open_set_rule(run: RunDir, num_classes: int):
    """A run's open-set rule (its bank of training features, a few MB) or None: the run has none
    (engine/runs/open_set.py). Read once per fit (keyed by the file's mtime), not on every rerun."""
    from engine.runs.open_set import OPEN_SET_FILE

    try:
        mtime = (run.path / OPEN_SET_FILE).stat().st_mtime
    except OSError:
        return None
    return _open_set_rule(str(run.path), mtime, num_classes)


@st.cache_resource(show_spinner=False, max_entries=8)
def _open_set_rule(run_path: str, mtime: float, num_classes: int):
    from engine.runs.open_set import run_open_set
    from engine.runs.store import RunDir

    return run_open_set(RunDir(Path(run_path)), num_classes)


@st.cache_data(show_spinner="Evaluating on the validation split...", max_entries=8)
def report_for(run_path: str, mtime: float, tta: bool = False, temperature: float | None = None) -> EvaluationReport:
    """A run's evaluation report, keyed by its best checkpoint's mtime (a newer best recomputes) and its
    calibration's temperature (a run calibrated since shows calibrated confidences); with
    ``tta`` of the predictions averaged with the mirror images, and both accuracies side by side."""
    from engine.core.paths import runs_root
    from engine.outputs.evaluate import evaluation_report
    from engine.runs.store import open_run

    return evaluation_report(open_run(runs_root(), run_path), tta=tta)


@st.cache_resource(show_spinner="Reading the dataset...", max_entries=2, ttl=600)
def val_dataset(data: str, work_dir: str | None = None, stamp: tuple = ()):
    """The run's data, read (and every file checked) once, not once per thumbnail. With the run's folder
    as ``work_dir``: as that run trained on it (its own decisions about single images, so a report's
    indices name the images they named then, whatever was decided since; engine.data.overrides).
    Without one, the data as it stands: ``stamp`` (engine.data.stamp.source_stamp) keys it."""
    from engine.data.datasets import load_source

    return load_source(data, work_dir=work_dir)


@st.cache_data(show_spinner=False, max_entries=256)
def val_image(data: str, index: int, target: int, thumb: int | None = None, work_dir: str | None = None,
              stamp: tuple = ()):
    """One validation image decoded reduced to ``target`` (the model's need, or a thumbnail's); raises
    ImageError when the file became unreadable since training. ``stamp``: as for val_dataset."""
    image = val_dataset(data, work_dir, stamp).image(index, target=target)
    if thumb:
        image.thumbnail((thumb, thumb))
    return image


@st.cache_data(show_spinner="Scoring every training and validation image of the run...", max_entries=8)
def mislabeled_for(run_path: str, mtime: float, top: int = 18) -> dict:
    """A run's possibly mislabelled images (engine.lab.mislabeled), keyed by its best checkpoint's mtime.
    Not by the overrides file: the ranking reads the data as the run trained on it; the decisions taken
    since are shown over it, fresh at every rerun."""
    from engine.core.paths import runs_root
    from engine.lab.mislabeled import rank_mislabeled
    from engine.runs.store import open_run

    return rank_mislabeled(open_run(runs_root(), run_path), top=top).to_dict()


@st.cache_data(show_spinner=False, max_entries=64)
def script_problem(run_path: str, config_json: str) -> str | None:
    """Why a run gets no standalone script (its data's layout), or None; scanned once per run and config."""
    import json

    from engine.config import TrainConfig
    from engine.outputs.code import script_unsupported

    return script_unsupported(TrainConfig.from_dict(json.loads(config_json)), run_path)


@st.cache_data(show_spinner="Embedding the images and projecting them...", max_entries=8)
def model_feature_map(model: str, weights: str, data: str, image_size: int, method: str, k: int, max_images: int,
                      stamp: tuple = ()):
    """A pretrained model's feature-space map of a dataset's validation images (engine.lab.feature_map),
    keyed by every input: a rerun, or a change of page and back, never embeds again; a change to the
    data (``stamp``, engine.data.stamp.source_stamp: an image added, a relabel, an exclusion) does."""
    from engine.lab.feature_map import model_map

    return model_map(model, data, weights=weights, image_size=image_size, method=method, k=k, max_per_class=None,
                     max_images=max_images)


@st.cache_data(show_spinner="Embedding the validation images with both models...", max_entries=8)
def run_feature_maps(run_path: str, mtime: float, method: str, k: int, max_images: int) -> list:
    """A run's map beside its pretrained backbone's, keyed by the best checkpoint's mtime too."""
    from engine.lab.feature_map import run_maps

    return run_maps(run_path, method=method, k=k, max_images=max_images)


@st.cache_resource(show_spinner=False)
def umap_problem() -> str | None:
    """Why UMAP cannot be offered (umap-learn missing or broken), or None; imported once per process."""
    try:
        import umap  # noqa: F401 - optional: umap-learn
    except ImportError:
        return "UMAP needs the umap-learn package, which is not installed here (pip install umap-learn); PCA works."
    except Exception as exc:  # noqa: BLE001 - a broken install (numba, llvmlite) is as good as none
        return f"umap-learn is installed but does not import ({exc.__class__.__name__}); PCA works without it."
    return None


@st.cache_data(show_spinner="Reading a training image...", max_entries=8)
def augment_images(source: str, stamp: tuple = ()) -> list:
    """The preview's training image and its mixup partner (engine.data.augment_preview.preview_images),
    read once per dataset version: moving an augmentation control never re-reads the data."""
    from engine.data.augment_preview import preview_images

    return preview_images(source)


@st.cache_data(show_spinner=False, max_entries=64)
def augment_grid(source: str, spec: str, image_size: int, seed: int, stamp: tuple = ()):
    """The grid of 8 augmented versions (engine.data.augment_preview) as an array; a control moved back
    to an earlier value shows its grid again without drawing it."""
    import numpy as np

    from engine.data.augment_preview import augment_preview

    return np.asarray(augment_preview(augment_images(source, stamp), spec, n=8, seed=seed, image_size=image_size))
