"""What every page of the dashboard shares: the sidebar model picker, the read-only model cache,
one-line error messages, "not available yet" notices, and the measured / estimated labels.

Session state holds only strings (the model source, job ids); models live in
``st.cache_resource`` and are never modified by the UI (DESIGN.md: "The UI never holds a model
it will modify"). The chosen model is mirrored in the query string (``?model=…``) so that a
refresh keeps it.
"""
from __future__ import annotations

import gc
import sys
import time
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
    _remember("picker_kind")
    kind = st.session_state["picker_kind"]
    if kind == "Reference":
        set_source("reference")
    elif kind in ("Config only", "Finished run"):
        names = _picker_names(kind)
        if names:
            set_source(names[0])
    # folder and hub id wait for the user to type one


def _on_value_change(key: str) -> None:
    _remember(key)
    value = (st.session_state.get(key) or "").strip()
    if value:
        set_source(value)


def _restore(key: str, value) -> None:
    """Streamlit forgets a widget's value when the page changes (a keyed widget on another page is another
    widget). Each picker widget therefore has a plain mirror, ``_<key>``, written by the widget's own
    callbacks; before the widget is drawn its value is set from the mirror (or ``value`` the first time)."""
    st.session_state[key] = st.session_state.get(f"_{key}", value)


def _remember(*keys: str) -> None:
    """Copy widget values to their mirrors (called first in every picker callback)."""
    for key in keys:
        if key in st.session_state:
            st.session_state[f"_{key}"] = st.session_state[key]


def model_picker() -> str:
    """The sidebar picker; returns the chosen source string.

    Widgets change the source only through their callbacks, so a source that arrives from the
    query string (even a bad one) is shown as it is, with its error on the page. The widgets are
    drawn from session state alone (no ``value=``/``index=``), restored from the chosen source after a
    page switch, so the radio always shows the kind of the source in use.
    """
    source = current_source()
    if st.session_state.get("picker_synced") != source:  # the source changed elsewhere: show its kind
        st.session_state["_picker_kind"] = kind_of(source)
        st.session_state["picker_synced"] = source
    _restore("picker_kind", kind_of(source))
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
                if source in names:
                    st.session_state[key] = source
                elif st.session_state.get(key) not in names:
                    st.session_state[key] = None
                st.selectbox("Shipped config" if kind == "Config only" else "Run", names, key=key,
                             on_change=_on_value_change, args=(key,))
            else:
                st.caption("No finished runs yet: launch one on the Compress page.")
            if kind == "Config only":
                st.caption("No weights: what-if estimates only.")
        elif kind == "Local folder":
            _restore("picker_folder", source if kind_of(source) == "Local folder" else "")
            st.text_input("Folder (or a config.json)", key="picker_folder", placeholder="/path/to/llava-hf-folder",
                          on_change=_on_value_change, args=("picker_folder",))
        else:
            _restore("picker_hub", source if kind_of(source) == "Hub id" else "")
            st.text_input("Hub id (read from the local cache)", key="picker_hub", placeholder="llava-hf/llava-1.5-7b-hf",
                          on_change=_on_value_change, args=("picker_hub",))
        source = current_source()
        st.session_state["picker_synced"] = source
        st.query_params["model"] = source
        st.caption(f"Using `{source}`")
    return source


# ------------------------------------------------------------------------------------------- hardware
# Where models load and compute, and in which precision (compression.hardware.resolve). The choices are
# plain strings so the sidebar draws before torch is imported; they resolve when a model loads, and a
# device or precision this machine lacks is one line on the page.
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bf16", "fp16", "fp32")
KERNELS = ("eager", "onednn")  # compression.models.kernels.KERNELS, kept here so the sidebar needs no torch


def current_hardware() -> tuple[str, str]:
    """The chosen ``(device, dtype)`` names (default ``auto``, ``auto``)."""
    return st.session_state.get("_hw_device", "auto"), st.session_state.get("_hw_dtype", "auto")


def current_kernels() -> str:
    """The kernels latency is timed on (``hardware.kernels``; default ``eager``)."""
    return st.session_state.get("_hw_kernels", "eager")


def hardware_label() -> str:
    """What the sidebar's choice resolved to when the model loaded (``cpu, fp32``), else the choice itself."""
    return st.session_state.get("hw_resolved") or "device {}, precision {}".format(*current_hardware())


