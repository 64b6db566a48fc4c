"""Entry point and router: `streamlit run streamlit_app.py`.

The pages live in pages/; this file only frames them (navigation, the active-model sidebar).
"""
import streamlit as st

from pages.common import init_state, render_sidebar, report_unexpected

st.set_page_config(page_title="Transfer-learning workbench", page_icon=":material/neurology:", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/model_explorer.py", title="Model Explorer", icon=":material/account_tree:"),
    st.Page("pages/freeze_configurator.py", title="Freeze Configurator", icon=":material/ac_unit:"),
    st.Page("pages/training.py", title="Training", icon=":material/model_training:"),
    st.Page("pages/inference.py", title="Inference", icon=":material/image_search:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/evaluate.py", title="Evaluate", icon=":material/analytics:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/folder_open:"),
]

init_state()
navigation = st.navigation(PAGES)
try:
    render_sidebar()
    navigation.run()
except Exception as exc:  # noqa: BLE001 - the boundary: no traceback or server path ever reaches a browser
    report_unexpected(exc)
