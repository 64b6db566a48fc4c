"""The Compare page's race: freeze plans under a wall-clock budget (engine/lab/race.py).

Start one in the background, then a leaderboard, validation accuracy per second of the race (one
line per plan, a dotted line at the budget) and the winner, a normal run one click away from
the Evaluate page.
"""
from __future__ import annotations

import time

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.core.files import read_json
from engine.core.hosting import hosted_limits
from engine.core.paths import runs_root
from engine.lab.race import (
    LABELS,
    PLANS,
    check_budget,
    create_race,
    leaderboard,
    list_races,
    race_curves,
    race_runs,
    race_spec,
    race_winner,
    rung_sizes,
    start_race_background,
)
from engine.runs.background import request_cancel
from ui.errors import show_error
from ui.state import SELECTED_RUN, active

RACE = "race_group"


def race_launcher() -> None:
    """Pick plans and a budget; the race starts in its own process (queued when the device is busy)."""
    with st.popover("Race plans under a time budget"):
        st.markdown("Successive halving: every plan gets a slice of the budget, the better half goes on, "
                    "until one is left. Same data, split and seed; the winner is a normal run.")
        plans = st.multiselect("Plans", list(PLANS), default=list(PLANS), format_func=LABELS.__getitem__,
                               key="race_plans")
        limits = hosted_limits()
        budget = st.number_input("Budget (seconds)", min_value=1, max_value=limits.race_s if limits else 86_400,
                                 value=120, step=10, key="race_budget")
        eta = st.selectbox("Each rung keeps", [2, 3], key="race_eta",
                           format_func=lambda e: f"the best 1/{e} (5 plans: {' -> '.join(map(str, rung_sizes(5, e)))})")
        data = st.selectbox("Data", ["digits", "lfw"], key="race_data")
        size = st.number_input("Image size", 16, limits.image_size if limits else 512, 96, step=16, key="race_size")
        if st.button("Start race", disabled=len(plans) < 2, key="race_start",
                     help=None if len(plans) >= 2 else "A race needs at least two plans."):
            name, weights, _ = active()
            base = TrainConfig(model=name, weights=weights, data=data, image_size=int(size), batch_size=32)
            try:
                base.check_hosted()  # a shared server's caps, refused here rather than in the background
                check_budget(float(budget), len(plans), int(eta))
                runs = create_race(runs_root(), base, tuple(plans), float(budget), eta=int(eta))
            except EngineError as exc:
                show_error(exc)
                return
            start_race_background(runs, runs_root())
            st.session_state[RACE] = runs[0].config()["group"]
            st.rerun()


def race_view() -> None:
    """The races on this machine: pick one, then its live leaderboard and curves."""
    races = list_races(runs_root())
    if not races:
        return
    st.subheader("Races")
    current = st.session_state.get(RACE)
    group = st.selectbox("Race", races, index=races.index(current) if current in races else 0)
    st.session_state[RACE] = group
    running = any(r.status().active for r in race_runs(runs_root(), group))
    st.fragment(lambda: _race_panel(group), run_every=1.0 if running else None)()


def _race_panel(group: str) -> None:
    runs = race_runs(runs_root(), group)
    if not runs:
        st.info("This race's runs were deleted.")
        return
    spec = race_spec(runs)
    budget = float(spec["budget_s"])
    rungs = len(rung_sizes(len(runs), int(spec.get("eta", 2))))
    states = [r.status() for r in runs]
    if any(s.active for s in states):
        queued = next((s for s in states if s.state == "queued" and s.reason), None)
        status = read_json(runs[0].status_path, {})
        race = status.get("race") if isinstance(status, dict) and isinstance(status.get("race"), dict) else {}
        elapsed = time.time() - race["started_at"] if not queued and race.get("started_at") else 0.0
        st.progress(min(1.0, elapsed / budget),
                    text=queued.reason if queued else f"racing: {elapsed:.0f} s of {budget:g} s")
        if st.button("Cancel race", key="race_cancel"):
            for run in runs:
                request_cancel(run)
    points = pd.DataFrame(race_curves(runs))
    if not points.empty:
        fig = px.line(points, x="race_s", y="val_acc", color="strategy", markers=True,
                      title=f"Validation accuracy per second of the race ({budget:g} s, {rungs} rungs)",
                      labels={"race_s": "seconds since the race started", "val_acc": "validation accuracy"})
        fig.add_vline(x=budget, line_dash="dot", line_color="gray", annotation_text="budget")
        st.plotly_chart(fig, key="race_curves")
    st.dataframe(pd.DataFrame(leaderboard(runs)), hide_index=True)
    winner = race_winner(runs)
    if winner is not None:
        best = (winner.checkpoint_meta("best") or {}).get("val_acc")
        st.success(f"Winner: **{winner.config().get('label')}** ({best:.1%} validation accuracy), "
                   f"run `{winner.run_id}`." if best is not None else f"Winner: run `{winner.run_id}`.")
        if st.button("Open the winner on the Evaluate page", key="race_open_winner"):
            st.session_state[SELECTED_RUN] = winner.run_id
            try:
                st.switch_page("views/evaluate.py")
            except Exception:  # this page runs alone (not inside the app's navigation)
                st.info(f"Run {winner.run_id} is selected: open the Evaluate page.")
