"""Runs: every training on this machine; overlay, export, the code behind it, delete; bundles in and out.

A run bundle (engine/runs/bundle.py) is how a run outlives a server whose disk is wiped on restart
(Streamlit Community Cloud): download it here, upload it again on the next server.
"""
from __future__ import annotations

import json

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.config import TrainConfig
from engine.core.errors import EngineError, RunError
from engine.core.paths import runs_root
from engine.outputs.code import generate_script, script_for_run
from engine.outputs.export import export_to_bytes, weights_bundle
from engine.outputs.onnx_export import onnx_package
from engine.outputs.run_export import run_extras
from engine.runs.bundle import export_bundle, import_bundle
from engine.runs.store import RunDir, delete_run, list_runs, open_run
from ui.cache import load_trained, script_problem
from ui.charts import chart, stop_page
from ui.cluster import trained_where
from ui.errors import contained, public_message, show_error
from ui.run_table import run_table
from ui.state import SELECTED_RUN
from ui.text import code, md, plot, short_run_names
from ui.widgets import hosted_banner

IMPORTED = "runs_imported_bundle"  # the last uploaded bundle: (upload token, run id or None, message)


def _import_section() -> None:
    """A bundle from another machine (or from before this server's disk was wiped) becomes a run here.

    Imported once per upload: a rerun of the page shows the outcome again instead of redoing it.
    """
    upload = st.file_uploader("Import a run bundle", type=["zip"], key="run_bundle_upload",
                              help="A .zip made with 'Run bundle (.zip)' (Export tab) or "
                                   "`python -m engine runs export`.")
    if upload is None:
        return
    token = f"{getattr(upload, 'file_id', '')}:{upload.name}:{upload.size}"
    last = st.session_state.get(IMPORTED)
    if last and last[0] == token:
        if last[2]:
            (st.success if last[1] else st.error)(md(last[2]))
        return
    run_id, message = None, None
    try:
        with st.spinner("Checking the bundle..."):
            run = import_bundle(upload.getvalue(), runs_root(), display_name=upload.name)
    except EngineError as exc:
        message = public_message(str(exc))
        show_error(exc)
    except Exception as exc:  # noqa: BLE001 - a bug: an error id here, the trace in the server log
        show_error(exc)
    else:
        run_id, message = run.run_id, f"{upload.name}: imported as run {run.run_id} (selected below)."
        st.session_state[SELECTED_RUN] = run_id
        st.success(md(message))
    st.session_state[IMPORTED] = (token, run_id, message)


def _bundle_download(run: RunDir) -> None:
    """Built when clicked (not on every rerun): the weights file can be hundreds of MB."""
    if run.status().active:
        st.caption("The run bundle can be downloaded once the run has ended.")
        return
    st.download_button("Run bundle (.zip)", lambda: export_bundle(run, script_for=script_for_run),
                       file_name=f"{run.run_id}-bundle.zip", mime="application/zip", on_click="ignore")
    st.caption("The whole run in one file, to keep it past a server restart or move it to another machine: "
               "config, curves, best weights with their classes, the reproduce script. Import it at the top of "
               "this page or with `python -m engine runs import`.")


