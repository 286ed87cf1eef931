"""Budget & what-if: choose how much to remove, see what each pruning paradigm would give, and the
paper's advice for this budget, data size and compute."""
import streamlit as st

from ui import advice, budget, common, memory_view, views

common.page_header("Budget & what-if", "How much to remove, what layerwise and widthwise pruning would give, "
                   "and what the paper advises. Works with config-only models (no weights needed).")
loaded = common.loaded_model()
from compression.models import parameter_counts  # noqa: E402 - after the first paint (app.py)
from compression.methods import prune  # noqa: E402

counts = parameter_counts(loaded.model, loaded.anatomy)
saved = budget.current()

st.subheader("Budget")
left, right = st.columns(2)
with left:
    modes = ["fraction of language-model parameters", "target size"]
    mode = st.radio("Budget as", modes, index=modes.index(saved.mode), horizontal=True, key="budget_mode")
    if mode == "target size":
        dtype = st.radio("stored as", ["fp32", "bf16"], index=["fp32", "bf16"].index(saved.dtype),
                         horizontal=True, key="budget_dtype")
        full_mb = counts["total"] * {"fp32": 4, "bf16": 2}[dtype] / 1e6
        target_mb = st.number_input(f"Target size in MB at {dtype} (now {full_mb:,.1f} MB)", min_value=0.0,
                                    value=float(saved.target_mb or round(full_mb * 0.8, 1)), key="budget_target_mb")
        ratio = None
    else:
        dtype, target_mb = saved.dtype, None
        ratio = st.slider("Remove this fraction of the language model", 0.05, 0.90, float(saved.ratio), 0.05,
                          key="budget_ratio")
with right:
    fractions = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    data_fraction = st.select_slider("Training data available for recovery", options=fractions,
                                     value=saved.data_fraction, format_func=lambda f: f"{f:.0%}", key="budget_data")
    compute = st.radio("Compute for recovery", list(advice.COMPUTE_CHOICES),
                       index=list(advice.COMPUTE_CHOICES).index(saved.compute), key="budget_compute",
                       format_func=advice.COMPUTE_CHOICES.get)
    profiles = ["cpu", *prune.HARDWARE]
    hardware = st.selectbox("Hardware profile for latency estimates", profiles,
                            index=profiles.index(saved.hardware) if saved.hardware in profiles else 0,
                            key="budget_hardware")


# --------------------------------------------------------------------------------------------- what-if
# Plans and estimates are kept per model (name and fingerprint) and budget: every rerun of the page
# (each widget change, each visit) would otherwise plan both paradigms again (~0.1 s for a 7B config).
@st.cache_data(max_entries=64, show_spinner=False)
def planned(model: str, fingerprint: str, method: str, ratio, target_mb, dtype: str):
    """``(plan, None)``, or ``(None, the one-line reason)`` when the budget cannot be planned."""
    try:
        return prune.make_plan(loaded, method, ratio=ratio, target_mb=target_mb, target_dtype=dtype), None
    except ValueError as e:
        return None, common.one_line(e)


@st.cache_data(max_entries=64, show_spinner=False)
def estimated(model: str, fingerprint: str, budget: tuple, hardware: str, _plan) -> dict:
    return prune.what_if(loaded, _plan, hardware)


plans, problems = {}, {}
for method in ("layer", "width"):
    plan, problem = planned(loaded.name, loaded.fingerprint, method, ratio, target_mb, dtype)
    if plan is None:
        problems[method] = problem
    else:
        plans[method] = plan
if not plans:
    st.error(f"Infeasible budget: {problems['layer']}")
    st.stop()
achieved = {m: p.ratio_achieved for m, p in plans.items()}
budget.remember(mode=mode, ratio=ratio if ratio is not None else max(achieved.values()), target_mb=target_mb,
                dtype=dtype, data_fraction=data_fraction, compute=compute, hardware=hardware)

