"""The table of runs (Training and Runs pages): one row per run, any run folder, nothing shown as None.

A queued run has no accuracy yet and a damaged one no model: such a cell is empty, not "None" (which
read as a value), and the accuracy is a formatted number, so its column is never cut.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from engine.runs.store import RunDir, describe_run
from ui.errors import public_message

COLUMNS = {  # ids and reasons get room, numbers a format
    "run_id": st.column_config.TextColumn("run", width="medium", help="the run's folder name"),
    "best_val_acc": st.column_config.TextColumn("best val acc", width="small"),
    "epochs": st.column_config.TextColumn("epochs", width="small", help="done / planned"),
    "state": st.column_config.TextColumn("state", width="small"),
    "where": st.column_config.TextColumn("where", width="small", help="this machine, or the Ray cluster it "
                                         "trained on (the Runs page names the job)"),
    "reason": st.column_config.TextColumn("reason", width="large"),
}


def run_rows(runs: list[RunDir], reasons: bool = True) -> pd.DataFrame:
    """One row per run; a run whose files cannot even be described is listed with why, not dropped."""
    rows = []
    for r in runs:
        try:
            row = describe_run(r).to_dict()
        except Exception as exc:  # noqa: BLE001 - any run folder: the list must still render
            row = {"run_id": r.run_id, "state": "unreadable", "reason": public_message(str(exc))}
        row["where"] = _where(r)
        acc = row.get("best_val_acc")
        row["best_val_acc"] = f"{acc:.4f}" if isinstance(acc, (int, float)) and acc == acc else ""
        rows.append(row)
    hidden = ["has_best"] + ([] if reasons else ["reason"])
    if all(row["where"] == "here" for row in rows):  # no cluster run: no column saying "here" in every row
        hidden.append("where")
    frame = pd.DataFrame(rows).drop(columns=hidden, errors="ignore")
    return frame.astype(object).where(frame.notna(), "")


def _where(run: RunDir) -> str:
    from ui.cluster import where_cell

    try:
        return where_cell(run.status())
    except Exception:  # noqa: BLE001 - an unreadable status is said in the state column already
        return "here"


def run_table(runs: list[RunDir], height: int = 260, reasons: bool = True) -> None:
    st.dataframe(run_rows(runs, reasons), hide_index=True, height=height, column_config=COLUMNS)
