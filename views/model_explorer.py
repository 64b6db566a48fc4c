"""Model Explorer: find a backbone, load it, and see it as the nn.Module tree it is."""
from __future__ import annotations

import json

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.core.errors import EngineError
from engine.freeze.plan import FreezePlan
from ui.cache import catalog_rows, freeze_preview, load_model, model_summary
from ui.charts import chart, stop_page
from ui.errors import show_error
from ui.state import ACTIVE_CLASSES, ACTIVE_MODEL, ACTIVE_WEIGHTS, active, weights_label
from ui.text import code, md
from ui.uploads import save_upload

st.title("Model Explorer")
name, weights, classes = active()

with st.expander("Choose a model", expanded=True):
    query = st.text_input("Search the catalog (timm + torchvision)", value="", placeholder="e.g. resnet, vit, lite")
    rows = [r for r in catalog_rows() if query.lower() in r["name"].lower() or query.lower() in r["family"]]
    st.caption(f"{len(rows)} models")
    frame = pd.DataFrame(rows[:300])
    if not frame.empty:
        frame["params (M)"] = (frame["params"] / 1e6).round(2)
        st.dataframe(frame[["name", "family", "params (M)", "packaged"]], hide_index=True, height=220)
    names = [r["name"] for r in rows] or [name]
    pick = st.selectbox("Model", names, index=names.index(name) if name in names else 0)
    source = st.radio("Weights", ["packaged", "hub", "none", "upload a file"],
                      index=["packaged", "hub", "none"].index(weights) if weights in ("packaged", "hub", "none") else 3,
                      horizontal=True,
                      help="packaged: offline ImageNet weights (efficientnet_lite0/1/2). hub: download "
                           "(needs internet). none: random init, the from-scratch baseline.")
    new_weights = source
    if source == "upload a file":
        upload = st.file_uploader("Weights file (.safetensors, .pth)", type=["safetensors", "pth", "pt", "bin"])
        new_weights = str(save_upload(upload.getvalue(), upload.name, "weights")) if upload else weights
    new_classes = st.number_input("Classes (0 keeps the pretrained head)", 0, 100_000, classes or 0, step=1)
    if st.button("Use this model", type="primary"):
        try:
            load_model(pick, new_weights, new_classes or None)
        except EngineError as exc:
            show_error(exc)
        else:
            st.session_state[ACTIVE_MODEL] = pick
            st.session_state[ACTIVE_WEIGHTS] = new_weights
            st.session_state[ACTIVE_CLASSES] = new_classes or None
            st.rerun()

try:
    handle = load_model(name, weights, classes)
except EngineError as exc:
    show_error(exc)
    stop_page()

spec = handle.spec
st.subheader(f"{md(spec.name)} · weights {code(weights_label(weights))}")
size = st.number_input("Input size (pixels)", 32, 1024, int(spec.input_size[-1]), step=16)
try:
    summary = model_summary(name, weights, classes, int(size))
except Exception as exc:  # some architectures only accept their own input size
    show_error(exc)
    stop_page()

c1, c2, c3, c4 = st.columns(4)
c1.metric("Parameters", f"{summary['total_params']:,}")
c2.metric("Trainable", f"{summary['trainable_params']:,}")
c3.metric("Buffer elements", f"{summary['total_buffers']:,}", help="e.g. BatchNorm running mean/var")
c4.metric("Classes", spec.num_classes)
st.caption(f"Counted with {'the pretrained' if classes is None else 'a new'} {spec.num_classes}-class head"
           + (": a training replaces it with one for your data's classes (set Classes above to count with "
              "that head)." if classes is None else "."))

st.markdown("#### Call `model(x)`")
st.code(f"x = torch.zeros({', '.join(map(str, summary['input_shape']))})\n"
        f"model(x).shape  # -> torch.Size({summary['output_shape']})\n"
        f"# head: model.{spec.head} -> {spec.num_classes} classes", language="python")
st.caption(f"Preprocessing from the weights: mean {tuple(spec.mean)}, std {tuple(spec.std)}, "
           f"{spec.interpolation} resize, crop {spec.crop_pct:.3f}")

depth = st.slider("Tree depth", 1, max(1, max(r["depth"] for r in summary["modules"])), 2)
table = pd.DataFrame([
    {"module": ("· " * r["depth"]) + (r["name"].rsplit(".", 1)[-1] or "(model)"), "path": r["name"],
     "type": r["type"], "params": r["params"], "trainable": r["trainable"], "buffers": r["buffers"],
     "output shape": str(r["output_shape"])}
    for r in summary["modules"] if r["depth"] <= depth
])
st.dataframe(table, hide_index=True, height=420)

stages = freeze_preview(name, weights, classes, json.dumps(FreezePlan.default().to_dict()))["stages"]
fig = px.bar(pd.DataFrame(stages), x="name", y="params", hover_data=["modules"],
             title="Parameters per stage (what freezing acts on)", labels={"name": "stage", "params": "parameters"})
chart(st, fig)

st.markdown("#### Open a module")
paths = [r["name"] for r in summary["modules"] if r["name"] and r["children"]]
opened = st.selectbox("Module (expand its children)", paths, index=None, placeholder="e.g. a stage or block")
if opened:
    prefix = opened + "."
    inner = [r for r in summary["modules"] if r["name"].startswith(prefix)
             and r["depth"] == opened.count(".") + 2]
    st.dataframe(pd.DataFrame([{"child": r["name"][len(prefix):], "type": r["type"], "params": r["params"],
                                "trainable": r["trainable"], "buffers": ", ".join(r["buffer_names"]),
                                "output shape": str(r["output_shape"])} for r in inner]), hide_index=True)
    st.code(str(handle.module.get_submodule(opened)), language="text")

with st.expander("print(model)"):
    st.code(summary["text"], language="text")
