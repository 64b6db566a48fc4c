"""Evaluation of a run: what it gets right and wrong, how sure it is, and where it looks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.outputs.calibration import calibrate_run
from engine.runs.calibration import run_temperature
from ui import overrides as overrides_ui
from ui.cache import mislabeled_for, report_for, val_image
from ui.charts import chart, stop_page
from ui.errors import public_message, show_error
from ui.gradcam import explained, upload_refusal, validation_images
from ui.text import md, plot_labels
from ui.widgets import pick_trained_run

CAM_ON = "ev_cam_on"  # the run ids whose Grad-CAM was asked for: from then on it follows the picked image


def reliability_figure(calibration: dict) -> go.Figure:
    """The reliability diagram: per confidence bin, how often the model was right against how sure it
    said it was, before and after temperature scaling; on the diagonal, a confidence means what it says."""
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dash", "color": "#999"},
                               name="perfectly calibrated", hoverinfo="skip"))
    for key, name, colour in (("before", "before", "#d9534f"), ("after", "after (calibrated)", "#2f6fde")):
        rows = [r for r in calibration[key] if r["count"]]
        fig.add_trace(go.Scatter(x=[r["confidence"] for r in rows], y=[r["accuracy"] for r in rows],
                                 mode="lines+markers", name=f"{name}: ECE {calibration['ece_' + key]:.3f}",
                                 marker={"size": [6 + min(14, r["count"] ** 0.5) for r in rows], "color": colour},
                                 customdata=[r["count"] for r in rows],
                                 hovertemplate="confidence %{x:.0%}: right %{y:.0%} of %{customdata} images"
                                               "<extra></extra>"))
    fig.update_layout(title="Reliability: how sure vs how often right", height=360,
                      xaxis={"title": {"text": "confidence (top-1 probability)"}, "range": [0, 1], "tickformat": ".0%"},
                      yaxis={"title": {"text": "accuracy"}, "range": [0, 1.02], "tickformat": ".0%"},
                      legend={"orientation": "h", "y": -0.25}, margin={"t": 50, "b": 10})
    return fig


def cam_choices(all_images: list[dict], wrong: list[dict]) -> tuple[list[int], dict[int, str]]:
    """The validation images Grad-CAM may explain, misclassified first (most confident first, as in the
    gallery), then the others in split order; with what each option says (name, true class, and the
    predicted class where the model was wrong)."""
    mistakes = {m["index"]: m for m in wrong}
    order = [m["index"] for m in wrong] + [v["index"] for v in all_images if v["index"] not in mistakes]
    said = {v["index"]: f"{v['name']} · {v['label']}" for v in all_images}
    for i, m in mistakes.items():
        said[i] = f"{said.get(i, m['source'])} → predicted {m['predicted']} (wrong)"
    return order, said


st.title("Evaluate a run")
run = pick_trained_run()
mtime = run.checkpoint("best").stat().st_mtime
tta = st.toggle("Test-time augmentation (horizontal flip)", False,
                help="Each image and its mirror, their probabilities averaged. Off by default: it helps "
                     "photos of things, not digits, letters or text, which are not mirror-symmetric.")
try:
    report = report_for(str(run.path), mtime, tta, run_temperature(run))
except EngineError as exc:
    show_error(exc)
    stop_page()
config = TrainConfig.from_dict(run.config())
names = report.class_names
if report.tta:  # without and with TTA side by side, from the same forward passes
    change = report.tta
    m1, m2, m3 = st.columns(3)
    m1.metric("Validation accuracy (best checkpoint)", f"{change.plain_acc:.2%}")
    m2.metric("With TTA", f"{change.tta_acc:.2%}", delta=f"{change.points:+.1f} points")
    m3.metric("Loss with TTA", f"{change.tta_loss:.4f}", delta=f"{change.tta_loss - change.plain_loss:+.4f}",
              delta_color="inverse")
    st.caption(change.line() + ". The matrix, scores and gallery below are of the TTA predictions.")
else:
    st.metric("Validation accuracy (best checkpoint)", f"{report.accuracy:.2%}")
b1, b2 = st.columns(2)  # the two that an imbalanced validation set cannot flatter
b1.metric("Balanced accuracy (mean per-class recall)", f"{report.balanced_accuracy:.2%}")
b2.metric("Macro-F1", f"{report.macro_f1:.3f}")
if report.changed:
    st.warning(f"Note: {md(report.changed)}.")
if report.unreadable:
    st.warning(f"{len(report.unreadable)} validation file(s) can no longer be read and were left out: "
               + md(public_message("; ".join(u["reason"] for u in report.unreadable[:5]))))

left, right = st.columns(2)
with left:
    normalise = st.toggle("Normalise rows (recall per class)", True)
    matrix = np.array(report.confusion, dtype=float)
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalise else matrix
    axis = plot_labels(names)  # class names from the data: escaped for Plotly, mapped back on a click
    named = dict(zip(axis, names))
    fig = go.Figure(go.Heatmap(z=shown, x=axis, y=axis, colorscale="Blues", text=matrix.astype(int),
                               texttemplate="%{text}", hoverinfo="skip"))
    # invisible markers on the cell centres make each cell clickable (plotly selects points)
    cells = [(p, t) for t in axis for p in axis]
    fig.add_trace(go.Scatter(x=[p for p, _ in cells], y=[t for _, t in cells], mode="markers",
                             marker={"size": 28, "opacity": 0.01, "color": "black"}, showlegend=False,
                             hovertemplate="true %{y}, predicted %{x}: click to see these images<extra></extra>"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    fig.update_layout(title="Confusion matrix (click a cell)", xaxis_title="predicted", yaxis_title="true",
                      yaxis_autorange="reversed", height=460)
    event = chart(st, fig, key="confusion", on_select="rerun", selection_mode="points")
    picked = [(named.get(str(pt.get("y")), str(pt.get("y"))), named.get(str(pt.get("x")), str(pt.get("x"))))
              for pt in (event.selection.points if event else [])]
    if picked and picked[0] != st.session_state.get("ev_last_cell"):
        st.session_state["ev_last_cell"] = picked[0]
        st.session_state["ev_true"], st.session_state["ev_pred"] = picked[0]
with right:
    st.dataframe(pd.DataFrame(report.per_class).round(3), hide_index=True, height=260)
    conf = pd.DataFrame([{"confidence": c, "answer": "correct"} for c in report.confidence["correct"]]
                        + [{"confidence": c, "answer": "wrong"} for c in report.confidence["wrong"]])
    chart(st, px.histogram(conf, x="confidence", color="answer", nbins=20, barmode="overlay",
                                 title="Confidence of right and wrong answers (calibration at a glance)"))

if report.calibration:
    cal = report.calibration
    chart(st, reliability_figure(cal), key="reliability")
    if cal.get("note"):
        st.caption(f"Not rescaled: {md(cal['note'])}. The confidences on this page are the model's own softmax; "
                   "a validation split with a few mistakes would let a temperature be fitted.")
    else:
        st.caption(f"Calibrated on its validation split: the logits are divided by the temperature "
                   f"{cal['temperature']:.3g} (temperature scaling). Every confidence on this page is the calibrated "
                   "one. The after curve is measured on the same images the temperature was fitted on.")
else:
    st.caption("This run's probabilities are not calibrated (it ended before calibration existed, or calibrating "
               "it failed): its confidences are the raw softmax.")
    if st.button("Calibrate this run", help="Fit its temperature and its 'none of my classes' rule on its "
                                            "validation split (python -m engine calibrate RUN)."):
        try:
            with st.spinner("Calibrating on the validation split..."):
                calibrate_run(run)
        except EngineError as exc:
            show_error(exc)
        else:
            st.rerun()

st.subheader("Misclassified validation images")
st.caption("Is the model wrong, or the label? Relabel an image as another class, or exclude it: the decision "
           "goes to the dataset's overrides file (the image files are never moved) and counts from the next "
           "training and data report on.")
decided = overrides_ui.decisions(config.data)
overrides_ui.undo_button(config.data, decided)
wrong = pd.DataFrame(report.misclassified)
if wrong.empty:
    st.success("No validation image is misclassified.")
else:
    f1, f2 = st.columns(2)
    for key in ("ev_true", "ev_pred"):
        if st.session_state.get(key) not in ["any"] + names:
            st.session_state[key] = "any"
    kept = {"persist_state": "session"}  # the filters stay as left after a visit to another page
    true_filter = f1.selectbox("True class (a confusion-matrix row)", ["any"] + names, key="ev_true", **kept)
    pred_filter = f2.selectbox("Predicted class (a column)", ["any"] + names, key="ev_pred", **kept)
    view = wrong[((wrong["true"] == true_filter) | (true_filter == "any"))
                 & ((wrong["predicted"] == pred_filter) | (pred_filter == "any"))]
    st.download_button("Download as CSV", view.to_csv(index=False), file_name=f"{run.run_id}-misclassified.csv")
    for slot, row in enumerate(view.head(24).itertuples()):
        if slot % 6 == 0:
            cols = st.columns(6)  # a row of six: each image's buttons stay under it
        caption = f"{row.true} → {row.predicted} ({row.confidence:.0%})"  # an image caption is plain text
        try:
            cols[slot % 6].image(val_image(config.data, int(row.index), 96, thumb=192, work_dir=str(run.path)),
                                 width=96, caption=caption)
        except EngineError as exc:  # unreadable since training: one line in its place
            cols[slot % 6].caption(md(f"{caption}: {public_message(str(exc))}"))
        image_name = str(getattr(row, "image", "") or "")
        overrides_ui.controls(cols[slot % 6], config.data, image_name, row.true, names, decided,
                              key=f"mc-{image_name}", predicted=row.predicted)

st.subheader("Possibly mislabelled images")
st.caption("Every training and validation image scored by its loss under the best checkpoint, highest first: "
           "the model is sure of another class. Wrong labels in the training images are the ones that teach the "
           "model something false, and no evaluation looks there. A high loss is a lead, not a verdict.")
ranked_key = f"ev_ranked_{run.run_id}"
if st.button("Rank the images by loss") or st.session_state.get(ranked_key):
    st.session_state[ranked_key] = True
    try:
        ranking = mislabeled_for(str(run.path), mtime)
    except EngineError as exc:
        show_error(exc)
    else:
        st.caption(f"The {len(ranking['suspects'])} highest-loss of {ranking['images']} training and validation "
                   "images.")
        for slot, s in enumerate(ranking["suspects"]):
            if slot % 6 == 0:
                cols = st.columns(6)
            caption = (f"{s['image'].rsplit('/', 1)[-1]} · {s['split']}: {s['given']} → {s['predicted']} "
                       f"({s['probability']:.0%}), loss {s['loss']:.2f}")  # the file name: which one to look at
            try:
                cols[slot % 6].image(val_image(config.data, int(s["index"]), 96, thumb=192, work_dir=str(run.path)),
                                     width=96, caption=caption)
            except EngineError as exc:
                cols[slot % 6].caption(md(f"{caption}: {public_message(str(exc))}"))
            overrides_ui.controls(cols[slot % 6], config.data, s["image"], s["given"], names, decided,
                                  key=f"ml-{s['image']}", predicted=s["predicted"])

st.subheader("Grad-CAM: where does the model look?")
source = st.radio("Image", ["a validation image", "upload"], horizontal=True)
index, upload = None, None
if source == "upload":
    upload = st.file_uploader("Image", type=["jpg", "jpeg", "png", "webp", "bmp", "gif"])
    if upload is not None and (refusal := upload_refusal(upload.getvalue(), upload.name)) is not None:
        show_error(EngineError(refusal))  # said at once, not after a click on "Explain"
        upload = None
else:
    try:
        order, said = cam_choices(validation_images(str(run.path), mtime), report.misclassified)
    except EngineError as exc:
        show_error(exc)
        order, said = [], {}
    if order:
        index = st.selectbox(f"Validation image ({len(order)}, the misclassified first)", order,
                             format_func=lambda i: said.get(i, str(i)), key=f"ev_cam_image_{run.run_id}")
target = st.selectbox("Explain class", ["the predicted class"] + names)
asked = st.session_state.setdefault(CAM_ON, [])
if run.run_id not in asked:  # a backward pass through the model: only when asked for, then for every pick
    if (index is not None or upload is not None) and st.button("Explain with Grad-CAM"):
        asked.append(run.run_id)
        st.rerun()
elif index is not None or upload is not None:
    try:
        cam = explained(str(run.path), mtime, config.data, index, upload.getvalue() if upload else None,
                        upload.name if upload else "", None if target == "the predicted class" else names.index(target))
    except EngineError as exc:
        show_error(exc)
    else:
        c1, c2 = st.columns(2)
        c1.image(cam["input"], caption="input", width=224)
        c2.image(cam["overlay"], caption=f"{cam['class_name']} ({cam['probability']:.0%}), layer {cam['layer']}",
                 width=224)
