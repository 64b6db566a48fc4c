"""Feature space: the images as the head sees them, drawn in 2-D, with how well the classes separate.

Two maps: the active (pretrained) model on a dataset, or a run beside its pretrained backbone on the
run's own validation images. The score is the leave-one-out k-NN accuracy in the full feature space
(engine.lab.feature_map); the 2-D picture is only a projection of it.

Images and the hover: the hover names each point's file and class, and a click, box or lasso
selection (Streamlit's ``on_select="rerun"`` on the chart) shows the selected images below the map, decoded
reduced through the engine (``ImageSet.image(i, target=...)``, at most ``THUMBS`` of ``THUMB_PX`` px).
Not a picture inside the hover: plotly.js draws hover labels from a short whitelist of tags (b, i,
br, span, a, sub, sup, em), so an ``<img>`` in a hovertemplate is dropped and a base64 thumbnail in
``customdata`` would only grow the message (measured: 1.2 kB base64 JPEG, 2.5 kB PNG per 32 px
image, 250-500 kB for 200 points) without ever showing. With hover text alone the figure JSON stays
small (measured: 21 kB for 200 points, 87 kB at the 1000-image maximum); thumbnails travel as media
files, only for what was selected.
"""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.core.hosting import hosted_limits
from engine.data.stamp import source_stamp
from ui.cache import load_model, model_feature_map, run_feature_maps, umap_problem, val_image
from ui.charts import chart, stop_page
from ui.errors import public_message, show_error
from ui.state import active, weights_label
from ui.text import md, plot, plot_labels
from ui.widgets import pick_data_source, pick_trained_run

THUMBS = 24  # images shown for a selection
THUMB_PX = 64


def _shown(source: str) -> str:
    """A sample as a person knows it: 'cats/001.jpg' or 'digits[17]', never a server path."""
    parts = Path(source).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else source


def _palette(n: int) -> list[str]:
    colours = px.colors.qualitative.Plotly if n <= 10 else px.colors.qualitative.Alphabet
    return [colours[i % len(colours)] for i in range(n)]


def _chance(fmap) -> float:
    """What guessing the commonest class scores: the floor a k-NN accuracy is read against."""
    return max(Counter(fmap.labels).values()) / len(fmap.labels) if fmap.labels else 0.0


def _score(fmap) -> str:
    acc = "n/a" if fmap.knn_acc != fmap.knn_acc else f"{fmap.knn_acc:.2f}"  # NaN: fewer than two images
    return f"k-NN accuracy {acc} in {fmap.dims}-D features"


def _figure(fmap, heading: str) -> tuple[go.Figure, list[list[int]]]:
    """One trace per class (the same colour per class on both maps); returns the map positions of
    each trace's points, to turn a selection back into images."""
    colours = _palette(len(fmap.class_names))
    fig = go.Figure()
    positions: list[list[int]] = []
    for c, name in enumerate(plot_labels(fmap.class_names)):  # legend and hover draw HTML: names escaped
        mine = [i for i, y in enumerate(fmap.labels) if y == c]
        if not mine:
            continue
        positions.append(mine)
        fig.add_trace(go.Scatter(
            x=[fmap.points[i][0] for i in mine], y=[fmap.points[i][1] for i in mine], mode="markers", name=name,
            marker={"size": 7, "color": colours[c], "opacity": 0.8}, customdata=mine,
            hovertext=[f"{name}: {plot(_shown(fmap.sources[i]))}" for i in mine], hoverinfo="text"))
    axis = "PC" if fmap.method == "pca" else "UMAP "
    labels = [f"{axis}{a + 1}" + (f" ({fmap.explained[a]:.0%} of variance)" if len(fmap.explained) > a else "")
              for a in range(2)]
    fig.update_layout(title={"text": f"{plot(heading)}: {_score(fmap)}", "font": {"size": 15}}, height=460,
                      xaxis_title=labels[0], yaxis_title=labels[1], legend_title_text="class",
                      margin={"t": 60, "b": 40})
    return fig, positions


def _selected(event, positions: list[list[int]]) -> list[int]:
    """Map positions of the selected points (customdata when the browser sends it, else trace + index)."""
    picked: list[int] = []
    flat = sum(len(p) for p in positions)  # points on the map
    for pt in (event.selection.points if event else []):
        data = pt.get("customdata")
        if isinstance(data, list):
            data = data[0] if data else None
        if data is None:
            curve, index = pt.get("curve_number"), pt.get("point_index", pt.get("point_number"))
            if curve is None or index is None or curve >= len(positions) or index >= len(positions[curve]):
                continue
            data = positions[curve][index]
        if 0 <= int(data) < flat and int(data) not in picked:
            picked.append(int(data))
    return picked


