"""The Training page's learning-rate finder: start a sweep in the background, watch the loss against
the LR, and take the suggestion into the freeze plan with one click.

The sweep is the engine's (engine/lab/lr_find.py): its own process, in the device's queue like a
training, on a fresh copy of the model; nothing is saved to a run. This panel only reads its file.
"""
from __future__ import annotations

from typing import Callable

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.freeze.plan import FreezePlan
from engine.lab.lr_find import SweepJob, start_sweep
from ui.charts import chart
from ui.errors import show_error
from ui.state import PLAN
from ui.text import md

JOB = "lr_find_job"  # this session's sweep: the path of its JSON file


def _plot(points: list, suggestion: float | None, head_lr: float) -> None:
    frame = pd.DataFrame(points, columns=["learning rate", "loss"])
    fig = px.line(frame, x="learning rate", y="loss", log_x=True, markers=len(frame) < 60,
                  title="Loss against the head LR (one optimizer step each)")
    if suggestion:
        fig.add_vline(x=suggestion, line_dash="dash", annotation_text=f"suggested {suggestion:.1e}")
    fig.add_vline(x=head_lr, line_dash="dot", line_color="grey", annotation_text=f"plan {head_lr:g}",
                  annotation_position="bottom right")
    upper = frame["loss"].iloc[: max(3, len(frame) // 10)].max() * 1.5  # a blown-up tail would flatten the rest
    fig.update_yaxes(range=[frame["loss"].min() * 0.95, upper])
    chart(st, fig, key="lr-find-plot")


ACTIVE = ("queued", "running")


def _progress(job: SweepJob, data: dict) -> None:
    """Where the sweep is: steps done of all, and the time left at the pace this page has seen."""
    import time

    steps = int(data.get("steps") or 0) or 1
    done = len(data.get("points") or [])
    first = st.session_state.setdefault(f"_lr_pace_{job.path.name}", {})  # when this page first saw steps
    if done and not first:
        first.update(t=time.time(), n=done)
    left = ""
    if first and done > first["n"]:
        pace = (time.time() - first["t"]) / (done - first["n"])
        left = f", about {max(1, round(pace * (steps - done)))} s left"
    text = (f"Sweep running: step {done} of {steps}{left}" if data.get("state") == "running" and done
            else f"Sweep {md(data.get('state', 'queued'))}: {md(data.get('reason') or 'waiting for the device')}")
    st.progress(min(1.0, done / steps), text=text)


def _show(job: SweepJob) -> tuple:
    """The sweep's progress, plot and result; returns its state (what the page around it depends on)."""
    data = job.status()
    state = data.get("state", "queued")
    plan = FreezePlan.from_dict(st.session_state[PLAN])
    if state in ACTIVE:
        _progress(job, data)
        if st.button("Cancel the sweep", key="lr-find-cancel"):
            job.cancel()
    if data.get("points"):
        sweep = data.get("sweep") or {}
        _plot(data["points"], sweep.get("suggestion"), plan.head_lr)
    if state == "finished":
        sweep = data.get("sweep") or {}
        suggestion = sweep.get("suggestion")
        st.caption(f"{md(data.get('reason', ''))}. Rule: {sweep.get('rule', '')}; the minimum's LR / 10 is "
                   f"{sweep.get('min_over_10') or 0:.1e}.")
        if suggestion is None:
            st.warning("No suggestion: the loss never fell in this range. Try other settings or a longer sweep.")
        elif st.button(f"Use {suggestion:.1e} as the head LR", type="primary", key="lr-find-apply"):
            st.session_state[PLAN] = FreezePlan.from_dict({**st.session_state[PLAN], "head_lr": float(f"{suggestion:.2e}")}).to_dict()
            st.rerun()  # the whole page: the settings, the sidebar and the URL show the new plan
    elif state in ("cancelled", "failed", "interrupted"):
        st.warning(f"Sweep {md(state)}: {md(data.get('reason', ''))}")  # the reason may name the user's files
    return (state,)


def _estimate(make_config: Callable[[], TrainConfig], steps: int) -> str:
    """Before the sweep: how long it should take, from a run of this model and size on this machine."""
    from engine.core.paths import runs_root
    from engine.runs.estimate import measured_speed

    try:
        config = make_config()
    except EngineError:
        return ""
    speed = measured_speed(runs_root(), config.model, config.image_size, config.freeze_plan().strategy)
    if speed is None:
        return " No run of this model at this size has trained here yet, so there is no estimate of its time."
    return f" Estimate: {speed.describe(steps * config.batch_size)} after the set-up."


AUTO_NOTE = ("The workbench chooses the plan and its learning rates at Start, so a sweep of your plan's "
             "LR would not be used: turn off *Let the workbench choose the plan* to sweep it.")


def lr_finder(make_config: Callable[[], TrainConfig], enabled: bool, auto_plan: bool = False) -> None:
    """A sweep of the head LR for the config the page would train now (``make_config``). Not in an
    expander: one collapsed when the sweep started, and nothing moved on screen for its 30 s.
    ``auto_plan``: the run will choose its own plan and LRs, so the sweep is off and says why."""
    from ui.live import live

    with st.container(border=True):
        st.markdown("**Find a learning rate**")
        left, right = st.columns([1, 3], vertical_alignment="bottom")
        steps = int(left.number_input("Sweep steps", 20, 1000, 100, step=20, key="lr_find_steps", persist_state="session"))
        right.caption(f"An exponential sweep of the head learning rate over {steps} steps (one batch each) on a "
                      "fresh copy of the model, with your freeze plan (every stage keeps its LR ratio to the head). "
                      "Nothing is saved to a run; it waits for the device like a training."
                      + _estimate(make_config, steps))
        box = st.container()
        if auto_plan:
            st.info(AUTO_NOTE, icon=":material/auto_awesome:")
        if st.button("Start the sweep", disabled=not enabled or auto_plan):
            try:
                job = start_sweep(make_config(), steps=steps)
            except EngineError as exc:
                show_error(exc, box)
            else:
                st.session_state[JOB] = str(job.path)
        if JOB in st.session_state:
            job = SweepJob(st.session_state[JOB])
            running = job.status().get("state", "queued") in ACTIVE
            if running:
                live("lr_find", lambda: _show(job), active=True)
            else:
                _show(job)
