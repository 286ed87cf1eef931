"""Importance: which decoder layers, attention heads and MLP neurons matter, and what the current
budget would remove."""
import streamlit as st

from ui import budget, common, views

common.page_header("Importance", "Block influence and single-layer removal loss per decoder layer; per-head and "
                   "per-neuron scores as layers × units heatmaps, measured on calibration records of the chosen data.")
loaded = common.loaded_model(need_weights=True)
from compression.methods import importance, prune  # noqa: E402 - after the first paint (app.py)

source = common.data_source("calibration")
saved = budget.current()

left, middle, right = st.columns(3)
unit_method = left.selectbox("Head / neuron scorer", importance.UNIT_METHODS, key="importance_scorer",
                             help="taylor: first-order |W·∂L/∂W| (the paper); activation: Minitron; "
                                  "magnitude: |W|, no data")
n_samples = middle.select_slider("Calibration records", options=[8, 16, 32, 64], value=32, key="importance_samples",
                                 help="a seeded random subset (with images) of the sidebar's data")
sort_units = right.toggle("Sort units within each layer", value=False, key="importance_sort")
right.caption(f"Budget from Budget & what-if: remove {saved.ratio:.0%} of the language model.")

big = sum(p.numel() for p in loaded.model.parameters()) > 5e8
if big and not st.button("Compute importance (slow for a model this size on CPU)"):
    st.stop()


# Kept in memory by the stored file's name (model fingerprint, records, kind, method, precision): a rerun
# reads no CSV (a 7B's neuron scores are 350 k rows) and plans no budget it planned before.
@st.cache_data(max_entries=32, show_spinner=False)
def scores(stored_as: str, _calibration, kind: str, method: str):
    return importance.cached_importance(loaded, kind, method, _calibration)


@st.cache_data(max_entries=64, show_spinner=False)
def budget_marks(stored_as: tuple[str, ...], ratio: float, unit_method: str, _layers, _heads, _neurons):
    """The layers, heads and neurons a layer / width plan of ``ratio`` removes, or why it cannot be planned."""
    removed_layers, removed_heads, removed_neurons = [], set(), set()
    try:
        removed_layers = prune.make_plan(loaded, "layer", ratio=ratio, scores=_layers).layers_removed
        width = prune.make_plan(loaded, "width", ratio=ratio, scores={"heads": _heads, "neurons": _neurons},
                                scorer=unit_method)
        removed_heads = views.removed_units(width, "heads", _heads)
        removed_neurons = views.removed_units(width, "neurons", _neurons)
    except ValueError as e:
        return removed_layers, removed_heads, removed_neurons, common.one_line(e)
    return removed_layers, removed_heads, removed_neurons, None


with st.spinner("Scoring on calibration records (stored, so only the first time is slow)…"), \
        common.shown_as_message():
    calibration = common.selection("calibration", n_samples, order="random")
    wanted = {"layers": ("layers", "block_influence"), "removal": ("layers", "removal_loss"),
              "heads": ("heads", unit_method), "neurons": ("neurons", unit_method)}
    stored_as = {name: str(importance.importance_path(loaded, kind, method, calibration))
                 for name, (kind, method) in wanted.items()}
    layers, removal, heads, neurons = (scores(stored_as[name], calibration, *wanted[name]) for name in wanted)

removed_layers, removed_heads, removed_neurons, problem = budget_marks(
    (stored_as["layers"], stored_as["heads"], stored_as["neurons"]), saved.ratio, unit_method, layers, heads, neurons)
if problem:
    st.warning(f"The budget cannot be highlighted: {problem}")

st.subheader("Layers")
st.plotly_chart(views.layer_importance_chart(layers, removal, removed_layers), key="layer_chart")
if removed_layers:
    st.caption(f"A layerwise prune of {saved.ratio:.0%} removes layers {', '.join(map(str, removed_layers))} "
               "(lowest block influence).")

st.subheader("Attention heads and MLP neurons")
a, b = st.columns(2)
with a:
    st.plotly_chart(views.unit_heatmap(heads, "heads", removed_heads, sort_units,
                                       f"Heads: {unit_method} score (measured)"), key="heads_map")
with b:
    st.plotly_chart(views.unit_heatmap(neurons, "neurons", removed_neurons, sort_units,
                                       f"MLP neurons: {unit_method} score (measured; gaps = removed)"),
                    key="neurons_map")
if removed_heads or removed_neurons:
    st.caption(f"A widthwise prune of {saved.ratio:.0%} removes {len(removed_heads)} heads and "
               f"{len(removed_neurons)} neurons; the first and last layers stay whole (paper default).")
common.measured(f"{calibration.describe()}, prompted with {loaded.prompt.name} (loss on the answers); "
                "scores are stored under cache/importance.")
with st.expander("Scores as tables"):
    st.download_button("Layer scores (CSV)", layers.to_csv(index=False), "layer_importance.csv", "text/csv")
    st.dataframe(layers, hide_index=True)
    st.dataframe(heads, hide_index=True)