def _plot(fmap, heading: str, data: str, key: str, where, work_dir: str | None = None, stamp: tuple = ()) -> None:
    """The map, then the images of whatever is selected on it (a run's map: its data read through the run's
    folder, ``work_dir``, as it trained on it, so the map's indices name the same images)."""
    fig, positions = _figure(fmap, heading)
    with where:
        event = chart(st, fig, key=key, on_select="rerun", selection_mode=("points", "box", "lasso"))
        picked = _selected(event, positions)
        if not picked:
            st.caption("Hover a point for its file; click, box or lasso points to see their images.")
            return
        st.caption(f"{len(picked)} selected" + (f", the first {THUMBS} shown" if len(picked) > THUMBS else ""))
        cols = st.columns(6)
        for slot, i in enumerate(picked[:THUMBS]):
            caption = f"{fmap.class_names[fmap.labels[i]]}: {_shown(fmap.sources[i])}"  # plain text on an image
            try:
                image = val_image(data, fmap.indices[i], THUMB_PX, thumb=THUMB_PX, work_dir=work_dir, stamp=stamp)
            except EngineError as exc:  # unreadable since it was embedded: the reason in its place
                cols[slot % 6].caption(md(f"{caption}: {public_message(str(exc))}"))
            else:
                cols[slot % 6].image(image, width=THUMB_PX, caption=caption)


def votes_line(used: int, asked: int, labels: list[int]) -> str:
    """Which k the score used, and why when it is below the k asked for: a leave-one-out vote can use at
    most one neighbour fewer than the smallest class has images ("1 neighbours vote" under k = 5 read
    as a bug)."""
    said = f"{used} neighbour{'s' if used != 1 else ''} vote{'s' if used == 1 else ''}"
    if used >= asked:
        return f"{said}."
    smallest = min(Counter(labels).values(), default=0)
    own = max(smallest - 1, 0)
    return (f"{said}, not the {asked} asked for: the smallest class has {smallest} image"
            f"{'s' if smallest != 1 else ''} here, so an image has at most {own} neighbour{'s' if own != 1 else ''} "
            "of its own class (with more voters, a well-separated small class would be outvoted).")


def _gain(fmap) -> float:
    """How far above guessing, on a 0 (chance) .. 1 (perfect) scale."""
    chance = _chance(fmap)
    return (fmap.knn_acc - chance) / (1 - chance) if chance < 1 else 0.0


def _reading_pretrained(fmap, weights: str) -> str:
    chance, gain = _chance(fmap), _gain(fmap)
    base = f"k-NN accuracy **{fmap.knn_acc:.2f}** (guessing the commonest class: {chance:.2f}). "
    if weights == "none":
        return base + ("These are random weights (`none`): the from-scratch baseline. Pick packaged or hub weights "
                       "to see what pretraining already separates.")
    if gain >= 0.7:
        return base + ("The pretrained features already separate these classes: the task is close to what the "
                       "backbone learned (the *similar* column of the data x similarity matrix). Feature extraction, "
                       "a frozen backbone under a new head, should suffice; with plenty of data, unfreezing the last "
                       "stages adds a little.")
    if gain >= 0.3:
        return base + ("Partly separated: train a new head first, then unfreeze the last stages (last-N); the more "
                       "images per class, the more of the backbone can train without overfitting.")
    return base + ("The pretrained features barely separate these classes: the task is far from ImageNet (the "
                   "*dissimilar* column of the matrix). A new head alone will be weak; fine-tune the backbone, more "
                   "of it as the data grows.")


def _reading_run(before, after) -> str:
    delta = after.knn_acc - before.knn_acc
    base = (f"Pretrained **{before.knn_acc:.2f}** → after fine-tune **{after.knn_acc:.2f}** on the same "
            f"{len(after.labels)} validation images (guessing: {_chance(after):.2f}). ")
    if _gain(before) >= 0.7:
        return base + ("The classes were separable before any training: a task this similar to ImageNet needs little "
                       "beyond feature extraction, a new head on frozen features.")
    if delta >= 0.15:
        return base + ("Fine-tuning raised separability a lot: the task was far from ImageNet, and training the "
                       "backbone, not only a head, is what made the classes separable (the *dissimilar* column of the "
                       "data x similarity matrix).")
    return base + ("Fine-tuning moved separability little: the backbone hardly changed (feature extraction keeps it "
                   "frozen; few images or epochs move it little). If the score is low on both, the task is far from "
                   "ImageNet: unfreeze more stages, train longer or add data.")


DRAWN = "fm_drawn"  # what the user last asked to map: a first visit computes nothing
PACE = "fm_pace"  # seconds per image of the last map drawn here, for the next estimate


