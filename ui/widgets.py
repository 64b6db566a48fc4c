"""Widgets several pages share: the run picker, a data picker and the active-model sidebar.
"""
from __future__ import annotations

import streamlit as st

from engine.core.errors import EngineError
from engine.core.hosting import hosted_limits
from ui.cache import load_model
from ui.charts import stop_page
from ui.state import AUTO_PLAN, DATA, DATA_MODE, PLAN, SELECTED_RUN, active, weights_label
from ui.text import code, md


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
        stop_page()
    ids = [r.run_id for r in runs]
    selected = st.session_state.get(SELECTED_RUN)
    pick = st.selectbox(label, ids, index=ids.index(selected) if selected in ids else 0,
                        format_func=lambda i: f"{i} · {runs[ids.index(i)].config().get('model')}")
    st.session_state[SELECTED_RUN] = pick
    return runs[ids.index(pick)]


MODES = {"digits": "digits (built-in)", "lfw": "lfw faces (built-in)", "build": "build a dataset here",
         "upload": "upload a zip", "folder": "folder in the data directory"}
CREATING = ("build", "upload")  # the Training page's ways to make a dataset; elsewhere a made one is a folder


def _mode_of(ref: str) -> str:
    from engine.data.library import BUILT_INS

    return ref if ref in BUILT_INS else "folder"


def _seed_mode(ref: str, stored_mode: str | None, modes: list[str]) -> str:
    """The mode a picker shows on arrival: the Training page's builder or upload when the session's
    dataset is still the one made there, else the mode of the dataset itself."""
    made_here = {"build": "built:", "upload": "zip:"}
    if stored_mode is None:  # a new session (a refresh, a link): a dataset made here opens where it was made
        stored_mode = next((m for m, prefix in made_here.items() if ref.startswith(prefix)), None)
    if stored_mode in made_here and stored_mode in modes and ref.startswith(made_here[stored_mode]):
        return stored_mode
    return _mode_of(ref)


def pick_data_source(key: str = "data", *, create: bool = False) -> str | None:
    """The one data picker: built-ins, the builder's datasets, folders in the data directory and uploaded
    zips, on every page that reads data (Training, the race, comparisons, the advisor, the feature map,
    the LR finder through Training). The pick is the session's (``DATA``): what is chosen on one page
    is what every other page starts from, and the Training page puts it in the URL. ``create``: also
    build a dataset here or upload a zip (the Training page). Returns what ``load_source`` reads, or
    None (with a hint) when nothing is picked yet; raises EngineError for a dataset that is gone."""
    from engine.data.library import BUILT_INS, resolve_dataset

    ref = st.session_state.get(DATA) or "digits"
    modes = [m for m in MODES if create or m not in CREATING]
    stored_mode = st.session_state.get(DATA_MODE)
    mode_key = f"{key}_mode"
    labels = [MODES[m] for m in modes]
    if st.session_state.get(mode_key) not in labels:  # a page switch dropped the widget: seed it from the pick
        st.session_state[mode_key] = MODES[_seed_mode(ref, stored_mode, modes)]
    mode = modes[labels.index(st.radio("Data", labels, horizontal=True, key=mode_key))]
    if create:  # the Training page's way in (building, uploading) is its own; elsewhere a made one is a folder
        st.session_state[DATA_MODE] = mode
    if mode in BUILT_INS:  # a built-in set: the mode is the dataset
        st.session_state[DATA] = mode
        return mode
    if mode == "build":
        return _built_here(ref)
    if mode == "upload":
        return _uploaded_zip(ref, key)
    picked = _pick_listed(ref, key)
    if picked is None:
        return None
    st.session_state[DATA] = picked
    return resolve_dataset(picked)


def _pick_listed(ref: str, key: str) -> str | None:
    """A dataset of the data folder (builder datasets, copied folders, uploaded zips), by its ref."""
    from engine.data.library import list_datasets

    entries = [e for e in list_datasets() if e.kind != "builtin"]
    if not entries:
        st.info("No datasets in the data folder yet: build one or upload a zip on the Training page, or copy a "
                "folder there (one sub-folder per class, train/ val/ folders of class folders, or images with a "
                "labels.csv).")
        return None
    refs = [e.ref for e in entries]
    labels = {e.ref: e.label for e in entries}
    folder_key = f"{key}_folder"
    if st.session_state.get(folder_key) not in refs:
        if ref not in refs and _mode_of(ref) == "folder":  # from a link, or deleted since: said, never read
            from engine.data.library import dataset_label

            st.warning(f"The dataset {md(dataset_label(ref))} is not in this app's data folder (any more): pick one.")
        st.session_state[folder_key] = ref if ref in refs else refs[0]
    return st.selectbox("Dataset", refs, format_func=labels.get, key=folder_key,
                        help="The app's data folder: datasets built here, folders copied there, zips uploaded.")


