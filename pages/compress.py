"""Compress: a recipe form (prefilled from the paper's advice), launched as a background job; a live
job list with logs, cancel and resume. The selected job id lives in the query string (``?job=…``),
so a refresh or a new tab reconnects to it."""
import hashlib

import streamlit as st

from compression.runs.recipe import LAYER_SCORERS, TOKEN_SCORERS, WIDTH_SCORERS, Recipe
from compression.runs import jobs
from ui import advice, common, jobs_view

common.page_header("Compress", "Prune → recover on a small data fraction → (optionally) quantize and prune "
                   "visual tokens → evaluate, as a background job. Leave the page; the job keeps running.")
source = common.current_source()
loaded = common.loaded_model()  # a bad source stops here with its one-line message
if not loaded.has_weights:
    st.info(f"`{source}` is config-only (no weights): a compression run needs weights. Pick the reference model, "
            "a local folder or a finished run in the sidebar.")

# ------------------------------------------------------------------------------------------- the recipe form
prefill_yaml = st.session_state.get("advised_recipe")
if prefill_yaml:
    prefill = Recipe.from_yaml(prefill_yaml)
    st.caption("Prefilled from the paper's advice on the Budget & what-if page.")
else:
    prefill = advice.recipe_for(source, 0.3, advice.decision_flow(0.3))
    st.caption("Prefilled with the paper's advice for removing 30 % (change the budget on Budget & what-if).")
if prefill.model != source:
    prefill = prefill.model_copy(update={"model": source})
# Widget keys carry the prefill's hash: a new prefill shows new values instead of the old widgets' state.
tag = hashlib.sha1(prefill.to_yaml().encode()).hexdigest()[:8]
p, r, v = prefill.prune, prefill.recovery, prefill.visual_tokens

with st.form(f"recipe_{tag}"):
    st.markdown(f"**Model:** `{source}` (change it in the sidebar)")
    name = st.text_input("Run name (optional)", value=prefill.name or "", placeholder="e.g. layer30-kd")
    c1, c2, c3 = st.columns(3)
    with c1:
        st.markdown("**Prune**")
        methods = ["none", "layer", "width"]
        method = st.selectbox("Method", methods, index=methods.index(p.method))
        ratio = st.slider("Fraction of the language model removed", 0.0, 0.9, float(p.ratio), 0.05)
        scorers = ["default", *LAYER_SCORERS, *WIDTH_SCORERS]
        scorer = st.selectbox("Scorer", scorers, index=scorers.index(p.scorer) if p.scorer in scorers else 0,
                              help="layer: block_influence; width: taylor (paper), activation (Minitron), magnitude")
        calibration = st.number_input("Calibration samples", 1, 1000, int(p.calibration_samples))
    with c2:
        st.markdown("**Recover**")
        modes = ["none", "projector", "lora", "full"]
        mode = st.selectbox("Train", modes, index=modes.index(r.mode))
        kds = ["none", "logits", "hidden", "hidden+logits"]
        distillation = st.selectbox("Distillation from the original", kds, index=kds.index(r.distillation),
                                    help="hidden = SFT + hidden-state L2 (the paper's best)")
        data_fraction = st.number_input("Data fraction", 0.001, 1.0, float(r.data_fraction), 0.01, format="%.3f")
        learning_rate = st.number_input("Learning rate", 1e-6, 1e-1, float(r.learning_rate), format="%.0e")
        max_steps = st.number_input("Max steps (0 = one full epoch)", 0, 100_000, int(r.max_steps or 0))
    with c3:
        st.markdown("**Quantize, visual tokens, evaluate**")
        formats = ["none", "int8", "nf4"]
        quantize = st.selectbox("Quantize", formats, index=formats.index(prefill.quantize))
        keep_ratio = st.slider("Visual tokens kept", 0.05, 1.0, float(v.keep_ratio), 0.05)
        token_scorer = st.selectbox("Token scorer", TOKEN_SCORERS, index=TOKEN_SCORERS.index(v.scorer))
        alpha = st.slider("α (semantic vs quantization)", 0.0, 1.0, float(v.alpha), 0.05)
        eval_samples = st.number_input("Test questions", 1, 2000, int(prefill.eval_samples))
    submitted = st.form_submit_button("Launch job", type="primary", disabled=not loaded.has_weights)

if submitted:
    raw = {"name": name.strip() or None, "model": source,
           "prune": {"method": method, "ratio": ratio, "scorer": None if scorer == "default" else scorer,
                     "calibration_samples": int(calibration)},
           "recovery": {"mode": mode, "distillation": distillation, "data_fraction": data_fraction,
                        "learning_rate": learning_rate, "max_steps": int(max_steps) or None,
                        "epochs": r.epochs, "batch_size": r.batch_size},
           "quantize": quantize,
           "visual_tokens": {"keep_ratio": keep_ratio, "scorer": token_scorer, "alpha": alpha},
           "eval_samples": int(eval_samples)}
    with common.shown_as_message():
        recipe = Recipe.from_dict(raw)
    with common.shown_as_message():
        job_id = jobs.submit(recipe)
    jobs_view.select(job_id)
    st.toast(f"Job {job_id} launched")

with st.expander("Recipe as YAML (the same file `python -m compression run` takes)"):
    st.code(prefill.to_yaml(), language="yaml")

# ------------------------------------------------------------------------------------------- live jobs
st.subheader("Jobs")
jobs_view.live_jobs(jobs)
