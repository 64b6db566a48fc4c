"""ui/charts.py in a script run by AppTest: a session's first charts keep their place on the page and are
drawn when the run ends, however it ends; later runs draw them in place, and a fragment's own rerun
never waits."""
from __future__ import annotations

from streamlit.testing.v1 import AppTest


def _page(stop: bool) -> None:
    import plotly.express as px
    import streamlit as st

    from ui.charts import chart, charts_after_controls, stop_page

    with charts_after_controls():
        st.markdown("before")
        left, right = st.columns(2)
        chart(left, px.bar(x=["a", "b"], y=[1, 2], title="the first chart"), key="bars")
        event = chart(st, px.scatter(x=[0, 1], y=[0, 1], title="selectable"), key="dots", on_select="rerun")
        st.session_state.setdefault("events", []).append(event is not None)
        right.markdown("beside")
        st.button("a control")
        if stop:
            stop_page()
        chart(st, px.line(x=[0, 1], y=[1, 0], title="the second chart"))
        st.markdown("after")


def _titles(at: AppTest) -> list[str]:
    return [c.proto.spec and __import__("json").loads(c.proto.spec)["layout"]["title"]["text"]
            for c in at.get("plotly_chart")]


def test_the_first_charts_of_a_session_wait_for_the_end_of_the_run_in_their_place():
    at = AppTest.from_function(_page, kwargs={"stop": False}).run()
    assert not at.exception
    # in page order, not drawing order; a chart the user selects on is drawn in place, with its event
    assert _titles(at) == ["the first chart", "selectable", "the second chart"]
    assert at.session_state["events"] == [True]
    left = at.columns[0]
    assert [c.type for c in left.children.values()] == ["plotly_chart"]  # the slot became the chart
    at.run()  # the tab has loaded its chart code: every chart is drawn in place
    assert _titles(at) == ["the first chart", "selectable", "the second chart"]
    assert at.session_state["events"] == [True, True]


def test_a_page_that_stops_early_still_gets_its_charts():
    """Streamlit draws nothing after ``st.stop()``: the pages stop through stop_page, which draws them first."""
    at = AppTest.from_function(_page, kwargs={"stop": True}).run()
    assert not at.exception
    assert _titles(at) == ["the first chart", "selectable"]
    assert at.button[0].label == "a control"


def test_every_chart_and_every_stop_of_the_app_goes_through_ui_charts():
    """A page that called st.plotly_chart itself would hold a new tab's controls back again; one that
    called st.stop() would lose its waiting charts."""
    from tests.conftest import ROOT

    found = [f"{path.relative_to(ROOT)}: {needle}" for path in [*ROOT.glob("views/*.py"), *ROOT.glob("ui/*.py")]
             if path.name != "charts.py" for needle in (".plotly_chart(", "st.stop(")
             if needle in path.read_text()]
    assert not found, found