def hardware_picker() -> tuple[str, str]:
    _restore("hw_device", "auto")
    _restore("hw_dtype", "auto")
    _restore("hw_kernels", "eager")
    with st.sidebar:
        st.subheader("Hardware")
        left, right = st.columns(2)
        left.selectbox("Device", DEVICES, key="hw_device", on_change=_remember, args=("hw_device",),
                       help="auto: the first GPU where one is visible, else the CPU")
        right.selectbox("Precision", DTYPES, key="hw_dtype", on_change=_remember, args=("hw_dtype",),
                        help="auto: bf16 on a GPU that has it, else fp32")
        st.selectbox("Timing kernels (CPU)", KERNELS, key="hw_kernels", on_change=_remember, args=("hw_kernels",),
                     help="what latency is timed on: eager = PyTorch's own linears; onednn = linears on weights "
                          "packed once for oneDNN, as a CPU deployment runs them (faster on short sequences, "
                          "one more copy of the weights while timing)")
        resolved = st.session_state.get("hw_resolved")
        if resolved:
            st.caption(f"Computing on `{resolved}`")
    return current_hardware()


# ------------------------------------------------------------------------------------------- data choice
# The chosen data is a source value (compression.data.sources.SourceSpec.to_value), kept in session state
# and the query string as JSON. The reference model defaults to the built-in shapes; any other model has
# no data until the user names it (nothing is measured on shapes silently).
DATA_KEY = "data_source"
DATA_KINDS = ("Built-in ShapesVQA", "LLaVA JSON + image folder", "Datasets folder / parquet")


def current_data(model_source: str | None = None) -> dict | str | None:
    """The chosen data source value, or None when the model is not the reference and none was chosen."""
    import json

    if DATA_KEY not in st.session_state:
        raw = st.query_params.get("data")
        try:
            st.session_state[DATA_KEY] = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            st.session_state[DATA_KEY] = None
    chosen = st.session_state[DATA_KEY]
    if chosen is None and (model_source or current_source()) == "reference":
        return "shapes"
    return chosen


def set_data(value: dict | str | None) -> None:
    import json

    st.session_state[DATA_KEY] = value
    if value is None:
        st.query_params.pop("data", None)
    else:
        st.query_params["data"] = json.dumps(value)


def data_kind_of(value) -> str:
    path = value if isinstance(value, str) else (value or {}).get("path", "")
    if path == "shapes":
        return DATA_KINDS[0]
    if path.endswith((".json", ".jsonl")) and not (isinstance(value, dict) and value.get("columns")):
        return DATA_KINDS[1]
    return DATA_KINDS[2]


def _on_data_change() -> None:
    _remember("data_kind", "data_path", "data_image_root", "data_columns", "data_split")
    kind = st.session_state["data_kind"]
    if kind == DATA_KINDS[0]:
        set_data("shapes")
        return
    path = (st.session_state.get("data_path") or "").strip()
    if not path:
        set_data(None)
        return
    value: dict = {"path": path}
    root = (st.session_state.get("data_image_root") or "").strip()
    if root and kind == DATA_KINDS[1]:
        value["image_root"] = root
    columns = (st.session_state.get("data_columns") or "").strip()
    if columns and kind == DATA_KINDS[2]:
        pairs = [c.partition("=") for c in columns.split(",") if c.strip()]
        value["columns"] = {k.strip(): v.strip() for k, _, v in pairs if k.strip() and v.strip()}
    split = (st.session_state.get("data_split") or "").strip()
    if split and kind == DATA_KINDS[2]:
        value["split"] = split
    set_data(value)


def data_picker() -> dict | str | None:
    """The sidebar data picker, under the model picker; returns the chosen source value (or None)."""
    value = current_data()
    spec = value if isinstance(value, dict) else {"path": value or ""}
    _restore("data_kind", data_kind_of(value) if value else DATA_KINDS[1])
    _restore("data_path", "" if spec.get("path") in ("shapes", None) else spec["path"])
    _restore("data_image_root", spec.get("image_root", ""))
    _restore("data_columns", ",".join(f"{k}={v}" for k, v in (spec.get("columns") or {}).items()))
    _restore("data_split", spec.get("split", ""))
    with st.sidebar:
        st.subheader("Data")
        kind = st.radio("Data source", DATA_KINDS, key="data_kind", on_change=_on_data_change,
                        label_visibility="collapsed")
        if kind == DATA_KINDS[0]:
            st.caption("Procedural shapes questions: the reference model's own data.")
        else:
            st.text_input("File" if kind == DATA_KINDS[1] else "Folder or file", key="data_path",
                          placeholder="/path/to/test.json" if kind == DATA_KINDS[1] else "/path/to/dataset",
                          on_change=_on_data_change)
            if kind == DATA_KINDS[1]:
                st.text_input("Image folder (default: the file's folder)", key="data_image_root",
                              on_change=_on_data_change)
            else:
                st.text_input("Columns, if named differently (key=name, …)", key="data_columns",
                              placeholder="question=prompt,answer=label", on_change=_on_data_change)
                st.text_input("Split (for a dataset with several)", key="data_split", on_change=_on_data_change)
        value = current_data()
        st.caption(f"Data: `{data_label(value)}`" if value else "Data: none chosen (needed to measure this model)")
    return value


def data_label(value) -> str:
    if value in (None, ""):
        return "none"
    if isinstance(value, str):
        return value
    return value.get("path", "?") + (f" (images: {value['image_root']})" if value.get("image_root") else "")


