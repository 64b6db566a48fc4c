"""Every Plotly chart of the app, drawn so that a tab's first chart never holds the page's controls back.

Measured in Chromium on 2 cores (bench/first_visit.py): a browser tab evaluates Streamlit's Plotly
code (4.7 MB of JavaScript) the first time it draws a chart, about 1 s during which nothing else of
the page is drawn, so a page opened in a new tab showed its first control 2.5-3 s after the click.
So in a session that has not drawn a chart yet, ``chart`` keeps the chart's place (an empty slot),
and the router fills every such slot when the page's script has ended, after a short pause that
lets the browser draw the controls first; from then on, charts are drawn in place.

A chart the user selects on (``on_select``) is always drawn in place: Streamlit names its selection
after the page that draws it, and the router, which fills the slots, is not that page (a selection made
on a chart drawn late would be lost on the next run).
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import streamlit as st

_READY = "_charts_ready"  # this session's tab has drawn a chart: its Plotly code is loaded
_WAITING = "_charts_waiting"  # [(slot, figure, plotly_chart keywords)] of the current script run
_IN_PAGE_RUN = "_charts_in_page_run"  # a whole page is running (a fragment's own rerun draws in place)
# the pause before a tab's first charts: long enough for the browser to draw the page's other elements
# (0.2 s already halved the wait; tests that run no browser set it to 0)
PAUSE_S = float(os.environ.get("WORKBENCH_FIRST_CHART_PAUSE_S", "0.4"))


def chart(where: Any, fig: Any, **kwargs: Any) -> Any:
    """``where.plotly_chart(fig, **kwargs)``, ``where`` being ``st`` (the page), a container or a column.
    Returns its selection event, or None while the chart waits for the end of the run (nothing is
    selected yet)."""
    selectable = kwargs.get("on_select", "ignore") != "ignore"
    if selectable or st.session_state.get(_READY) or not st.session_state.get(_IN_PAGE_RUN):
        return where.plotly_chart(fig, **kwargs)
    st.session_state.setdefault(_WAITING, []).append((where.empty(), fig, kwargs))
    return None


def stop_page() -> NoReturn:
    """``st.stop()`` for the pages: Streamlit draws nothing after it, so the charts still waiting for the
    end of this run are drawn first."""
    st.session_state[_IN_PAGE_RUN] = False
    _draw_waiting_charts()
    st.stop()
    raise AssertionError("st.stop() returned")  # outside a script run it does; a page never is


@contextmanager
def charts_after_controls() -> Iterator[None]:
    """Around the router's run of a page: the charts that waited for the end of the run are drawn when
    it ends (a page that stops early calls stop_page, which draws them before ``st.stop``)."""
    st.session_state[_WAITING] = []
    st.session_state[_IN_PAGE_RUN] = True
    try:
        yield
    finally:
        st.session_state[_IN_PAGE_RUN] = False
        _draw_waiting_charts()


def _draw_waiting_charts() -> None:
    waiting = st.session_state.pop(_WAITING, None)
    if not waiting:
        return
    time.sleep(PAUSE_S)  # the page's other elements reach the browser, which draws them meanwhile
    st.session_state[_READY] = True
    for slot, fig, kwargs in waiting:
        slot.plotly_chart(fig, **kwargs)
