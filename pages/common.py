"""Session keys, cached engine objects and the sidebar shared by every page.

Heavy objects are created once per process (``st.cache_resource``) and are read-only: a page that
needs to train gets its own copy. Session state keeps only small, per-browser values.
"""
from __future__ import annotations

import streamlit as st

from engine.registry import DEFAULT_MODEL

ACTIVE_MODEL = "active_model"  # qualified model name
ACTIVE_WEIGHTS = "active_weights"  # packaged | hub | none | file:...


def active_model() -> tuple[str, str]:
    st.session_state.setdefault(ACTIVE_MODEL, DEFAULT_MODEL)
    st.session_state.setdefault(ACTIVE_WEIGHTS, "packaged")
    return st.session_state[ACTIVE_MODEL], st.session_state[ACTIVE_WEIGHTS]


@st.cache_resource(max_entries=4, show_spinner="Loading model...")
def load_model(name: str, weights: str, num_classes: int | None = None):
    """A read-only model shared by all sessions; never train it in place."""
    from engine.models import create_model

    return create_model(name, weights=weights, num_classes=num_classes)


@st.cache_data(show_spinner=False)
def model_overview(name: str, weights: str) -> dict:
    from engine.anatomy import count_params

    handle = load_model(name, weights)
    total, trainable = count_params(handle.module)
    return {"spec": handle.spec.to_dict(), "total_params": total, "trainable_params": trainable}


def render_sidebar() -> None:
    from engine.errors import EngineError

    name, weights = active_model()
    with st.sidebar:
        st.caption("Active model")
        st.markdown(f"**{name}**  \nweights: `{weights}`")
        try:
            info = model_overview(name, weights)
        except EngineError as exc:
            st.error(str(exc))
            return
        spec = info["spec"]
        st.markdown(
            f"{info['total_params']:,} parameters  \n"
            f"{spec['num_classes']} classes · input {spec['input_size'][-1]} px"
        )
