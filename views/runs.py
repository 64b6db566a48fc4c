"""Runs: every training on this machine; overlay, export, the code behind it, delete."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.config import TrainConfig
from engine.core.errors import EngineError, RunError
from engine.core.paths import runs_root
from engine.outputs.code import generate_script
from engine.outputs.export import export_to_bytes, weights_bundle
from engine.runs.store import delete_run, describe_run, list_runs, open_run
from ui.cache import load_trained
from ui.errors import show_error
from ui.state import SELECTED_RUN


def _export_and_code(run, tab_export, tab_code) -> None:
    config = TrainConfig.from_dict(run.config())
    best = run.checkpoint("best")
    with tab_export:
        if not best.is_file():
            st.info("This run has no checkpoint yet.")
        else:
            handle = load_trained(str(run.path), best.stat().st_mtime)
            st.download_button("Best weights + JSON (zip: model.safetensors, model.json)",
                               weights_bundle(handle, {"run_id": run.run_id}), file_name=f"{run.run_id}.zip")
            st.caption("Load it again with `create_model(NAME, weights='model.safetensors')`: the JSON beside the "
                       "weights carries classes and preprocessing.")
            fmt = st.radio("Also export as", ["onnx", "torchscript"], horizontal=True)
            if st.button(f"Export to {fmt} and check parity"):
                try:
                    data, result = export_to_bytes(handle, fmt)
                except EngineError as exc:
                    show_error(exc)
                else:
                    verdict = "matches" if result.ok else "does NOT match"
                    (st.success if result.ok else st.error)(
                        f"{fmt}: {verdict} PyTorch (max |difference| {result.max_abs_diff:.2e}, tolerance "
                        f"{result.tolerance:.0e}, same top-1: {result.same_top1}).")
                    st.download_button(f"Download {fmt}", data, file_name=f"{run.run_id}.{'onnx' if fmt == 'onnx' else 'pt'}")
    with tab_code:
        names = (run.checkpoint_meta("best") or run.checkpoint_meta("last") or {}).get("class_names")
        if not names:
            st.info("The run has not finished an epoch yet, so its classes are unknown.")
        else:
            script = generate_script(config, names, run.run_id, run.status().micro_batch)
            st.download_button("Download reproduce.py", script, file_name=f"reproduce_{run.run_id}.py")
            st.code(script, language="python")


st.title("Runs")
runs = list_runs(runs_root())
if not runs:
    st.info("No runs yet: train one on the Training or Compare page.")
    st.stop()
table = pd.DataFrame([describe_run(r).to_dict() for r in runs])
st.dataframe(table.drop(columns=["has_best"]), hide_index=True, height=260)

ids = [r.run_id for r in runs]
overlay = st.multiselect("Overlay curves of", ids, default=ids[: min(3, len(ids))])
points = pd.DataFrame([{"run": r.run_id, **m} for r in runs if r.run_id in overlay for m in r.metrics()])
if not points.empty:
    c1, c2 = st.columns(2)
    c1.plotly_chart(px.line(points, x="epoch", y="val_acc", color="run", markers=True, title="Validation accuracy"),
                    key="ov_acc")
    c2.plotly_chart(px.line(points, x="epoch", y="val_loss", color="run", markers=True, title="Validation loss"),
                    key="ov_loss")

st.divider()
selected = st.session_state.get(SELECTED_RUN)
pick = st.selectbox("Run", ids, index=ids.index(selected) if selected in ids else 0)
st.session_state[SELECTED_RUN] = pick
run = open_run(runs_root(), pick)
problems = run.problems()
if problems:
    st.error(f"Run {run.run_id} is damaged: {'; '.join(problems)}. It cannot be exported or reproduced; "
             "delete it below.")
    tab_delete = st.container()
else:
    tab_export, tab_code, tab_delete = st.tabs(["Export", "Show me the code", "Delete"])
    _export_and_code(run, tab_export, tab_code)
with tab_delete:
    confirm = st.checkbox(f"Yes, delete {run.run_id} and its checkpoints")
    if st.button("Delete run", disabled=not confirm):
        try:
            delete_run(run)
        except RunError as exc:
            show_error(exc)
        else:
            st.session_state[SELECTED_RUN] = None
            st.rerun()
