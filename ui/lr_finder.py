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
from ui.errors import show_error
from ui.state import PLAN

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
    st.plotly_chart(fig, key="lr-find-plot")


ACTIVE = ("queued", "running")


def _show(job: SweepJob, live: bool = False) -> None:
    data = job.status()
    state = data.get("state", "queued")
    if live and state not in ACTIVE:
        st.rerun()  # the whole page: the panel stops polling and shows the result
    plan = FreezePlan.from_dict(st.session_state[PLAN])
    if state in ACTIVE:
        st.info(f"Sweep {state}: {data.get('reason', '')}.")
        if st.button("Cancel the sweep", key="lr-find-cancel"):
            job.cancel()
    if data.get("points"):
        sweep = data.get("sweep") or {}
        _plot(data["points"], sweep.get("suggestion"), plan.head_lr)
    if state == "finished":
        sweep = data.get("sweep") or {}
        suggestion = sweep.get("suggestion")
        st.caption(f"{data.get('reason', '')}. Rule: {sweep.get('rule', '')}; the minimum's LR / 10 is "
                   f"{sweep.get('min_over_10') or 0:.1e}.")
        if suggestion is None:
            st.warning("No suggestion: the loss never fell in this range. Try other settings or a longer sweep.")
        elif st.button(f"Use {suggestion:.1e} as the head LR", type="primary", key="lr-find-apply"):
            st.session_state[PLAN] = FreezePlan.from_dict({**st.session_state[PLAN], "head_lr": float(f"{suggestion:.2e}")}).to_dict()
            st.rerun()  # the whole page: the settings show the new plan
    elif state in ("cancelled", "failed", "interrupted"):
        st.warning(f"Sweep {state}: {data.get('reason', '')}")


@st.fragment(run_every=1.0)
def _live(job: SweepJob) -> None:
    """Only this panel reruns each second while the sweep is queued or running."""
    _show(job, live=True)


def lr_finder(make_config: Callable[[], TrainConfig], enabled: bool) -> None:
    """A sweep of the head LR for the config the page would train now (``make_config``)."""
    with st.expander("Find a learning rate", expanded=JOB in st.session_state):
        st.caption("An exponential sweep of the head learning rate over a few hundred steps on a fresh copy of the "
                   "model, with your freeze plan (every stage keeps its LR ratio to the head). Nothing is saved to a "
                   "run; it waits for the device like a training.")
        steps = st.number_input("Sweep steps", 20, 1000, 100, step=20)
        box = st.container()
        if st.button("Start the sweep", disabled=not enabled):
            try:
                job = start_sweep(make_config(), steps=int(steps))
            except EngineError as exc:
                show_error(exc, box)
            else:
                st.session_state[JOB] = str(job.path)
        if JOB in st.session_state:
            job = SweepJob(st.session_state[JOB])
            if job.status().get("state", "queued") in ACTIVE:
                _live(job)
            else:
                _show(job)
