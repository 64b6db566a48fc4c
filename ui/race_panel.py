"""The Compare page's race: freeze plans under a wall-clock budget (engine/lab/race.py).

Start one in the background, then a leaderboard, validation accuracy per second of the race (one
line per plan, a dotted line at the budget) and the winner, a normal run one click away from
the Evaluate page.
"""
from __future__ import annotations

import math
import time

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.config import TrainConfig
from engine.core.errors import EngineError
from engine.core.hosting import hosted_limits
from engine.core.paths import runs_root
from engine.freeze.presets import LABELS, PLANS
from engine.lab.race_estimate import ESTIMATE_MARGIN, RaceEstimate, check_budget, estimate_race
from engine.lab.race_plans import budget_value, rung_sizes
from engine.lab.race_process import start_race_background
from engine.lab.race_registry import (
    create_race,
    leaderboard,
    list_races,
    race_curves,
    race_record,
    race_runs,
    race_spec,
    race_winner,
)
from engine.runs.background import request_cancel
from ui.charts import chart
from ui.errors import safe_fragment, show_error
from ui.state import SELECTED_RUN, active
from ui.widgets import pick_data_source

RACE = "race_group"


ESTIMATE = "race_estimate"  # the last probe: {"key": its settings, "estimate": RaceEstimate.to_dict()}
ASKED = "race_asked"  # the user touched the race's settings: the probe may run (never on a mere visit)


def race_launcher() -> None:
    """Pick plans, data and a budget; the race starts in its own process (queued when the device is
    busy). A budget the plans' set-up and one slice each do not fit blocks Start, with the least that
    would do beside it. The estimate behind it (a probe of about a second, estimate_race) runs once the
    user changes a race setting or clicks Start, never on a visit, and again only when the model, data,
    image size or plans change; Start uses the estimate shown, so what the page said is what is checked."""
    with st.popover("Race plans under a time budget"):
        st.markdown("Successive halving: every plan gets a slice of the budget, the better half goes on, "
                    "until one is left. Same data, split and seed; the winner is a normal run. Setting the "
                    "plans up (data, models, feature passes) comes out of the budget first.")
        plans = st.multiselect("Plans", list(PLANS), default=list(PLANS), format_func=LABELS.__getitem__,
                               key="race_plans", persist_state="session", on_change=_asked)
        limits = hosted_limits()
        budget = st.number_input("Budget (seconds)", min_value=1, max_value=limits.race_s if limits else 86_400,
                                 value=120, step=10, key="race_budget", persist_state="session", on_change=_asked)
        eta = st.selectbox("Each rung keeps", [2, 3], key="race_eta", persist_state="session", on_change=_asked,
                           format_func=lambda e: f"the best 1/{e} (5 plans: {' -> '.join(map(str, rung_sizes(5, e)))})")
        data = _pick_data()
        size = st.number_input("Image size", 16, limits.image_size if limits else 512, 96, step=16, key="race_size", persist_state="session",
                               on_change=_asked)
        name, weights, _ = active()
        base = TrainConfig(model=name, weights=weights, data=str(data), image_size=int(size), batch_size=32)
        refusal = st.container()
        why_not = "A race needs at least two plans." if len(plans) < 2 else (
            "Pick the data to race on." if data is None else None)
        if why_not is None:
            why_not = _budget_refusal(base, tuple(plans), float(budget), int(eta), refusal)
        if st.button("Start race", disabled=why_not is not None, key="race_start", help=why_not):
            st.session_state[ASKED] = True
            _start(base, tuple(plans), float(budget), int(eta), refusal)


def _asked() -> None:
    st.session_state[ASKED] = True


def _budget_refusal(base: TrainConfig, plans: tuple[str, ...], budget: float, eta: int, where) -> str | None:
    """Why Start is blocked by the budget, said beside it (None: it is not). The cheap checks always; the
    estimate's once the user has touched the race's settings."""
    try:
        base.check_hosted()
        budget_value(budget)
        estimate = _estimate(base, plans) if st.session_state.get(ASKED) else None
        if estimate is not None:
            where.caption(f"Estimated here: setting the {len(plans)} plans up takes about "
                          f"{ESTIMATE_MARGIN * estimate.setup_s:.0f} s of the budget; the least budget that gives "
                          f"each a slice in the first rung is {math.ceil(estimate.least_budget(eta))} s.")
        check_budget(budget, len(plans), eta, estimate)  # without the estimate: the floor of 0.5 s a slice
    except EngineError as exc:
        show_error(exc, where)
        return "The budget is too small (see above)."
    return None


