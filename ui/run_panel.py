"""The live view of one run: progress, ETA and curves, redrawn on a timer while it trains.

Only this panel reruns (``st.fragment(run_every=...)``), reading the run directory through the
engine; the training itself is a separate process, so leaving the page or refreshing loses nothing.
"""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.runs.background import request_cancel
from engine.runs.store import RunDir
from engine.training.auto_plan import is_pending
from ui.charts import chart
from ui.errors import safe_fragment
from ui.text import code, md

LOSS_CURVES = ("train_loss", "val_loss")
ACCURACY_CURVES = ("train_acc", "val_acc", "val_balanced_acc", "val_macro_f1")


def _plotted(frame: pd.DataFrame, curves: tuple[str, ...]) -> list[str]:
    """The curves a metrics file really holds as numbers: a run imported from elsewhere (or written by
    an older version) may lack some, and a missing column must cost its curve, not the panel."""
    return [c for c in curves if c in frame and pd.to_numeric(frame[c], errors="coerce").notna().any()]


def _number(row: dict, key: str) -> float | None:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _curves(metrics: list[dict]) -> None:
    frame = pd.DataFrame([m for m in metrics if isinstance(m, dict)])
    if "epoch" not in frame:
        return
    c1, c2, c3 = st.columns(3)
    # macro-F1 and balanced accuracy: in runs trained since they were recorded (older lines lack them)
    for where, curves, value, title in ((c1, LOSS_CURVES, "loss", "Loss"), (c2, ACCURACY_CURVES, "accuracy",
                                                                             "Accuracy")):
        present = _plotted(frame, curves)
        if present:
            long = frame.melt(id_vars="epoch", value_vars=present, var_name="curve", value_name=value)
            chart(where, px.line(long, x="epoch", y=value, color="curve", markers=True, title=title),
                     key=value if value == "loss" else "acc")
    lrs = pd.DataFrame([{"epoch": m.get("epoch"), "group": str(g), "lr": v} for m in metrics
                        if isinstance(m, dict) and isinstance(m.get("lr"), dict) for g, v in m["lr"].items()
                        if str(g).endswith("/decay") or "/" not in str(g)])
    if not lrs.empty:
        chart(c3, px.line(lrs, x="epoch", y="lr", color="group", markers=True, title="Learning rate (per group)"),
              key="lr")


def _epochs(from_status: object, config: dict) -> int:
    """The epochs the run is to train: its status, else its config, else 1 (either file may be damaged)."""
    wanted = config.get("epochs")
    for value in (from_status, wanted):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 1


def _panel(run: RunDir) -> None:
    status = run.status()
    state = status.state
    metrics = run.metrics()
    progress = status.progress
    epochs = _epochs(status.epochs, run.config_or_empty())
    if state == "queued" and status.queue_position:
        st.info(f"Queued: {md(status.reason)}. It starts by itself when the device is free.")
        if st.button("Cancel (leave the queue)", key=f"cancel-{run.run_id}"):
            request_cancel(run)
    elif status.active:
        choosing = not progress and is_pending(run.config_or_empty().get("auto_plan"))
        said = (progress.describe(epochs) if progress else "choosing the plan: the advisor and a short race on a "
                "sample of the training images..." if choosing else "preparing data and model...")
        st.progress(progress.fraction(epochs) if progress else 0.0, text=md(f"{state}: {said}"))
        if st.button("Cancel training", key=f"cancel-{run.run_id}"):
            request_cancel(run)
    elif state == "finished":
        st.success(f"Finished: {md(status.reason)}. Best val acc {status.best_val_acc or 0:.4f} "
                   f"(epoch {status.best_epoch}).")
    elif state in ("cancelled", "interrupted"):
        st.warning(f"{state.capitalize()}: {md(status.reason)}")
    elif state == "failed":
        st.error(f"Failed: {md(status.reason)}")
    elif state == "diverged":
        st.error(f"Diverged: {md(status.reason)}")
    elif state == "damaged":
        st.error(f"Damaged: {md(status.reason)}")
    if status.auto_plan:
        st.caption(f"Plan chosen for this data ({md(status.auto_plan.removeprefix('auto plan: '))}).")
    if status.batches:
        st.caption(f"Memory: {md(status.batches)}.")
    if metrics:
        _curves(metrics)
        _last_epoch(metrics[-1] if isinstance(metrics[-1], dict) else {})


def _last_epoch(last: dict) -> None:
    """The last epoch's speed and scores, each said only when the metrics line holds it as a number."""
    parts = [text for key, text in (("epoch_s", "{:.1f}s"), ("images_per_s", "{:.0f} images/s"),
                                    ("trainable_params", "{:,.0f} trainable parameters"))
             if (value := _number(last, key)) is not None for text in [text.format(value)]]
    f1, balanced = _number(last, "val_macro_f1"), _number(last, "val_balanced_acc")
    scores = (f" Val macro-F1 {f1:.4f}, balanced accuracy {balanced:.4f}." if f1 is not None and balanced is not None
              else "")
    if parts or scores:
        st.caption(("Last epoch: " + ", ".join(parts) + "." if parts else "") + scores)


def live_panel(run: RunDir) -> None:
    """Redraw every second while the run is active; a static panel once it is done."""
    active = run.status().active
    safe_fragment(_panel, run_every=1.0 if active else None)(run)


def run_progress(run: RunDir) -> tuple[str, str]:
    """One line of a run's progress, for beside the button that started it: queued (and where in line),
    a progress bar with the ETA while it trains, or how it ended. Returns (run id, state): what the page
    around it depends on."""
    status = run.status()
    state = status.state
    if state == "queued":
        place = f" (number {status.queue_position} in line)" if status.queue_position else ""
        st.caption(f"Run {code(run.run_id)} is queued{place}: it starts by itself when the device is free.")
    elif status.active:
        epochs = _epochs(status.epochs, run.config_or_empty())
        progress = status.progress
        st.progress(progress.fraction(epochs) if progress else 0.0,
                    text=f"Run {code(run.run_id)}: " + md(progress.describe(epochs) if progress
                                                          else "preparing data and model..."))
    elif state == "finished":
        st.caption(f"Run {code(run.run_id)} finished: best validation accuracy {status.best_val_acc or 0:.1%}.")
    else:
        st.caption(f"Run {code(run.run_id)}: {md(state)}.")
    return run.run_id, state
