"""Widgets several pages share: the run picker, a data picker and the active-model sidebar.
"""
from __future__ import annotations

import streamlit as st

from engine.core.errors import EngineError
from engine.core.hosting import hosted_limits
from ui.cache import load_model
from ui.state import PLAN, SELECTED_RUN, active, weights_label


def pick_trained_run(label: str = "Run"):
    """A selectbox of runs with a healthy best checkpoint (shared selection across pages); damaged
    runs are named with their reason beneath it. Stops the page with a hint when there is none."""
    from engine.core.paths import runs_root
    from engine.runs.store import list_runs, usable_runs
    from ui.text import code, md

    runs = usable_runs(runs_root())
    damaged = [(r, r.problems()) for r in list_runs(runs_root()) if r.checkpoint("best").is_file() and r.problems()]
    if damaged:
        with st.expander(f"{len(damaged)} damaged run(s) cannot be used"):
            for r, problems in damaged:  # a run's id and problems come from its files: escaped
                st.markdown(f"{code(r.run_id)}: {md('; '.join(problems))}")
    if not runs:
        st.info("No trained run yet: train one on the Training or Compare page.")
        st.stop()
    ids = [r.run_id for r in runs]
    selected = st.session_state.get(SELECTED_RUN)
    pick = st.selectbox(label, ids, index=ids.index(selected) if selected in ids else 0,
                        format_func=lambda i: f"{i} · {runs[ids.index(i)].config().get('model')}")
    st.session_state[SELECTED_RUN] = pick
    return runs[ids.index(pick)]


DATA_CHOICES = {"digits": "digits (built-in)", "lfw": "lfw faces (built-in)", "folder": "folder in the data directory"}


def pick_data_source(key: str = "data_source") -> str | None:
    """Built-in digits, LFW faces or a folder inside the data directory (the Training page's choices
    less the zip upload); returns what ``load_source`` reads, or None (with a hint) when no folder is
    there to pick. Raises EngineError for a folder name that leads outside the data directory."""
    from engine.core.paths import data_root, resolve_data_path

    choice = st.radio("Data", list(DATA_CHOICES), format_func=DATA_CHOICES.get, horizontal=True, key=key)
    if choice != "folder":
        return choice
    root = data_root()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "uploads") if root.is_dir() else []
    if not folders:
        st.info("No folders in the data folder yet: copy a dataset there (one sub-folder per class, train/ val/ "
                "folders of class folders, or images with a labels.csv), or upload a zip on the Training page.")
        return None
    return str(resolve_data_path(st.selectbox("Folder", folders, key=f"{key}_folder")))


HOSTED_BANNER = ("**Hosted mode** (a shared server): runs vanish when this server restarts unless you export them "
                 "(Runs page: *Run bundle (.zip)*; import it again there). Limits: {limits}.")


def hosted_banner(where=st) -> None:
    """On a shared server: say that runs are lost on restart unless exported, and the caps in force."""
    limits = hosted_limits()
    if limits is not None:
        where.warning(HOSTED_BANNER.format(limits="; ".join(limits.lines())), icon=":material/cloud:")


def render_sidebar() -> None:
    name, weights, classes = active()
    with st.sidebar:
        hosted_banner()
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
