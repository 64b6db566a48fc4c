"""Session keys, cached engine calls and the sidebar shared by every page.

Pages stay thin: widgets -> one engine call -> render. Heavy objects are cached per process
(``st.cache_resource``: models, read-only and shared by every session, never trained in place);
derived data is cached by value (``st.cache_data``). Session state holds only small values.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import streamlit as st

from engine.errors import EngineError
from engine.registry import DEFAULT_MODEL

# session keys: one place, so every page reads the same state
ACTIVE_MODEL = "active_model"  # qualified model name
ACTIVE_WEIGHTS = "active_weights"  # packaged | hub | none | path of an uploaded weights file
ACTIVE_CLASSES = "active_num_classes"  # None: keep the pretrained head
PLAN = "freeze_plan"  # FreezePlan.to_dict()
SELECTED_RUN = "selected_run"  # run id


def require_router() -> None:
    """Run this page through streamlit_app.py's navigation, even on a server's very first request.

    Streamlit decides at start-up whether an app uses the old ``pages/`` folder convention (it
    sees our pages/ folder) and keeps thinking so until ``st.navigation`` runs once. A first
    request straight to e.g. /compare would run the page file alone: no router, no sidebar.
    This flips the flag and reruns, so the entry point routes to the same page.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def init_state() -> None:
    from engine.freeze import FreezePlan

    st.session_state.setdefault(ACTIVE_MODEL, DEFAULT_MODEL)
    st.session_state.setdefault(ACTIVE_WEIGHTS, "packaged")
    st.session_state.setdefault(ACTIVE_CLASSES, None)
    st.session_state.setdefault(PLAN, FreezePlan.full(head_lr=2e-3, backbone_lr_ratio=1.0).to_dict())
    st.session_state.setdefault(SELECTED_RUN, None)


def active() -> tuple[str, str, int | None]:
    init_state()
    return st.session_state[ACTIVE_MODEL], st.session_state[ACTIVE_WEIGHTS], st.session_state[ACTIVE_CLASSES]


def weights_label(weights: str) -> str:
    return f"file: {Path(weights).name}" if weights not in ("packaged", "hub", "none") else weights


# ------------------------------------------------------------------ cached engine calls
@st.cache_resource(max_entries=6, show_spinner="Loading model...")
def load_model(name: str, weights: str, num_classes: int | None = None):
    """A read-only model shared by all sessions; training always builds its own copy."""
    from engine.models import create_model

    return create_model(name, weights=weights, num_classes=num_classes)


@st.cache_data(show_spinner=False)
def catalog_rows() -> list[dict[str, Any]]:
    from engine.catalog import catalog

    return [e.to_dict() for e in catalog()]


@st.cache_data(show_spinner="Tracing the model...", max_entries=16)
def model_summary(name: str, weights: str, num_classes: int | None, size: int) -> dict[str, Any]:
    from engine.anatomy import summarize

    handle = load_model(name, weights, num_classes)
    data = summarize(handle.module, (3, size, size)).to_dict()
    data["spec"] = handle.spec.to_dict()
    return data


@st.cache_data(show_spinner=False, max_entries=32)
def freeze_preview(name: str, weights: str, num_classes: int | None, plan_json: str) -> dict[str, Any]:
    from engine.freeze import FreezePlan, preview_plan
    from engine.stages import model_stages

    handle = load_model(name, weights, num_classes)
    stages = model_stages(handle.module, handle.spec.head)
    return preview_plan(handle.module, stages, FreezePlan.from_dict(json.loads(plan_json))).to_dict()


@st.cache_data(show_spinner="Reading the dataset...", max_entries=8)
def dataset_overview(source: str, per_class: int = 6) -> dict[str, Any]:
    """Counts, validation report and a few thumbnails per class (small arrays, cache-friendly)."""
    import numpy as np

    from engine.data import load_source, validate

    from engine.errors import ImageError

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
            "skipped": skipped, "n_images": report.n_images, "thumbs": thumbs}


@st.cache_data(show_spinner=False, max_entries=8)
def dataset_sample(source: str, per_class: int = 12, seed: int = 0) -> tuple[list, list[int]]:
    """A small, seeded, per-class sample of images and labels (for the advisor's estimates).

    Images come decoded reduced to a 256 px shortest side (what a 224 px model at crop 0.875 needs);
    one that became unreadable since the folder was checked is left out.
    """
    from engine.data import load_source, subsample_per_class
    from engine.errors import ImageError

    ds = load_source(source)
    images, labels = [], []
    for i in subsample_per_class(ds.labels, per_class, seed):
        try:
            images.append(ds.image(i, target=256))
        except ImageError:
            continue
        labels.append(ds.labels[i])
    return images, labels


