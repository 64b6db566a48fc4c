"""Entry point and router: `streamlit run streamlit_app.py`.

The pages live in views/ (a folder Streamlit does not auto-discover); this file only frames them (navigation, the active-model sidebar).
"""
import streamlit as st

from engine.core.paths import runs_root
from ui.charts import charts_after_controls
from ui.cluster import reattach_orphans
from ui.errors import report_unexpected
from ui.state import init_state
from ui.threads import set_app_threads
from ui.widgets import render_sidebar

st.set_page_config(page_title="Transfer-learning workbench", page_icon=":material/neurology:", layout="wide")

PAGES = [
    st.Page("views/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("views/model_explorer.py", title="Model Explorer", icon=":material/account_tree:"),
    st.Page("views/freeze_configurator.py", title="Freeze Configurator", icon=":material/ac_unit:"),
    st.Page("views/training.py", title="Training", icon=":material/model_training:"),
    st.Page("views/inference.py", title="Inference", icon=":material/image_search:"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("views/evaluate.py", title="Evaluate", icon=":material/analytics:"),
    st.Page("views/feature_map.py", title="Feature space", icon=":material/scatter_plot:"),
    st.Page("views/runs.py", title="Runs", icon=":material/folder_open:"),
]

init_state()
reattach_orphans(str(runs_root()))  # once per server process: cluster runs whose follower died with the last one
set_app_threads()  # one thread while a training holds the CPU: see ui/threads.py
navigation = st.navigation(PAGES)
try:
    refresh_sidebar = render_sidebar()
except Exception as exc:  # noqa: BLE001 - the boundary: no traceback or server path ever reaches a browser
    report_unexpected(exc)
    refresh_sidebar = None
with charts_after_controls():  # a tab's first charts come after the page's controls (ui/charts.py)
    try:
        navigation.run()
    except Exception as exc:  # noqa: BLE001 - the same boundary
        report_unexpected(exc)
    else:
        if refresh_sidebar is not None:  # what this rerun's click changed (a page that stopped early changed nothing)
            refresh_sidebar()
