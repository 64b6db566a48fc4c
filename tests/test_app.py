"""The app through the entry point with Streamlit's AppTest (no browser)."""
from __future__ import annotations

from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT


def test_home_renders_with_active_model_in_sidebar():
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120)
    at.run()
    assert not at.exception
    assert at.title[0].value == "Transfer-learning workbench"
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "timm:efficientnet_lite0" in sidebar and "4,652,008 parameters" in sidebar
