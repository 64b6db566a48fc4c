"""Training on a Ray cluster, as the pages show it (engine/cluster/, docs/cluster.md).

"Where to train" on the Training page: this server, or the cluster at an address (WORKBENCH_CLUSTER, or
one typed here). Nothing here reaches the cluster: Start checks it, through the engine, before anything is
written. And once per server process, the cluster runs whose follower died with an earlier server are
followed again, so a restarted app shows them training instead of "interrupted".
"""
from __future__ import annotations

import logging

import streamlit as st

from engine.cluster.client import ENV, cluster_address
from engine.runs.status import RunStatus
from ui.text import md

HERE = "this server"


def where_to_train(key: str = "train_where") -> str | None:
    """The cluster's address when the user chose to train there, else None (this server). The choice is
    offered when WORKBENCH_CLUSTER names a cluster or an address is typed."""
    preset = cluster_address(None) or ""
    with st.expander("Train on a Ray cluster", expanded=bool(preset)):
        typed = st.text_input("Ray cluster address", value=preset, key=f"{key}_url", placeholder="http://HOST:8265",
                              persist_state="session",
                              help=f"The cluster's dashboard (Ray's job API, port 8265); {ENV} sets it for everyone. "
                                   "Checked when you press Start: an unreachable cluster is said there, and nothing "
                                   "is written.")
        address = cluster_address(typed) if typed.strip() else None
        if address is None:
            return None
        choice = st.radio("Where to train", [HERE, f"the cluster at {address}"], key=f"{key}_choice",
                          horizontal=True)
    return None if choice == HERE else address


def trained_where(status: RunStatus) -> str:
    """One line: the cluster and job a run trains or trained on ('' for a run of this machine)."""
    if not status.on_cluster:
        return ""
    record = status.cluster or {}
    job = f", job {record['job_id']}" if record.get("job_id") else ""
    ray = f", Ray {record['ray']}" if record.get("ray") else ""
    return f"On the Ray cluster {md(str(record.get('address')))}{md(job)}{md(ray)}."


def where_cell(status: RunStatus) -> str:
    """The run table's "where" cell: the cluster's host and port, or "here"."""
    if not status.on_cluster:
        return "here"
    address = str((status.cluster or {}).get("address"))
    return "cluster " + address.split("://", 1)[-1]


@st.cache_resource(show_spinner=False)
def reattach_orphans(runs_root: str) -> tuple[str, ...]:
    """Once per server process (and runs folder): a follower for each cluster run whose follower is gone
    (engine.cluster.submit.orphaned); returns their ids. A failure is logged, never shown: the runs read
    interrupted, and `python -m engine runs cancel RUN` or a resume still reaches their jobs."""
    try:
        from engine.cluster.submit import orphaned, reattach

        found = orphaned(runs_root)
        for run, address in found:
            reattach(run, address, runs_root)
        return tuple(run.run_id for run, _ in found)
    except Exception:  # noqa: BLE001 - the app starts whatever a run folder holds
        logging.getLogger("workbench").exception("re-attaching to cluster runs failed")
        return ()
