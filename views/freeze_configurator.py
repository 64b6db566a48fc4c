"""Freeze Configurator: what trains, what BatchNorm does, the learning rates, and why."""
from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch

from engine.core.errors import EngineError
from engine.data.stamp import source_stamp
from engine.data.transforms import eval_transform
from engine.freeze.plan import FreezePlan
from engine.lab.advisor import batchnorm_train_eval_gap, estimate_similarity, recommend
from ui.cache import dataset_overview, dataset_sample, freeze_preview, load_model
from ui.charts import chart, stop_page
from ui.errors import show_error
from ui.state import PLAN, active
from ui.text import md
from ui.widgets import pick_data_source


def lr_text(value: object) -> str:
    """A stage's learning rate as the table shows it: a frozen stage has none ("frozen", never "nan")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value > 0:
        return f"{value:.2e}"
    return "frozen"


def data_classes() -> tuple[int | None, str | None]:
    """How many classes the session's data has (the data picked on the Training page, which a training
    would use), and its name; (None, None) when it cannot be read. Its overview is the cached one every
    page shares (the advisor below reads the same)."""
    from engine.data.library import resolve_dataset
    from ui.state import DATA

    ref = st.session_state.get(DATA)
    if not ref:
        return None, None
    try:
        source = resolve_dataset(ref)
        counts = dataset_overview(source, stamp=source_stamp(source)).get("counts") or {}
    except (EngineError, OSError):
        return None, None
    return (len(counts), str(ref)) if len(counts) >= 2 else (None, None)


def head_for(counted: int | None, own: int | None, data: str | None, pretrained: int) -> str:
    """Which classifier the counts below include, in words (markdown, the data's name escaped)."""
    if counted is None:
        return (f"the pretrained {pretrained}-class head: a training replaces it with one sized to your data's "
                "classes, so set the number of classes to count with that head")
    where = f" (your data's, {md(data)})" if counted == own and data else ""
    return f"a new {counted}-class head{where}, as a training on {counted} classes builds"


st.title("Freeze Configurator")
name, weights, classes = active()
own_classes, own_data = data_classes()
if st.session_state.get("fc_counted_of") != (classes, own_classes):  # the data or model changed: follow it
    st.session_state["fc_counted_of"] = (classes, own_classes)
    st.session_state["fc_counted_classes"] = classes or own_classes or 0
counted = int(st.number_input(
    "Classes the head is counted for (0: the pretrained head)", 0, 100_000, key="fc_counted_classes", help="Training replaces the pretrained head (ImageNet's: 1000 classes) with one "
    "for your classes, so the trainable count depends on it; the counts follow this number.")) or None
try:
    handle = load_model(name, weights, classes)
    pretrained_classes = load_model(name, weights, None).spec.num_classes
except EngineError as exc:
    show_error(exc)
    stop_page()
current = FreezePlan.from_dict(st.session_state[PLAN])
stage_names = [s["name"] for s in freeze_preview(name, weights, counted, json.dumps(FreezePlan.default().to_dict()))["stages"]]
backbone = [s for s in stage_names if s != "head"]

LABELS = {"feature-extraction": "Feature extraction (head only)", "full": "Full fine-tune",
          "last-n": "Last N stages", "custom": "Custom"}
# widget values live under their keys; they are seeded from the saved plan once (or after "apply advice")
DEFAULTS = {
    "fc_strategy": current.strategy, "fc_last_n": min(current.last_n, len(backbone)),
    "fc_stages": [s for s in current.stages if s in stage_names], "fc_patterns": ", ".join(current.patterns),
    "fc_bn": current.bn_policy, "fc_head_lr": current.head_lr, "fc_ratio": current.backbone_lr_ratio,
    "fc_decay": current.stage_lr_decay,
    "fc_schedule": FreezePlan.format_schedule(current.unfreeze_schedule),
}
for key, value in DEFAULTS.items():
    st.session_state.setdefault(key, value)

left, right = st.columns([2, 3])
with left:
    strategy = st.radio("Strategy", list(LABELS), format_func=LABELS.get, key="fc_strategy")
    last_n = st.slider("Backbone stages that train (from the top)", 0, max(1, len(backbone)), key="fc_last_n",
                       disabled=strategy != "last-n")
    chosen = st.multiselect("Stages that train", stage_names, key="fc_stages", disabled=strategy != "custom")
    patterns = st.text_input("Parameter name patterns that train (comma-separated globs)", key="fc_patterns",
                             disabled=strategy != "custom")
    bn = st.selectbox("BatchNorm in frozen stages", ["freeze", "adapt", "train"], key="fc_bn",
                      help="freeze: running stats never move, even after model.train(). adapt: stats follow "
                           "your data. train: BN weights train too.")
    head_lr = st.number_input("Head learning rate", 1e-6, 1.0, key="fc_head_lr", format="%.5f")
    ratio = st.number_input("Backbone LR ratio", 0.0, 10.0, key="fc_ratio", format="%.3f")
    decay = st.number_input("Per-stage LR decay (earlier stages)", 0.05, 1.0, key="fc_decay", format="%.2f")
    schedule = st.text_input("Gradual unfreezing: EPOCHS:STAGES, ...", key="fc_schedule",
                             help="e.g. '2:1, 3:3': after 2 epochs the top backbone stage trains too, after 3 epochs "
                                  "the top three.")

try:
    pairs = FreezePlan.parse_schedule(schedule)
    plan = FreezePlan(strategy=strategy, last_n=last_n, stages=tuple(chosen),
                      patterns=tuple(p.strip() for p in patterns.split(",") if p.strip()), bn_policy=bn,
                      head_lr=head_lr, backbone_lr_ratio=ratio, stage_lr_decay=decay, unfreeze_schedule=pairs)
    report = freeze_preview(name, weights, counted, json.dumps(plan.to_dict()))
except (EngineError, ValueError) as exc:
    show_error(exc if isinstance(exc, EngineError) else EngineError(f"Unreadable unfreezing schedule: {exc}"))
    stop_page()
st.session_state[PLAN] = plan.to_dict()

with right:
    m1, m2, m3 = st.columns(3)
    m1.metric("Trainable", f"{report['trainable_params']:,}", f"{report['trainable_pct']:.1f}%", delta_color="off")
    m2.metric("Frozen", f"{report['frozen_params']:,}")
    m3.metric("BN layers held fixed", report["frozen_bn_count"])
    st.caption(f"Counted with {head_for(counted, own_classes, own_data, pretrained_classes)}.")
    rows = pd.DataFrame(report["stages"])
    fig = go.Figure([go.Bar(name="trainable", x=rows["name"], y=rows["trainable"], marker_color="#2f6fde"),
                     go.Bar(name="frozen", x=rows["name"], y=rows["frozen"], marker_color="#b8c2cc")])
    fig.update_layout(barmode="stack", title="Parameters per stage", yaxis_title="parameters", height=360)
    chart(st, fig)
    rows["lr"] = rows["lr"].map(lr_text)
    rows["BN fixed"] = rows["bn_fixed"].astype(str) + "/" + rows["bn_layers"].astype(str)
    st.dataframe(rows[["name", "params", "trainable", "lr", "BN fixed"]], hide_index=True)

st.divider()
st.subheader("Advisor: how much data, how similar a task?")
try:
    sample_source = pick_data_source(key="advisor_data")  # the session's data, as on every page
    overview = dataset_overview(sample_source, stamp=source_stamp(sample_source)) if sample_source else None
except EngineError as exc:
    show_error(exc)
    sample_source, overview = None, None
if overview and overview.get("counts") and st.session_state.get("adv_counts_of") != sample_source:
    counts = list(overview["counts"].values())  # the data picked, not a made-up example (the user may edit)
    st.session_state["adv_counts_of"] = sample_source
    st.session_state["adv_per_class"] = max(1, min(counts))
    st.session_state["adv_classes"] = max(2, len(counts))
st.session_state.setdefault("adv_per_class", 180)
st.session_state.setdefault("adv_classes", 10)
a1, a2, a3 = st.columns(3)
per_class = a1.number_input("Images per class", 1, 1_000_000, key="adv_per_class",
                            help="The smallest class of the data picked above.")
n_classes = a2.number_input("Classes", 2, 100_000, key="adv_classes")
similarity = a3.selectbox("Similar to ImageNet photos?", ["estimate from data", "similar", "in between", "different"])
if similarity == "estimate from data":
    if st.button("Estimate similarity (linear probe on frozen features)", disabled=sample_source is None):
        images, labels = dataset_sample(sample_source, stamp=source_stamp(sample_source))
        with st.spinner("Extracting features..."):
            evidence = estimate_similarity(handle, images, labels, image_size=96).to_dict()
        st.session_state["similarity_evidence"] = {**evidence, "data": sample_source}
    saved = st.session_state.get("similarity_evidence")
    if saved and saved.get("data") == sample_source:  # measured on this data, never on another
        st.caption(f"Probe accuracy {saved['probe_accuracy']:.1%} (chance {saved['chance']:.0%}) -> "
                   f"score {saved['score']:.2f}: **{saved['verdict']}**. {saved['method']}.")
        similarity_value = saved["score"]
    else:
        similarity_value = None
else:
    similarity_value = similarity
if similarity_value is not None:
    advice = recommend(per_class, n_classes, similarity_value)
    st.success(f"**{LABELS[advice.strategy]}** ({advice.data_amount} data, {advice.similarity} task). {advice.explanation}")
    if st.button("Apply this advice"):
        st.session_state[PLAN] = advice.plan
        for key in DEFAULTS:  # re-seed the widgets from the new plan
            del st.session_state[key]
        st.rerun()

st.subheader("The BatchNorm pitfall, measured")
st.markdown("A frozen backbone left in `train()` mode normalises with batch statistics: its features are "
            "not the pretrained ones. Below: the same batch through the backbone in train vs eval mode.")
if st.button("Measure train-vs-eval feature difference", disabled=sample_source is None):
    images, _ = dataset_sample(sample_source, per_class=2, stamp=source_stamp(sample_source))
    x = torch.stack([eval_transform(handle.spec, 96)(im) for im in images[:16]])
    gap = batchnorm_train_eval_gap(handle, x)
    st.session_state["bn_gap"] = gap.to_dict()
if st.session_state.get("bn_gap"):
    gap = st.session_state["bn_gap"]
    g1, g2, g3 = st.columns(3)
    g1.metric("BatchNorm layers", gap["bn_layers"])
    g2.metric("Mean |train - eval|", f"{gap['mean_abs']:.4f}")
    g3.metric("Relative to feature size", f"{gap['relative']:.1%}")