st.subheader("What-if: layerwise vs widthwise")
with common.shown_as_message():
    estimates = {"original": estimated(loaded.name, loaded.fingerprint, (), hardware, None)}
    estimates.update({("layerwise" if m == "layer" else "widthwise"):
                      estimated(loaded.name, loaded.fingerprint, (m, ratio, target_mb, dtype), hardware, p)
                      for m, p in plans.items()})
columns = st.columns(2)
for column, method in zip(columns, ("layer", "width")):
    name = "layerwise" if method == "layer" else "widthwise"
    with column:
        st.markdown(f"**{name.capitalize()}**")
        if method in problems:
            st.warning(problems[method])
            continue
        plan, e, base = plans[method], estimates[name], estimates["original"]
        what = (f"removes {len(plan.layers_removed)} of {loaded.anatomy.num_layers} decoder layers "
                f"({', '.join(map(str, plan.layers_removed))})" if method == "layer" else
                views.width_summary(plan, loaded.anatomy))
        st.caption(f"{plan.ratio_achieved:.1%} of the language model removed: {what}")
        a, b, c = st.columns(3)
        a.metric("Parameters", views.human_count(e["params_total"]),
                 f"{e['params_total'] / base['params_total'] - 1:+.1%}", delta_color="inverse")
        b.metric("Size (bf16)", views.human_bytes(e["bytes"]["bf16"]),
                 f"{e['bytes']['bf16'] / base['bytes']['bf16'] - 1:+.1%}", delta_color="inverse")
        c.metric("Prefill FLOPs", views.human_flops(e["prefill_flops"]["total"]),
                 f"{e['prefill_flops']['total'] / base['prefill_flops']['total'] - 1:+.1%}", delta_color="inverse")
        a.metric(f"Prefill on {hardware}", views.human_ms(e["prefill_ms"]),
                 f"{e['prefill_ms'] / base['prefill_ms'] - 1:+.1%}", delta_color="inverse")
        b.metric("Decode / token", views.human_ms(e["decode_ms_per_token"]),
                 f"{e['decode_ms_per_token'] / base['decode_ms_per_token'] - 1:+.1%}", delta_color="inverse")
        c.metric("KV cache / token", views.human_bytes(e["kv_cache_bytes_per_token"]["bf16"]),
                 f"{e['kv_cache_bytes_per_token']['bf16'] / base['kv_cache_bytes_per_token']['bf16'] - 1:+.1%}",
                 delta_color="inverse")
        st.caption(f"Stored as int8: {views.human_bytes(e['bytes']['int8'])}; as nf4: {views.human_bytes(e['bytes']['nf4'])}.")
st.plotly_chart(views.what_if_chart(estimates, hardware), key="what_if_chart")
with st.expander("All estimates as a table"):
    st.dataframe(views.what_if_table(estimates))
common.estimated(f"counts are exact from the config shapes; sizes per storage dtype; latency is a roofline on "
                 f"the {hardware} profile ({estimates['original']['hardware_profile']['source']}).")

# --------------------------------------------------------------------------------------------- advice
st.subheader("What the paper advises")
advised_ratio = ratio if ratio is not None else achieved.get("layer", max(achieved.values()))
with common.shown_as_message():
    suggestion = advice.decision_flow(advised_ratio, data_fraction, compute)
    suggestion = memory_view.fit_advice(suggestion, loaded, plans.get(suggestion.method))
st.success(f"**{suggestion.summary}.**  \n{suggestion.reason}")
st.caption("Decision flow of Huang et al., arXiv 2507.20749 (docs/methods.md); full finetuning checked against the "
           f"sidebar's device ({common.hardware_label()}) by the memory plan's estimates.")
if not loaded.has_weights:
    st.caption("A config-only model cannot be compressed (no weights); pick a model with weights to launch a job.")
elif st.button("Prefill the Compress form with this advice", type="primary"):
    with common.shown_as_message():
        recipe = advice.recipe_for(common.current_source(), advised_ratio, suggestion)
    st.session_state["advised_recipe"] = recipe
    st.switch_page("pages/compress.py")
