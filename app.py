"""MLLM Compression Studio: the dashboard's entry point (sidebar model picker + page navigation).

    streamlit run app.py          # http://localhost:8501, the reference model chosen

Pages live in ``pages/``; each is thin and calls the library in ``compression/``.
"""
import streamlit as st

from ui import common

st.set_page_config(page_title="MLLM Compression Studio", page_icon=":material/compress:", layout="wide")

PAGES = [
    st.Page("pages/model.py", title="Model", icon=":material/account_tree:", default=True),
    st.Page("pages/budget.py", title="Budget & what-if", icon=":material/tune:"),
    st.Page("pages/importance.py", title="Importance", icon=":material/bar_chart:"),
    st.Page("pages/token_maps.py", title="Token maps", icon=":material/grid_on:"),
    st.Page("pages/compress.py", title="Compress", icon=":material/play_circle:"),
    st.Page("pages/results.py", title="Results", icon=":material/monitoring:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
]

navigation = st.navigation(PAGES)
st.sidebar.caption("MLLM Compression Studio")
common.model_picker()
navigation.run()