def asked_for(request: tuple, images: int) -> None:
    """Stop the page with a button (and an estimate) until the user asks for this map; a map already
    asked for shows again at once (its result is cached)."""
    if st.session_state.get(DRAWN) == request:
        return
    pace = st.session_state.get(PACE)
    estimate = (f"about {max(1, round(pace * images))} s at the pace of the last map" if pace
                else "the first map also loads the model")
    if st.button("Draw the map", type="primary", help=f"Reads up to {images} validation images through the model."):
        st.session_state[DRAWN] = request
        return
    st.caption(f"Nothing is computed until you ask: drawing reads up to {images} images through the model "
               f"({estimate}).")
    stop_page()


@contextmanager
def timed(images: int) -> Iterator[None]:
    """Records the pace of a map that was really computed (a cached one takes no time and is not counted)."""
    start = time.perf_counter()
    yield
    took = time.perf_counter() - start  # not reached when the map failed: its time says nothing
    if took > 1.0:
        st.session_state[PACE] = took / max(1, images)


st.title("Feature space")
st.caption("The features that enter the classifier, for validation images, projected to 2-D (one colour per class). "
           "The score is how well the classes separate in the full feature space: the leave-one-out k-nearest-"
           "neighbour accuracy (cosine distance). This is the picture behind the data x similarity matrix: a "
           "similar task is already separable before training, a dissimilar one only after fine-tuning.")

mode = st.radio("Map", ["a pretrained model", "a run"], horizontal=True, key="fm_mode")
problem = umap_problem()
c1, c2, c3 = st.columns(3)
method = c1.radio("Projection", ["pca", "umap"], format_func=str.upper, horizontal=True, key="fm_method",
                  disabled=problem is not None, help=problem)
if problem is not None:
    method = "pca"
    c1.caption(problem)
k = int(c2.number_input("k (neighbours that vote)", 1, 25, 5, key="fm_k"))
max_images = int(c3.slider("Max images", 20, 1000, 200, step=20, key="fm_max",
                           help="Validation images on the map, taken evenly over classes."))

if mode == "a pretrained model":
    name, weights, classes = active()
    try:
        own = int(load_model(name, weights, classes).spec.input_size[-1])  # the sidebar's model, cached
    except Exception as exc:  # noqa: BLE001 - over the hosted caps, offline hub, bad file: a message
        show_error(exc)
        stop_page()
    limits = hosted_limits()
    top = limits.image_size if limits else 512
    if st.session_state.get("fm_size_model", name) != name:  # another model: start from its own size
        st.session_state["fm_size"] = min(own, top)
    st.session_state.setdefault("fm_size", min(own, top))
    st.session_state["fm_size_model"] = name
    d1, d2 = st.columns([3, 1])
    with d1:
        try:
            data = pick_data_source(key="fm_data")
        except EngineError as exc:
            show_error(exc)
            data = None
    size = int(d2.number_input("Image size (px)", 32, top, step=16, key="fm_size",
                               help=f"{name} was built for {own} px; smaller is faster."))
    if data is None:
        stop_page()
    st.caption(f"Active model **{name}** · weights `{weights_label(weights)}` (change it on the Model Explorer)")
    try:
        stamp = source_stamp(data)  # the data as it stands: a relabel or an exclusion maps again
        asked_for(("model", name, weights, data, size, method, k, max_images, stamp), max_images)
        with timed(max_images):
            fmap = model_feature_map(name, weights, data, size, method, k, max_images, stamp)
    except Exception as exc:  # noqa: BLE001 - no data, unreadable data, a model that cannot run: a message
        show_error(exc)
        stop_page()
    left, right = st.columns([3, 2])
    _plot(fmap, "pretrained", data, "fm_plot_model", left, stamp=stamp)
    right.caption(votes_line(fmap.k, k, fmap.labels))
    right.markdown(_reading_pretrained(fmap, weights))
else:
    run = pick_trained_run()
    mtime = run.checkpoint("best").stat().st_mtime
    data = TrainConfig.from_dict(run.config()).data
    asked_for(("run", run.run_id, mtime, method, k, max_images), 2 * max_images)
    try:
        with timed(2 * max_images):
            before, after = run_feature_maps(str(run.path), mtime, method, k, max_images)
    except Exception as exc:  # noqa: BLE001 - data gone or unreadable since training: a message
        show_error(exc)
        stop_page()
    st.caption(f"{md(before.model)} beside {md(after.model)}, on the same {len(after.labels)} validation images; "
               f"{votes_line(after.k, k, after.labels)}")
    left, right = st.columns(2)
    _plot(before, "pretrained", data, "fm_plot_before", left, str(run.path))
    _plot(after, "after fine-tune", data, "fm_plot_after", right, str(run.path))
    st.markdown(_reading_run(before, after))
