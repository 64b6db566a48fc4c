"""Entry point and router: `streamlit run streamlit_app.py`.

The pages live in pages/; this file only frames them (navigation, the active-model sidebar).
"""
import streamlit as st

from pages.common import render_sidebar

st.set_page_config(page_title="Transfer-learning workbench", page_icon="🧠", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon="🏠", default=True),
]

navigation = st.navigation(PAGES)
render_sidebar()
navigation.run()