def save_upload(data: bytes, name: str, folder: str) -> Path:
    """Store an upload under the data directory by content hash (same file -> same path)."""
    import os
    import tempfile

    from engine.paths import data_root

    digest = hashlib.sha256(data).hexdigest()[:12]
    safe = "".join(ch for ch in Path(name).name if ch.isalnum() or ch in "._-")[-100:] or "upload"  # end: suffix
    target = data_root() / "uploads" / folder / f"{digest}_{safe}"
    if not (target.is_file() and target.stat().st_size == len(data)):  # a torn copy (old code, crash) is redone
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)  # atomic: two users uploading the same file never see half of it
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def public_message(text: str) -> str:
    """A message fit for the browser: server folders become the names a user knows."""
    from engine.paths import PROJECT_ROOT, data_root, runs_root

    for folder, shown in ((data_root(), "data folder"), (runs_root(), "runs folder"), (PROJECT_ROOT, "app")):
        for form in {str(folder), str(Path(folder).resolve())}:
            text = text.replace(form + "/", "").replace(form, shown)
    return text


def show_error(exc: Exception, where=None) -> None:
    """A user error in a box (beside its widget when ``where`` is given); anything else as unexpected."""
    if isinstance(exc, EngineError):
        (where or st).error(public_message(str(exc)))
    else:
        report_unexpected(exc, where)


def report_unexpected(exc: BaseException, where=None) -> str:
    """A bug: a short message with an error id in the page; the full trace in the server log."""
    import logging
    import secrets

    error_id = secrets.token_hex(4)
    logging.getLogger("workbench").error("error id %s", error_id, exc_info=exc)
    (where or st).error(f"Something went wrong here (error id {error_id}). The details are in the server log; "
                        "your runs and data are untouched.")
    return error_id


@st.cache_resource(max_entries=3, show_spinner="Loading the trained model...")
def load_trained(run_path: str, mtime: float):
    """A run's best checkpoint; keyed by its mtime, so a newer best loads again."""
    from engine.infer import load_run_model

    return load_run_model(run_path)


def pick_trained_run(label: str = "Run"):
    """A selectbox of runs with a healthy best checkpoint (shared selection across pages); damaged
    runs are named with their reason beneath it. Stops the page with a hint when there is none."""
    from engine.paths import runs_root
    from engine.runs import list_runs

    with_best = [r for r in list_runs(runs_root()) if r.checkpoint("best").is_file()]
    damaged = [(r, r.problems()) for r in with_best]
    runs = [r for r, problems in damaged if not problems]
    damaged = [(r, problems) for r, problems in damaged if problems]
    if damaged:
        with st.expander(f"{len(damaged)} damaged run(s) cannot be used"):
            for r, problems in damaged:
                st.markdown(f"`{r.run_id}`: {'; '.join(problems)}")
    if not runs:
        st.info("No trained run yet: train one on the Training or Compare page.")
        st.stop()
    ids = [r.run_id for r in runs]
    selected = st.session_state.get(SELECTED_RUN)
    pick = st.selectbox(label, ids, index=ids.index(selected) if selected in ids else 0,
                        format_func=lambda i: f"{i} · {runs[ids.index(i)].config().get('model')}")
    st.session_state[SELECTED_RUN] = pick
    return runs[ids.index(pick)]


# ------------------------------------------------------------------ sidebar
def render_sidebar() -> None:
    name, weights, classes = active()
    with st.sidebar:
        st.caption("Active model")
        st.markdown(f"**{name}**  \nweights: `{weights_label(weights)}`")
        try:
            handle = load_model(name, weights, classes)
        except EngineError as exc:
            st.error(str(exc))
            return
        total = sum(p.numel() for p in handle.module.parameters())
        st.markdown(f"{total:,} parameters  \n{handle.spec.num_classes} classes · "
                    f"input {handle.spec.input_size[-1]} px")
        plan = st.session_state[PLAN]
        st.caption("Freeze plan")
        st.markdown(f"`{plan['strategy']}`" + (f" (last {plan['last_n']})" if plan["strategy"] == "last-n" else "")
                    + f" · BN {plan['bn_policy']}")
        if st.session_state[SELECTED_RUN]:
            st.caption("Selected run")
            st.markdown(f"`{st.session_state[SELECTED_RUN]}`")
