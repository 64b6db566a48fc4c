"""Statuses that stay true without a click: small fragments that poll what the engine writes.

Trainings, sweeps, races and comparisons run in their own processes and only write files, so a
page drawn once goes stale the moment one of them moves on ("queued" above "Finished", a device
"busy" after the sweep ended). A live part is a fragment (``st.fragment(run_every=...)``) that
reruns alone on a timer, reads a *signature* of the work it reports (states, queue places, whether
the device is free) and redraws itself; when the signature differs from the one the whole page was
drawn with, it reruns the whole page, so the tables, buttons and queue lines around it are current
too, within one period of the change. Nothing else of the page reruns while nothing changes.
"""
from __future__ import annotations

from typing import Callable, Hashable

import streamlit as st

from ui.errors import safe_fragment

ACTIVE_EVERY = 1.0  # seconds between polls while something runs
IDLE_EVERY = 3.0  # ... while nothing does: another user's start is still seen within a few seconds


def live(name: str, draw: Callable[[], Hashable], active: bool) -> None:
    """Run ``draw`` now and then every ``ACTIVE_EVERY`` (``IDLE_EVERY`` when nothing is ``active``)
    seconds; ``draw`` shows its part of the page and returns the signature of what it read."""
    seen = f"_live_{name}"

    def part() -> None:
        signature = draw()
        before = st.session_state.get(seen, signature)
        st.session_state[seen] = signature
        if before != signature:
            st.rerun()  # the whole page: everything around this part reflects the change too

    safe_fragment(part, run_every=ACTIVE_EVERY if active else IDLE_EVERY)()


def device_signature(statuses: dict, lock_free: bool, waiting: int) -> tuple:
    """What the queue line of a page depends on: the active runs' states and places (``statuses``: run id
    -> RunStatus, read once by the caller), the lock, the line."""
    return (tuple((run_id, s.state, s.queue_position) for run_id, s in statuses.items()), lock_free, waiting)