def _export_and_code(run, tab_export, tab_code) -> None:
    config = TrainConfig.from_dict(run.config())
    best = run.checkpoint("best")
    with tab_export:
        if not best.is_file():
            st.info("This run has no checkpoint yet.")
        else:
            _bundle_download(run)
            handle = load_trained(str(run.path), best.stat().st_mtime)
            st.download_button("Best weights + JSON (zip: model.safetensors, model.json)",
                               lambda: weights_bundle(handle, {"run_id": run.run_id}),  # built on click only
                               file_name=f"{run.run_id}.zip")
            st.caption("Load it again with `create_model(NAME, weights='model.safetensors')`: the JSON beside the "
                       "weights carries classes and preprocessing.")
            fmt = st.radio("Also export as", ["onnx", "torchscript"], horizontal=True)
            if st.button(f"Export to {fmt} and check parity"):
                try:
                    with st.spinner(f"Exporting to {fmt}, then comparing its outputs with PyTorch's "
                                    "(a few seconds for a small model, up to a minute for a large one)..."):
                        if fmt == "onnx":  # model.onnx (classes + preprocessing in its metadata) + predict_onnx.py
                            data, result = onnx_package(handle, *run_extras(run, handle))
                        else:
                            data, result = export_to_bytes(handle, fmt)
                except EngineError as exc:
                    show_error(exc)
                else:
                    verdict = "matches" if result.ok else "does NOT match"
                    (st.success if result.ok else st.error)(
                        f"{fmt}: {verdict} PyTorch (max |difference| {result.max_abs_diff:.2e}, tolerance "
                        f"{result.tolerance:.0e}, same top-1: {result.same_top1}).")
                    if fmt == "onnx":
                        st.download_button("Download ONNX + predict_onnx.py (zip)", data,
                                           file_name=f"{run.run_id}-onnx.zip", mime="application/zip")
                        st.caption("The model carries its class names and preprocessing in its metadata; "
                                   "`python predict_onnx.py photo.jpg` predicts with onnxruntime, numpy and pillow "
                                   "(no torch), exactly as this app does. `python -m engine export RUN --format onnx "
                                   "--quantize int8` adds an INT8 model and its validation accuracy.")
                    else:
                        st.download_button(f"Download {fmt}", data, file_name=f"{run.run_id}.pt")
    with tab_code:
        names = (run.checkpoint_meta("best") or run.checkpoint_meta("last") or {}).get("class_names")
        problem = script_problem(str(run.path), json.dumps(run.config(), sort_keys=True))
        if problem:
            st.info(f"No script: {md(problem)}.")
        elif not names:
            st.info("The run has not finished an epoch yet, so its classes are unknown.")
        else:
            script = generate_script(config, names, run.run_id, run.status().micro_batch)
            st.download_button("Download reproduce.py", script, file_name=f"reproduce_{run.run_id}.py")
            st.code(script, language="python")


