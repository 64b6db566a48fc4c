"""The live view of one run: progress, ETA and curves, redrawn on a timer while it trains.

Only this panel reruns (``st.fragment(run_every=...)``), reading the run directory through the
engine; the training itself is a separate process, so leaving the page or refreshing loses nothing.
"""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.core.files import read_json
from engine.runs.background import request_cancel
from engine.runs.store import RunDir


def _curves(metrics: list[dict]) -> None:
    frame = pd.DataFrame(metrics)
    loss = frame.melt(id_vars="epoch", value_vars=["train_loss", "val_loss"], var_name="curve", value_name="loss")
    # macro-F1 and balanced accuracy: in runs trained since they were recorded (older lines lack them)
    scores = [k for k in ("val_balanced_acc", "val_macro_f1") if k in frame and frame[k].notna().any()]
    acc = frame.melt(id_vars="epoch", value_vars=["train_acc", "val_acc", *scores], var_name="curve",
                     value_name="accuracy")
    c1, c2, c3 = st.columns(3)
    c1.plotly_chart(px.line(loss, x="epoch", y="loss", color="curve", markers=True, title="Loss"), key="loss")
    c2.plotly_chart(px.line(acc, x="epoch", y="accuracy", color="curve", markers=True, title="Accuracy"), key="acc")
    lrs = pd.DataFrame([{"epoch": m["epoch"], "group": g, "lr": v} for m in metrics for g, v in m["lr"].items()
                        if g.endswith("/decay") or "/" not in g])
    if not lrs.empty:
        c3.plotly_chart(px.line(lrs, x="epoch", y="lr", color="group", markers=True, title="Learning rate (per group)"),
                        key="lr")


def _panel(run: RunDir) -> None:
    status = run.status()
    state = status.state
    metrics = run.metrics()
    progress = status.progress
    config = read_json(run.config_path, {})
    epochs = int(status.epochs or (config.get("epochs") if isinstance(config, dict) else 1) or 1)
    if state == "queued" and status.queue_position:
        st.info(f"Queued: {status.reason}. It starts by itself when the device is free.")
        if st.button("Cancel (leave the queue)", key=f"cancel-{run.run_id}"):
            request_cancel(run)
    elif status.active:
        st.progress(progress.fraction(epochs) if progress else 0.0,
                    text=f"{state}: {progress.describe(epochs)}" if progress else f"{state}: preparing data and model...")
        if st.button("Cancel training", key=f"cancel-{run.run_id}"):
            request_cancel(run)
    elif state == "finished":
        st.success(f"Finished: {status.reason}. Best val acc {status.best_val_acc or 0:.4f} "
                   f"(epoch {status.best_epoch}).")
    elif state in ("cancelled", "interrupted"):
        st.warning(f"{state.capitalize()}: {status.reason}")
    elif state == "failed":
        st.error(f"Failed: {status.reason}")
    elif state == "diverged":
        st.error(f"Diverged: {status.reason}")
    elif state == "damaged":
        st.error(f"Damaged: {status.reason}")
    if status.batches:
        st.caption(f"Memory: {status.batches}.")
    if metrics:
        _curves(metrics)
        last = metrics[-1]
        balanced = (f" Val macro-F1 {last['val_macro_f1']:.4f}, balanced accuracy {last['val_balanced_acc']:.4f}."
                    if isinstance(last.get("val_macro_f1"), (int, float))
                    and isinstance(last.get("val_balanced_acc"), (int, float)) else "")
        st.caption(f"Last epoch: {last['epoch_s']:.1f}s, {last['images_per_s']:.0f} images/s, "
                   f"{last['trainable_params']:,} trainable parameters.{balanced}")


def live_panel(run: RunDir) -> None:
    """Redraw every second while the run is active; a static panel once it is done."""
    active = run.status().active
    st.fragment(_panel, run_every=1.0 if active else None)(run)


def run_progress(run: RunDir) -> tuple[str, str]:
    """One line of a run's progress, for beside the button that started it: queued (and where in line),
    a progress bar with the ETA while it trains, or how it ended. Returns (run id, state): what the page
    around it depends on."""
    status = run.status()
    state = status.state
    if state == "queued":
        place = f" (number {status.queue_position} in line)" if status.queue_position else ""
        st.caption(f"Run `{run.run_id}` is queued{place}: it starts by itself when the device is free.")
    elif status.active:
        config = read_json(run.config_path, {})
        epochs = int(status.epochs or (config.get("epochs") if isinstance(config, dict) else 1) or 1)
        progress = status.progress
        st.progress(progress.fraction(epochs) if progress else 0.0,
                    text=f"Run `{run.run_id}`: " + (progress.describe(epochs) if progress
                                                     else "preparing data and model..."))
    elif state == "finished":
        st.caption(f"Run `{run.run_id}` finished: best validation accuracy {status.best_val_acc or 0:.1%}.")
    else:
        st.caption(f"Run `{run.run_id}`: {state}.")
    return run.run_id, state