def _built_here(ref: str) -> str | None:
    from ui.dataset_builder import PICKED, dataset_builder

    kind, _, name = ref.partition(":")
    if kind == "built":
        st.session_state[PICKED] = name  # the session's dataset, also when it was picked on another page
    source = dataset_builder()
    if st.session_state.get(PICKED):
        st.session_state[DATA] = f"built:{st.session_state[PICKED]}"
    return source


def _uploaded_zip(ref: str, key: str) -> str | None:
    from engine.data.archive import extract_upload
    from engine.data.library import dataset_label, resolve_dataset, zip_ref
    from ui.uploads import save_upload

    upload = st.file_uploader("A .zip of one folder per class, of train/ val/ (test/) folders of class folders, "
                              "or of images with a labels.csv (path,label[,split])", type=["zip"], key=f"{key}_zip")
    if upload is not None:
        stored = save_upload(upload.getvalue(), upload.name, "datasets")  # <sha12>_<name>.zip
        st.session_state[DATA] = zip_ref(stored)
        return str(extract_upload(stored, display_name=upload.name))  # messages name the user's file
    if ref.startswith("zip:"):
        st.caption(f"Using **{md(dataset_label(ref))}**, uploaded before. Upload another zip to use that instead.")
        return resolve_dataset(ref)
    return None


def data_label() -> str:
    """The session's dataset as a person reads it (the sidebar)."""
    from engine.data.library import dataset_label

    return dataset_label(st.session_state.get(DATA) or "digits")


HOSTED_BANNER = ("**Hosted mode** (a shared server): runs vanish when this server restarts unless you export them "
                 "(Runs page: *Run bundle (.zip)*; import it again there). Limits: {limits}.")


def hosted_banner(where=st) -> None:
    """On a shared server: say that runs are lost on restart unless exported, and the caps in force."""
    limits = hosted_limits()
    if limits is not None:
        where.warning(HOSTED_BANNER.format(limits="; ".join(limits.lines())), icon=":material/cloud:")


def render_sidebar():
    """The session's model, plan, data and run, drawn before the page. Returns ``refresh``: the page may
    change the plan, the data or the run (the Freeze Configurator sets the plan as its widgets move), so
    the router calls it after the page and the sidebar shows this rerun's choices, not the last one's.
    (Drawing the whole sidebar after the page fails for a page that ends with st.stop: after a stop,
    nothing more is drawn.)"""
    name, weights, classes = active()
    with st.sidebar:
        hosted_banner()
        st.caption("Active model")
        st.markdown(f"**{name}**  \nweights: {code(weights_label(weights))}")  # a catalog name: plain
        choices = st.empty()
        try:
            handle = load_model(name, weights, classes)
        except EngineError as exc:
            st.error(str(exc))
        else:
            total = sum(p.numel() for p in handle.module.parameters())
            st.markdown(f"{total:,} parameters  \n{handle.spec.num_classes} classes · "
                        f"input {handle.spec.input_size[-1]} px")

    def refresh() -> None:
        with choices.container():
            plan = st.session_state[PLAN]
            st.caption("Freeze plan")
            shown = (f"`{plan['strategy']}`" + (f" (last {plan['last_n']})" if plan["strategy"] == "last-n" else "")
                     + f" · BN {plan['bn_policy']} · head LR {plan['head_lr']:g}")
            if st.session_state.get(AUTO_PLAN):  # the Training page's toggle: a run chooses its own
                st.markdown("**chosen at Start** by the workbench (Training page)")
                st.caption(f"yours, used with that toggle off: {shown}")
            else:
                st.markdown(shown)
            st.caption("Data")
            st.text(data_label())
            if st.session_state[SELECTED_RUN]:
                st.caption("Selected run")
                st.markdown(code(st.session_state[SELECTED_RUN]))

    refresh()
    return refresh