def _estimate(base: TrainConfig, plans: tuple[str, ...]) -> RaceEstimate:
    """The probe for these settings, kept in the session until the model, data, size or plans change."""
    key = [base.model, str(base.weights), base.data, base.image_size, list(plans)]
    kept = st.session_state.get(ESTIMATE)
    if isinstance(kept, dict) and kept.get("key") == key:
        estimate = RaceEstimate.from_dict(kept.get("estimate"))
        if estimate is not None:
            return estimate
    with st.spinner("Timing the set-up of the plans on a few images..."):
        estimate = estimate_race(base, plans)
    st.session_state[ESTIMATE] = {"key": key, "estimate": estimate.to_dict()}
    return estimate


def _pick_data() -> str | None:
    """The Training page's data picker; None (Start disabled) when nothing can be picked."""
    try:
        return pick_data_source(key="race_data")
    except EngineError as exc:
        show_error(exc)
        return None


def _start(base: TrainConfig, plans: tuple[str, ...], budget: float, eta: int, where) -> None:
    try:
        runs = create_race(runs_root(), base, plans, budget, eta=eta, estimate=_estimate(base, plans))
    except EngineError as exc:
        show_error(exc, where)
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
    safe_fragment(lambda: _race_panel(group), run_every=1.0 if running else None)()


def race_progress(runs: list, budget: float) -> str:
    """Where a race stands, in words: waiting for the device, setting up, racing (with its set-up)."""
    states = [r.status() for r in runs]
    queued = next((s for s in states if s.state == "queued"), None)
    if queued is not None:
        return f"waiting for the device: {queued.reason}" if queued.reason else "starting the race's process"
    record = race_record(runs)
    started = record.get("started_at")
    elapsed = time.time() - started if isinstance(started, (int, float)) else 0.0
    setup = record.get("setup_s")
    if not isinstance(setup, (int, float)):
        return f"setting up the plans (data, models, feature passes): {elapsed:.0f} s of the {budget:g} s budget"
    return f"racing: {elapsed:.0f} s of {budget:g} s (the set-up took {setup:.1f} s of it)"


def _race_panel(group: str) -> None:
    runs = race_runs(runs_root(), group)
    if not runs:
        st.info("This race's runs were deleted.")
        return
    spec = race_spec(runs)
    budget = float(spec["budget_s"])
    rungs = len(rung_sizes(len(runs), int(spec.get("eta", 2))))
    record = race_record(runs)
    if any(r.status().active for r in runs):
        started = record.get("started_at")
        elapsed = time.time() - started if isinstance(started, (int, float)) else 0.0
        st.progress(min(1.0, elapsed / budget), text=race_progress(runs, budget))
        if st.button("Cancel race", key="race_cancel"):
            for run in runs:
                request_cancel(run)
    elif isinstance(record.get("setup_s"), (int, float)):
        threads = record.get("threads")
        on = f", on {threads} thread{'s' if threads != 1 else ''} (the cores idle when it started)" \
            if isinstance(threads, int) else ""
        st.caption(f"Set-up (data, models, feature passes): {record['setup_s']:.1f} s of the {budget:g} s budget; "
                   f"the rest was split between the rungs{on}.")
    points = pd.DataFrame(race_curves(runs))
    if not points.empty:
        fig = px.line(points, x="race_s", y="val_acc", color="strategy", markers=True,
                      title=f"Validation accuracy per second of the race ({budget:g} s, {rungs} rungs)",
                      labels={"race_s": "seconds since the race started", "val_acc": "validation accuracy"})
        fig.add_vline(x=budget, line_dash="dot", line_color="gray", annotation_text="budget")
        fig.update_yaxes(range=[0, 1])
        chart(st, fig, key="race_curves")
    st.dataframe(board_frame(leaderboard(runs)), hide_index=True)
    _outcome(runs, record)


def board_frame(rows: list[dict]) -> pd.DataFrame:
    """The leaderboard as the page shows it: no "None" anywhere (a plan without a place or a score
    shows an empty cell), and each plan's reason beside it."""
    frame = pd.DataFrame(rows)
    return frame.astype(object).where(frame.notna(), "") if not frame.empty else frame


def _outcome(runs: list, record: dict) -> None:
    """The winner, one click from the Evaluate page; or, for a race that ended without one, why."""
    winner = race_winner(runs)
    if winner is None:
        if record.get("outcome") and not any(r.status().active for r in runs):
            st.warning(record["outcome"])
        return
    best = (winner.checkpoint_meta("best") or {}).get("val_acc")
    untrained = sum(1 for r in runs if not r.metrics())
    note = (f" {untrained} of {len(runs)} plans finished no slice (their reason is in the table)."
            if untrained else "")
    st.success((f"Winner: **{winner.config().get('label')}** ({best:.1%} validation accuracy), "
                f"run `{winner.run_id}`." if best is not None else f"Winner: run `{winner.run_id}`.") + note)
    if st.button("Open the winner on the Evaluate page", key="race_open_winner"):
        st.session_state[SELECTED_RUN] = winner.run_id
        try:
            st.switch_page("views/evaluate.py")
        except Exception:  # this page runs alone (not inside the app's navigation)
            st.info(f"Run {winner.run_id} is selected: open the Evaluate page.")
