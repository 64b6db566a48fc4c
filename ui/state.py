"""Session state: the few small values every page shares, under one set of keys.

Heavy objects never live here; they are cached per process (ui.cache).
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from engine.models.registry import DEFAULT_MODEL

ACTIVE_MODEL = "active_model"  # qualified model name
ACTIVE_WEIGHTS = "active_weights"  # packaged | hub | none | path of an uploaded weights file
ACTIVE_CLASSES = "active_num_classes"  # None: keep the pretrained head
PLAN = "freeze_plan"  # FreezePlan.to_dict()
SELECTED_RUN = "selected_run"  # run id


def init_state() -> None:
    from engine.freeze.plan import FreezePlan

    st.session_state.setdefault(ACTIVE_MODEL, DEFAULT_MODEL)
    st.session_state.setdefault(ACTIVE_WEIGHTS, "packaged")
    st.session_state.setdefault(ACTIVE_CLASSES, None)
    st.session_state.setdefault(PLAN, FreezePlan.default().to_dict())
    st.session_state.setdefault(SELECTED_RUN, None)


def active() -> tuple[str, str, int | None]:
    init_state()
    return st.session_state[ACTIVE_MODEL], st.session_state[ACTIVE_WEIGHTS], st.session_state[ACTIVE_CLASSES]


def weights_label(weights: str) -> str:
    return f"file: {Path(weights).name}" if weights not in ("packaged", "hub", "none") else weights
