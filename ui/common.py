"""What every page of the dashboard shares: the sidebar model picker, the read-only model cache,
one-line error messages, "not available yet" notices, and the measured / estimated labels.

Session state holds only strings (the model source, job ids); models live in
``st.cache_resource`` and are never modified by the UI (DESIGN.md: "The UI never holds a model
it will modify"). The chosen model is mirrored in the query string (``?model=…``) so that a
refresh keeps it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import streamlit as st

MODEL_KEY = "model_source"
DEFAULT_SOURCE = "reference"
KINDS = ("Reference", "Config only", "Finished run", "Local folder", "Hub id")


# ------------------------------------------------------------------------------------------- model choice

def kind_of(source: str) -> str:
    """Which picker option a source string belongs to."""
    if source == "reference":
        return "Reference"
    if source.startswith("config:") or source.endswith(".json"):
        return "Config only"
    if source.startswith("run:"):
        return "Finished run"
    looks_like_hub_id = (source.count("/") == 1 and all(source.split("/"))
                         and not source.startswith((".", "~", "/")) and not Path(source).exists())
    return "Hub id" if looks_like_hub_id else "Local folder"


def current_source() -> str:
    """The chosen model source: session state, else the query string, else the reference model."""
    if MODEL_KEY not in st.session_state:
        st.session_state[MODEL_KEY] = st.query_params.get("model", DEFAULT_SOURCE) or DEFAULT_SOURCE
    return st.session_state[MODEL_KEY]


def set_source(source: str) -> None:
    st.session_state[MODEL_KEY] = source
    st.query_params["model"] = source


def _picker_names(kind: str) -> list[str]:
    from compression.models import available_models

    if kind == "Config only":
        return [m["name"] for m in available_models() if m["kind"] == "config"]
    return [m["name"] for m in available_models() if m["name"].startswith("run:")]


def _on_kind_change() -> None:
    kind = st.session_state["picker_kind"]
    if kind == "Reference":
        set_source("reference")
    elif kind in ("Config only", "Finished run"):
        names = _picker_names(kind)
        if names:
            set_source(names[0])
    # folder and hub id wait for the user to type one


def _on_value_change(key: str) -> None:
    value = (st.session_state.get(key) or "").strip()
    if value:
        set_source(value)


def model_picker() -> str:
    """The sidebar picker; returns the chosen source string.

    Widgets change the source only through their callbacks, so a source that arrives from the
    query string (even a bad one) is shown as it is, with its error on the page.
    """
    source = current_source()
    if st.session_state.get("picker_synced") != source:  # the source changed elsewhere: show its kind
        st.session_state["picker_kind"] = kind_of(source)
        st.session_state["picker_synced"] = source
    with st.sidebar:
        st.subheader("Model")
        kind = st.radio("Source", KINDS, key="picker_kind", on_change=_on_kind_change,
                        label_visibility="collapsed")
        if kind == "Reference":
            st.caption("The shipped ShapesVQA LLaVA: CPU, seconds.")
        elif kind in ("Config only", "Finished run"):
            names = _picker_names(kind)
            key = "picker_config" if kind == "Config only" else "picker_run"
            if names:
                st.selectbox("Shipped config" if kind == "Config only" else "Run", names, key=key,
                             index=names.index(source) if source in names else None,
                             on_change=_on_value_change, args=(key,))
            else:
                st.caption("No finished runs yet: launch one on the Compress page.")
            if kind == "Config only":
                st.caption("No weights: what-if estimates only.")
        elif kind == "Local folder":
            st.text_input("Folder (or a config.json)", key="picker_folder", placeholder="/path/to/llava-hf-folder",
                          value=source if kind_of(source) == "Local folder" else "",
                          on_change=_on_value_change, args=("picker_folder",))
        else:
            st.text_input("Hub id (read from the local cache)", key="picker_hub", placeholder="llava-hf/llava-1.5-7b-hf",
                          value=source if kind_of(source) == "Hub id" else "",
                          on_change=_on_value_change, args=("picker_hub",))
        source = current_source()
        st.session_state["picker_synced"] = source
        st.query_params["model"] = source
        st.caption(f"Using `{source}`")
    return source


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _load(source: str):
    from compression.models import load

    return load(source)


def loaded_model(need_weights: bool = False, source: str | None = None):
    """The chosen model (read-only, cached); on bad input a one-line error and the page stops."""
    from compression.models import ModelLoadError

    source = source or current_source()
    try:
        loaded = _load(source)
    except (ModelLoadError, ValueError, OSError) as e:
        st.error(one_line(e))
        st.stop()
    if need_weights and not loaded.has_weights:
        st.info(f"`{loaded.name}` is config-only (no weights): this page needs a model with weights. "
                "Pick the reference model, a local folder or a finished run in the sidebar.")
        st.stop()
    return loaded


# ------------------------------------------------------------------------------------------- messages

def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def shown_as_message() -> Iterator[None]:
    """Bad input raised by the library (ValueError and its kin) becomes one line on the page, then stop."""
    try:
        yield
    except (ValueError, FileNotFoundError, KeyError) as e:
        st.error(one_line(e))
        st.stop()


def measured(text: str = "") -> None:
    st.caption(f"**Measured** on this machine{': ' + text if text else ''}")


def estimated(text: str = "") -> None:
    st.caption(f"**Estimated** (no model run){': ' + text if text else ''}")


# The sidebar's page links; Streamlit's own list is hidden (client.showSidebarNavigation = false)
# because in its multipage-folder mode it would label the entry page "app".
PAGES = [
    ("app.py", "Model", ":material/account_tree:"),
    ("pages/budget.py", "Budget & what-if", ":material/tune:"),
    ("pages/importance.py", "Importance", ":material/bar_chart:"),
    ("pages/token_maps.py", "Token maps", ":material/grid_on:"),
    ("pages/compress.py", "Compress", ":material/play_circle:"),
    ("pages/results.py", "Results", ":material/monitoring:"),
    ("pages/compare.py", "Compare", ":material/compare:"),
    ("pages/export.py", "Export", ":material/download:"),
]


def page_header(title: str, purpose: str) -> None:
    """Every page opens with this: page config, sidebar links and model picker, then its title.

    Each page sets itself up, so a page opened directly (a bookmark, a refresh after a server
    restart) is complete without the entry script having run.
    """
    st.set_page_config(page_title=f"{title} · MLLM Compression Studio", page_icon=":material/compress:",
                       layout="wide")
    with st.sidebar:
        st.caption("MLLM Compression Studio")
        for path, label, icon in PAGES:
            st.page_link(path, label=label, icon=icon)
    model_picker()
    st.title(title)
    st.caption(purpose)