@st.cache_resource(show_spinner="Reading the data…", max_entries=8)
def _open_data(key: str, role: str):
    import json

    from compression.data.sources import open_source

    return open_source(json.loads(key), role)


def data_source(role: str = "eval", required: bool = True):
    """The chosen data source opened for ``role`` (cached); a one-line error and the page stops on bad input,
    or when no data is chosen for a model other than the reference."""
    import json

    value = current_data()
    if value is None:
        if not required:
            return None
        st.info(f"Pick the data to measure `{current_source()}` on in the sidebar (a LLaVA JSON file with its image "
                "folder, or a datasets folder): the built-in shapes are only the reference model's data.")
        st.stop()
    try:
        return _open_data(json.dumps(value, sort_keys=True), role)
    except (ValueError, OSError) as e:
        st.error(one_line(e))
        st.stop()


def selection(role: str, samples: int, **kwargs):
    """``samples`` records of the chosen data for ``role`` (evaluation: the first ones with an image)."""
    from compression.data.sources import select

    source = data_source(role)
    with shown_as_message():
        return select(source, samples=samples, need_images=True, **kwargs)


# On a first visit the browser fetches the sidebar widgets' code from this server just after the header
# arrives. Importing torch holds the GIL for up to ~1.5 s at a time, and those fetches waited 1.8-2.5 s
# for the server (10-50 ms with this pause; headless Chromium, 2 cores at load 11-13). So the first
# import in a server process waits this long.
FIRST_IMPORT_PAUSE_S = 0.5


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _load(source: str, device: str = "auto", dtype: str = "auto"):
    if "torch" not in sys.modules:
        time.sleep(FIRST_IMPORT_PAUSE_S)
    else:
        # The server skips Streamlit's gc after each run (.streamlit/config.toml: it costs every page switch
        # 0.2-0.5 s); a model evicted from this cache may sit in reference cycles, so collect before the next.
        gc.collect()
    from compression.hardware import resolve
    from compression.models import load

    chosen = resolve(device, dtype)
    return load(source, device=chosen.device, dtype=chosen.dtype)


def offload_note(loaded) -> str:
    """What offloading costs, in one warning: the bytes every forward pass moves back in, and the least time that
    takes at this machine's measured copy rate."""
    from compression.measure.whatif import cpu_profile

    placement = loaded.extras["placement"]
    moved = placement.get("offloaded_bytes") or 0
    rate = cpu_profile().bandwidth
    return (f"`{loaded.name}` ({placement['weights_bytes'] / 2**30:.1f} GiB of weights) does not fit the device, so "
            f"it is offloaded ({loaded.hardware_label}): every forward pass reads {moved / 2**30:.1f} GiB back in, at "
            f"least {moved / rate:.2f} s more per forward pass (and per generated token) at this machine's measured "
            f"copy rate of {rate / 1e9:.0f} GB/s, more from a disk that is not in the page cache. Answers are the "
            "same; every time measured here includes it.")


def loaded_model(need_weights: bool = False, source: str | None = None):
    """The chosen model (read-only, cached) on the sidebar's hardware; on bad input (a model, or a device /
    precision this machine lacks) a one-line error and the page stops."""
    source = source or current_source()
    try:
        loaded = _load(source, *current_hardware())
    except (ValueError, OSError) as e:  # ModelLoadError is a ValueError: no import here, it would load torch early
        st.error(one_line(e))
        st.stop()
    if loaded.has_weights:
        st.session_state["hw_resolved"] = loaded.hardware_label
        placement = loaded.extras.get("placement") or {}
        if placement.get("offloaded"):
            st.warning(offload_note(loaded))
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


def measured(text: str = "", hardware: str | None = None) -> None:
    """A measured figure's label: what it was measured on (``hardware``: a run's recorded device and
    precision; default the sidebar's, as the model loaded)."""
    where = hardware or st.session_state.get("hw_resolved")
    st.caption(f"**Measured** on this machine{f' ({where})' if where else ''}{': ' + text if text else ''}")


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
    data_picker()
    hardware_picker()
    st.title(title)
    st.caption(purpose)


# ------------------------------------------------------------------------------------------- the chosen run

CHOSEN_RUN = "chosen_run"  # a run name: what Compare and Export open, set there or on the Results front


def choose_run(name: str) -> None:
    st.session_state[CHOSEN_RUN] = name


def run_picker(label: str, names: list[str], key: str) -> str:
    """A run selectbox that opens on the chosen run (from the Results front or another page) and,
    when changed, makes its pick the chosen run for the other pages too."""
    chosen = st.session_state.get(CHOSEN_RUN)
    if chosen in names:
        st.session_state[key] = chosen
    return st.selectbox(label, names, key=key, on_change=lambda: choose_run(st.session_state[key]))
