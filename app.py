"""MLLM Compression Studio: the dashboard's entry point (sidebar model picker + page navigation).

    streamlit run app.py          # http://localhost:8501, the reference model chosen

Pages live in ``app_pages/``; each is thin and calls the library in ``compression/``. (Not ``pages/``:
Streamlit treats a folder of that name as an old-style page list until some session has run
``st.navigation``, so a first visit straight to ``/compress`` would run that page without this file.)
"""
import streamlit as st

from ui import common

st.set_page_config(page_title="MLLM Compression Studio", page_icon=":material/compress:", layout="wide")

PAGES = [
    st.Page("app_pages/model.py", title="Model", icon=":material/account_tree:", default=True),
    st.Page("app_pages/budget.py", title="Budget & what-if", icon=":material/tune:"),
    st.Page("app_pages/importance.py", title="Importance", icon=":material/bar_chart:"),
    st.Page("app_pages/token_maps.py", title="Token maps", icon=":material/grid_on:"),
    st.Page("app_pages/compress.py", title="Compress", icon=":material/play_circle:"),
    st.Page("app_pages/results.py", title="Results", icon=":material/monitoring:"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("app_pages/export.py", title="Export", icon=":material/download:"),
]

navigation = st.navigation(PAGES)
st.sidebar.caption("MLLM Compression Studio")
common.model_picker()
navigation.run()