def _numbers(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(epoch, value) of the rows that hold both as numbers: a metrics file from elsewhere may not."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

    return [(row["epoch"], float(row[key])) for row in rows
            if isinstance(row, dict) and number(row.get("epoch")) and number(row.get(key))]


def _overlay(runs: list[RunDir], chosen: list[str]) -> None:
    """Validation curves of the chosen runs, one colour each under a short name (the full id on hover).
    A run without plottable curves (an imported bundle's metrics may hold only epochs) is named and
    left out; the others are drawn."""
    names = short_run_names([(r.run_id, _model_of(r)) for r in runs if r.run_id in chosen])
    points, skipped = [], []
    for r in (r for r in runs if r.run_id in chosen):
        try:
            rows = r.metrics()
        except Exception as exc:  # noqa: BLE001 - the overlay must never cost the page
            skipped.append(f"{code(r.run_id)} ({md(public_message(str(exc)))})")
            continue
        acc, loss = dict(_numbers(rows, "val_acc")), dict(_numbers(rows, "val_loss"))
        if not acc and not loss:
            if rows or _has_written_metrics(r):  # not yet an epoch finished: nothing to draw, no complaint
                skipped.append(f"{code(r.run_id)} (its metrics hold no validation accuracy or loss)")
            continue
        points += [{"run": plot(names[r.run_id]), "run id": plot(r.run_id), "epoch": e, "val_acc": acc.get(e),
                    "val_loss": loss.get(e)} for e in sorted(set(acc) | set(loss))]
    if skipped:
        st.caption("Not drawn: " + "; ".join(skipped) + ".")
    if not points:
        return
    frame = pd.DataFrame(points)
    c1, c2 = st.columns(2)
    for where, key, title, extra in ((c1, "val_acc", "Validation accuracy", {"range_y": [0, 1]}),
                                     (c2, "val_loss", "Validation loss", {})):
        shown = frame.dropna(subset=[key])
        if not shown.empty:
            fig = px.line(shown, x="epoch", y=key, color="run", markers=True, title=title, hover_data=["run id"],
                          **extra)
            fig.update_layout(legend={"title": {"text": "run"}})
            chart(where, fig, key=f"ov_{key}")


def _has_written_metrics(run: RunDir) -> bool:
    """Whether the run's metrics file holds anything: the engine's reader drops rows it cannot use, so an
    empty reading of a written file means its rows were unusable, not that no epoch has finished yet."""
    try:
        return run.metrics_path.stat().st_size > 0
    except OSError:
        return False


def _model_of(run: RunDir) -> str | None:
    try:
        model = run.config().get("model")
    except Exception:  # noqa: BLE001 - a damaged config: the legend says "run"
        return None
    return model if isinstance(model, str) else None


def _details(run: RunDir) -> None:
    """Where the run came from, what is wrong with it, its export and code tabs; Delete is drawn apart."""
    where = trained_where(run.status())
    if where:
        st.caption(where)
    origin = run.status().imported_from
    if isinstance(origin, dict):
        st.caption(f"Imported from {md(origin.get('bundle', 'a bundle'))} (run {md(origin.get('run_id', '?'))} "
                   "there).")
    problems = run.problems()
    if problems:
        st.error(f"Run {code(run.run_id)} is damaged: {md('; '.join(problems))}. It cannot be exported or "
                 "reproduced; delete it below.")
        return
    tab_export, tab_code = st.tabs(["Export", "Show me the code"])
    _export_and_code(run, tab_export, tab_code)


PICK = "runs_pick"  # the picker's own key
PICKED_HERE = "runs_picked_here"  # the selection as this page left it: a different one was made on another page


def _seed_pick(ids: list[str]) -> str:
    """The picker's key, its value following a run selected on another page (or the newest at first).
    Without a key the picker's identity changed with its ``index`` whenever the selection did, and every
    other choice was lost (the widget came back new, at its old default)."""
    selected = st.session_state.get(SELECTED_RUN)
    if selected in ids and selected != st.session_state.get(PICKED_HERE):
        st.session_state[PICK] = selected  # chosen elsewhere (another page, an import): follow it
    elif st.session_state.get(PICK) not in ids:
        st.session_state[PICK] = ids[0]
    return PICK


DELETED = "runs_deleted"  # the run id just deleted: said once after the rerun the deletion causes


def _delete(run: RunDir) -> None:
    """Delete, after a confirming tick; what was deleted is said after the page redraws without it."""
    st.subheader("Delete")
    confirm = st.checkbox(f"Yes, delete {md(run.run_id)} and its checkpoints", key=f"delete-ok-{run.run_id}")
    if st.button("Delete run", disabled=not confirm, help="tick the box above first: this cannot be undone"):
        try:
            delete_run(run)
        except RunError as exc:
            show_error(exc)
        else:
            st.session_state[SELECTED_RUN] = None
            st.session_state[DELETED] = run.run_id
            st.rerun()


st.title("Runs")
hosted_banner()  # on a shared server: export what you want to keep
deleted = st.session_state.pop(DELETED, None)
if deleted:
    st.success(f"Deleted run {code(deleted)} and its checkpoints.")
contained(_import_section)
runs = list_runs(runs_root())
if not runs:
    st.info("No runs yet: train one on the Training or Compare page.")
    stop_page()
run_table(runs)

ids = [r.run_id for r in runs]
overlay = st.multiselect("Overlay curves of", ids, default=ids[: min(3, len(ids))])
contained(_overlay, runs, overlay)

st.divider()
pick = st.selectbox("Run", ids, key=_seed_pick(ids))
st.session_state[SELECTED_RUN] = st.session_state[PICKED_HERE] = pick
run = open_run(runs_root(), pick)
contained(_details, run)
_delete(run)
