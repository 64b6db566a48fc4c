"""Session state: the few small values every page shares, under one set of keys, and the URL that
carries the Training setup across a refresh or to a teammate.

Heavy objects never live here; they are cached per process (ui.cache). The Training page's own
fields (epochs, image size, ...) are widgets bound to the URL (``bind="query-params"``) that keep
their value across page switches (``persist_state="session"``); what is not a widget there (the
active model, the freeze plan, the dataset) is written to the URL by ``share_setup_in_url`` and read
back once per session by ``init_state``. A URL is untrusted input: a value that does not parse, is
out of range or names no known model or dataset is ignored, never an error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import streamlit as st

from engine.models.registry import DEFAULT_MODEL

ACTIVE_MODEL = "active_model"  # qualified model name
ACTIVE_WEIGHTS = "active_weights"  # packaged | hub | none | path of an uploaded weights file
ACTIVE_CLASSES = "active_num_classes"  # None: keep the pretrained head
PLAN = "freeze_plan"  # FreezePlan.to_dict()
SELECTED_RUN = "selected_run"  # run id
DATA = "data_ref"  # the dataset every page's picker starts from (an engine.data.library ref)
DATA_MODE = "data_mode"  # how the Training page reached it: digits | lfw | build | upload | folder
AUTO_PLAN = "autoplan"  # the Training page's "Let the workbench choose the plan" toggle (kept across pages)
_URL_READ = "_url_read"
URL_WEIGHTS = ("packaged", "hub", "none")  # a file path never travels in a URL
MAX_URL_VALUE = 2000  # characters: a plan is ~100


def init_state() -> None:
    from engine.freeze.plan import FreezePlan

    st.session_state.setdefault(ACTIVE_MODEL, DEFAULT_MODEL)
    st.session_state.setdefault(ACTIVE_WEIGHTS, "packaged")
    st.session_state.setdefault(ACTIVE_CLASSES, None)
    st.session_state.setdefault(PLAN, FreezePlan.default().to_dict())
    st.session_state.setdefault(SELECTED_RUN, None)
    st.session_state.setdefault(DATA, "digits")
    if not st.session_state.get(_URL_READ):
        st.session_state[_URL_READ] = True
        drop_unreadable_numbers()
        read_setup_from_url()


def active() -> tuple[str, str, int | None]:
    init_state()
    return st.session_state[ACTIVE_MODEL], st.session_state[ACTIVE_WEIGHTS], st.session_state[ACTIVE_CLASSES]


def weights_label(weights: str) -> str:
    return f"file: {Path(weights).name}" if weights not in ("packaged", "hub", "none") else weights


# ------------------------------------------------------------------ the URL
def _url_value(name: str) -> str | None:
    value = st.query_params.get(name)
    return value if isinstance(value, str) and 0 < len(value) <= MAX_URL_VALUE else None


NUMERIC_FIELDS = ("epochs", "batch", "size", "val", "patience", "per_class", "seed", "micro")  # the Training page's


def drop_unreadable_numbers() -> None:
    """A number field bound to the URL reads its parameter itself, and Streamlit's reader fails on
    '1e999' (int(inf): the page would show an error box): such a value is removed before any widget
    reads it, so the field starts from its default."""
    import math

    for name in NUMERIC_FIELDS:
        value = st.query_params.get(name)
        if value is None:
            continue
        try:
            ok = len(value) <= 20 and math.isfinite(float(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            try:
                del st.query_params[name]
            except Exception:  # noqa: BLE001 - already bound to its widget: that widget read it fine
                pass


def read_setup_from_url() -> None:
    """The model, weights, plan and dataset a URL names, each taken only when it is valid."""
    from engine.core.errors import EngineError
    from engine.freeze.plan import FreezePlan
    from engine.models.registry import resolve

    model, weights = _url_value("model"), _url_value("weights")
    if model:
        try:
            st.session_state[ACTIVE_MODEL] = resolve(model).qualified
        except (EngineError, ValueError):
            pass
    if weights in URL_WEIGHTS:
        st.session_state[ACTIVE_WEIGHTS] = weights
    plan = _url_value("plan")
    if plan:
        try:
            changes = json.loads(plan)
            merged = {**FreezePlan.default().to_dict(), **(changes if isinstance(changes, dict) else {})}
            checked = FreezePlan.from_dict(merged)
            from engine.config import TrainConfig

            TrainConfig(plan=checked.to_dict())  # the plan's own checks, as a run would make them
            st.session_state[PLAN] = checked.to_dict()
        except (ValueError, TypeError, RecursionError, EngineError):
            pass
    data = _url_value("data")
    if data and len(data) <= 300:
        st.session_state[DATA] = data


def _plan_changes(plan: dict[str, Any]) -> dict[str, Any]:
    from engine.freeze.plan import FreezePlan

    default = FreezePlan.default().to_dict()
    return {k: v for k, v in plan.items() if default.get(k) != v}


def share_setup_in_url() -> None:
    """Write what the Training page would train (beyond its own bound fields) into the URL: a refresh
    restores it and a copied link hands it on. Only what differs from the defaults, so a plain URL
    stays plain; each parameter is sent only when it changes."""
    name, weights, _ = active()
    changes = _plan_changes(st.session_state[PLAN])
    wanted = {
        "model": name if name != DEFAULT_MODEL else None,
        "weights": weights if weights in URL_WEIGHTS and weights != "packaged" else None,
        "plan": json.dumps(changes, separators=(",", ":")) if changes else None,
        "data": st.session_state[DATA] if st.session_state[DATA] != "digits" else None,
    }
    for key, value in wanted.items():
        if value is None:
            if key in st.query_params:
                del st.query_params[key]
        elif st.query_params.get(key) != value:
            st.query_params[key] = value
