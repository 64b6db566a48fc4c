"""Inference: upload images (or use the camera) and see the top classes."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.core.errors import EngineError
from engine.core.paths import runs_root
from engine.outputs.predict import predict_sources
from engine.runs.calibration import run_temperature
from engine.runs.store import usable_runs
from ui.cache import load_model, load_trained, open_set_rule
from ui.charts import chart, stop_page
from ui.errors import public_message, show_error
from ui.state import SELECTED_RUN, active
from ui.text import md, plot_labels
from ui.widgets import pick_trained_run

PREVIEW_PX = 256  # the thumbnail shown beside each result
MOST_BARS = 20  # top-k goes up to this many classes, each bar labelled
BAR_PX, FRAME_PX = 30, 110  # a bar's height and the title, axis and margins around the bars
NAMED_CLASSES = 8  # "not one of: ..." names this many classes, then says how many more


def none_of(class_names: list[str]) -> str:
    """'not one of: cat, coffee, rocket' (the first few and how many more, for a run of many classes)."""
    shown = ", ".join(md(n) for n in class_names[:NAMED_CLASSES])
    more = len(class_names) - NAMED_CLASSES
    return f"**Not one of:** {shown}" + (f" and {more} more" if more > 0 else "")


def probability_chart(topk, tta: bool) -> go.Figure:
    """The top classes as horizontal bars, the most likely on top, every class named beside its bar and
    its probability at the end of it. The height follows the number of bars: at a fixed height a 3-class
    chart was a 15 px sliver whose axis named one bar of three. Class names come from the run's files:
    escaped for Plotly (ui.text.plot_labels), distinct even when two escape alike."""
    labels = plot_labels([t.label for t in topk])
    probs = [float(t.prob) for t in topk]
    fig = go.Figure(go.Bar(x=probs, y=labels, orientation="h", text=[f"{p:.1%}" for p in probs],
                           textposition="auto", marker_color="#2f6fde", hovertemplate="%{y}: %{x:.2%}<extra></extra>"))
    fig.update_layout(title=f"{labels[0]}: {probs[0]:.1%}" + (" (with TTA)" if tta else ""),
                      height=FRAME_PX + BAR_PX * len(labels), margin={"t": 50, "b": 40, "l": 10, "r": 10},
                      xaxis={"range": [0, 1], "tickformat": ".0%", "title": {"text": "probability"}},
                      yaxis={"type": "category", "autorange": "reversed", "tickmode": "array", "tickvals": labels,
                             "ticktext": labels, "automargin": True}, bargap=0.25)
    return fig


st.title("Inference")
finished = usable_runs(runs_root())
choice = st.radio("Predict with", ["the active model", "a trained run"], horizontal=True,
                  index=1 if finished and st.session_state.get(SELECTED_RUN) in [r.run_id for r in finished] else 0)
temperature = rule = None  # a calibrated run's: its probabilities are the calibrated ones (engine/runs/calibration.py)
try:
    if choice == "a trained run":
        run = pick_trained_run()
        handle = load_trained(str(run.path), run.checkpoint("best").stat().st_mtime)
        temperature = run_temperature(run)
        rule = open_set_rule(run, handle.spec.num_classes)  # is an image any of its classes? (engine/runs/open_set.py)
    else:
        handle = load_model(*active())
except EngineError as exc:
    show_error(exc)
    stop_page()
st.caption(f"{md(handle.spec.name)} · {handle.spec.num_classes} classes · input {handle.spec.input_size[-1]} px"
           + (" · probabilities as the model gives them (its validation split left nothing to calibrate)"
              if temperature == 1.0 else
              f" · probabilities calibrated on its validation split (temperature {temperature:.3g})"
              if temperature is not None else ""))

files = st.file_uploader("Images", type=["jpg", "jpeg", "png", "webp", "bmp", "gif"], accept_multiple_files=True)
use_camera = st.toggle("Use the camera")
shot = st.camera_input("Take a picture") if use_camera else None
classes = handle.spec.num_classes
top_k = st.slider("Top-k", 1, min(MOST_BARS, classes), min(5, classes)) if classes > 1 else 1
tta = st.toggle("Test-time augmentation (horizontal flip)", False,
                help="Also predict the mirror image and average the probabilities. Not for digits, letters "
                     "or text: they are not mirror-symmetric.")
if rule is not None and not st.toggle(
        "Say when an image is none of the classes", True,
        help=f"An image farther from every training image than {100 * rule.quantile:.0f}% of the validation images "
             f"are (cosine distance of the features the head sees, above {rule.threshold:.3f}) is called unknown "
             "instead of being given the nearest class. About 5% of new images of the run's own classes are "
             "flagged too."):
    rule = None

sources = [(f.name, f.getvalue()) for f in files or []]
if shot is not None:
    sources.append(("camera.jpg", shot.getvalue()))
if not sources:
    st.info("Upload one or more images to see predictions.")
    stop_page()

# Every upload is decoded once, bounded and reduced, by the engine (engine.data.images.open_image); the
# page shows that thumbnail, never the raw bytes (Streamlit would decode a huge file at full size).
# Results come back in upload order, one per upload: two files with the same name keep their own.
try:
    results = predict_sources(handle, sources, top_k=top_k, preview=PREVIEW_PX, tta=tta, temperature=temperature,
                              open_set=rule)
except EngineError as exc:
    show_error(exc)
    stop_page()
bad = [r for r in results if r.error]
if bad:
    st.warning(f"{len(bad)} file(s) could not be read:")
    st.dataframe(pd.DataFrame([{"file": r.file, "reason": public_message(r.error)}
                               for r in bad]), hide_index=True)
for slot, result in enumerate(results):
    if result.error or not result.topk:
        continue
    left, right = st.columns([1, 3])
    left.image(result.preview, caption=result.file, width="stretch")
    if result.unknown:
        nearest = result.topk[0]
        right.markdown(none_of(handle.spec.class_names))
        right.caption(f"nearest class: {md(nearest.label)} ({nearest.prob:.1%}) · distance to the nearest training "
                      f"image {result.unknown_score:.3f}, above the run's {result.unknown_threshold:.3f}")
        continue
    chart(right, probability_chart(result.topk, tta), key=f"pred-{slot}")
