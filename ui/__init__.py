"""Helpers for the Streamlit pages (``app.py``, ``pages/``).

``ui.common`` holds the Streamlit pieces every page shares (model picker, cached read-only
models, one-line errors, measured/estimated labels); ``ui.views`` holds plain functions that
turn library results into tables and plotly figures. The library, ``compression/``, never
imports streamlit; this package is where the screen meets it.
"""
