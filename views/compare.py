"""Compare strategies: frozen vs fine-tuned on the same data, split, budget and seed."""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.core.errors import EngineError
from engine.core.paths import runs_root
from engine.freeze.plan import FreezePlan
from engine.lab.compare import (
    comparison_table,
    create_comparison,
    curves,
    demo_config,
    demo_plans,
    group_runs,
    list_groups,
    matrix_advice,
)
from engine.lab.race_registry import list_races
from engine.runs.background import request_cancel, start_group_background
from engine.runs.store import active_runs
from ui.charts import chart, stop_page
from ui.errors import safe_fragment, show_error
from ui.live import live
from ui.race_panel import race_launcher, race_view
from ui.state import PLAN, active
from ui.text import md, plot
from ui.widgets import pick_data_source

st.title("Compare strategies")
st.markdown(
    "Train several freezing strategies on **the same data, split, epochs and seed**, then compare them "
    "per epoch and per second of wall-clock time. The default demo pits a frozen feature extractor "
    "against full fine-tuning on handwritten digits: a task *unlike* ImageNet photos, with enough data "
    "(~180 images per class), the corner of the matrix where fine-tuning should win."
)
GROUP = "compare_group"


def launch(base, plans: dict[str, FreezePlan]) -> None:
    """Create the comparison's runs, train them in the background, and show this comparison."""
    runs = create_comparison(runs_root(), base, plans)
    start_group_background(runs, runs_root())
    st.session_state[GROUP] = runs[0].config()["group"]
    st.rerun()


def demo_estimate(name: str) -> str:
    """How long the demo should take here, from runs of this model at 96 px (each plan at its own speed)."""
    from engine.runs.estimate import format_duration, measured_speed

    base = demo_config()
    images = 1437 * base.epochs  # digits: 80% of 1,797 images train, each epoch (validation adds a little)
    speeds = [measured_speed(runs_root(), name, base.image_size, plan.strategy) for plan in demo_plans().values()]
    if any(s is None for s in speeds):
        return "No estimate yet: the demo's first run here measures this machine."
    return f"Estimate: about {format_duration(sum(s.seconds(images) for s in speeds))} of training on this machine."


def queue_line() -> tuple:
    """How many jobs are ahead of a comparison started now, and the current comparison's progress."""
    active = [r for r in active_runs(runs_root()) if not r.status().on_cluster]  # a cluster run holds no device here
    busy = {r.config_or_empty().get("group") or r.run_id for r in active}  # a group is one job
    if busy:
        st.info(f"{len(busy)} training job{'s are' if len(busy) > 1 else ' is'} running or waiting on this machine: a "
                "comparison you start now joins the queue and starts by itself when the device is free.")
    current = st.session_state.get(GROUP)
    shown = ()
    if current:
        runs = group_runs(runs_root(), current)
        running = next((r for r in runs if r.status().active), None)
        if running is not None:
            status = running.status()
            order = runs.index(running) + 1
            text = f"Comparison: '{md(running.config().get('label'))}' ({order} of {len(runs)})"
            if status.state == "queued":
                st.caption(f"{text} waits for the device{f' (number {status.queue_position} in line)' if status.queue_position else ''}.")
            else:
                epochs = status.epochs or 1
                st.progress(status.progress.fraction(epochs) if status.progress else 0.0,
                            text=f"{text}: " + (status.progress.describe(epochs) if status.progress else "preparing"))
        shown = tuple((r.run_id, r.status().state) for r in runs)
    return tuple(sorted(busy)), shown


left, right = st.columns(2)
with left:
    name, weights, _ = active()
    estimate = demo_estimate(name)  # read once: it lists the runs and their metrics
    if st.button("Run the default demo (digits, 96 px, 2 epochs each)", type="primary",
                 help=f"Feature extraction against full fine-tuning. {estimate}"):
        base = demo_config()
        try:
            launch(replace(base, model=name, weights=weights), demo_plans())
        except EngineError as exc:
            show_error(exc)
    st.caption(estimate)
with right:
    with st.popover("Custom comparison"):
        try:
            data = pick_data_source(key="cmp_data")
        except EngineError as exc:
            show_error(exc)
            data = None
        kept = {"persist_state": "session"}  # as the user left them, after a visit to another page
        epochs = st.number_input("Epochs each", 1, 100, 2, key="cmp_epochs", **kept)
        size = st.number_input("Image size", 16, 512, 96, step=16, key="cmp_size", **kept)
        choices = st.multiselect("Strategies", ["feature extraction", "full fine-tune", "last 2 stages",
                                                "my plan (Freeze Configurator)"],
                                 default=["feature extraction", "full fine-tune"], key="cmp_plans", **kept)
        if st.button("Start comparison", disabled=len(choices) < 2 or data is None):
            presets = {**demo_plans(), "last 2 stages": FreezePlan.last(2, head_lr=2e-3, backbone_lr_ratio=1.0),
                       "my plan (Freeze Configurator)": FreezePlan.from_dict(st.session_state[PLAN])}
            base = replace(demo_config(), model=name, weights=weights, data=data, epochs=int(epochs), image_size=int(size))
            try:
                launch(base, {c: presets[c] for c in choices})
            except EngineError as exc:
                show_error(exc)
live("compare_queue", queue_line, active=bool(active_runs(runs_root())))

race_launcher()
race_view()
races = set(list_races(runs_root()))
groups = [g for g in list_groups(runs_root()) if g not in races]  # races are shown by race_view
if not groups:
    st.info("No comparison yet: run the demo.")
    stop_page()
current = st.session_state.get(GROUP)
group = st.selectbox("Comparison", groups, index=groups.index(current) if current in groups else 0)
st.session_state[GROUP] = group


def panel() -> None:
    runs = group_runs(runs_root(), group)
    table = pd.DataFrame(comparison_table(runs))
    running = [r for r in runs if r.status().active]
    if running:
        status = running[0].status()
        epochs = status.epochs or 1
        st.progress(status.progress.fraction(epochs) if status.progress else 0.0,
                    text=f"training '{running[0].config().get('label')}'" +
                         (f": {status.progress.describe(epochs)}" if status.progress else " (preparing)"))
        if st.button("Cancel comparison"):
            for run in runs:
                request_cancel(run)
    points = pd.DataFrame(curves(runs))
    if not points.empty:  # labels come from run folders, which bundles can bring: text, never markup
        points["strategy"] = points["strategy"].map(plot)
    if not points.empty:
        c1, c2 = st.columns(2)
        by_epoch = px.line(points, x="epoch", y="val_acc", color="strategy", markers=True,
                           title="Validation accuracy per epoch", range_y=[0, 1])
        by_time = px.line(points, x="elapsed_s", y="val_acc", color="strategy", markers=True, range_y=[0, 1],
                          title="Validation accuracy per second of training", labels={"elapsed_s": "wall-clock seconds"})
        chart(c1, by_epoch, key="by_epoch")
        chart(c2, by_time, key="by_time")
    st.dataframe(table, hide_index=True)
    done = table.dropna(subset=["best_val_acc"]) if not table.empty else table
    if len(done) >= 2 and not running:
        best = done.sort_values("best_val_acc", ascending=False).iloc[0]
        advice = matrix_advice(runs[0].config())
        st.success(f"**{md(best['strategy'])}** reached the best validation accuracy ({best['best_val_acc']:.1%}).")
        if advice:
            st.markdown(f"Why, by the matrix: {advice.explanation}")


active_now = any(r.status().active for r in group_runs(runs_root(), group))
safe_fragment(panel, run_every=1.0 if active_now else None)()
