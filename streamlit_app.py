"""Entry point and router: `streamlit run streamlit_app.py`.

The pages live in pages/; this file only frames them (navigation, the active-model sidebar).
"""
import streamlit as st

from pages.common import init_state, render_sidebar

st.set_page_config(page_title="Transfer-learning workbench", page_icon="🧠", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon="🏠", default=True),
    st.Page("pages/model_explorer.py", title="Model Explorer", icon="🔎"),
    st.Page("pages/freeze_configurator.py", title="Freeze Configurator", icon="🧊"),
    st.Page("pages/training.py", title="Training", icon="🏋️"),
    st.Page("pages/inference.py", title="Inference", icon="🖼️"),
]

init_state()
navigation = st.navigation(PAGES)
render_sidebar()
navigation.run()
