"""Compress: a recipe form (prefilled from the paper's advice), launched as a background job; a Sweep
section that launches a grid of recipes as one group; a live job list with logs, cancel and resume.
The selected job id lives in the query string (``?job=…``), so a refresh or a new tab reconnects to it."""
import hashlib

import streamlit as st
import yaml

from compression.runs.recipe import LAYER_SCORERS, TOKEN_SCORERS, WIDTH_SCORERS, Recipe
from compression.runs import jobs
from ui import advice, common, jobs_view, memory_view, sweep_view

common.page_header("Compress", "Prune → recover on a small data fraction → (optionally) quantize and prune "
                   "visual tokens → evaluate, as a background job. Leave the page; the job keeps running.")
source = common.current_source()
loaded = common.loaded_model()  # a bad source stops here with its one-line message
if not loaded.has_weights:
    st.info(f"`{source}` is config-only (no weights): a compression run needs weights. Pick the reference model, "
            "a local folder or a finished run in the sidebar.")

# ------------------------------------------------------------------------------------------- the recipe form
data = common.current_data()
prefill = st.session_state.get("advised_recipe")
if prefill:
    st.caption("Prefilled from the paper's advice on the Budget & what-if page.")
else:
    prefill = advice.recipe_for(source, 0.3, advice.decision_flow(0.3))
    st.caption("Prefilled with the paper's advice for removing 30 % (change the budget on Budget & what-if).")
prefill = {**prefill, "model": source}
p, r = prefill.get("prune", {}), prefill.get("recovery", {})
v, d = prefill.get("visual_tokens", {}), prefill.get("data", {})
train_default = (d.get("train") or {}).get("source") if isinstance(d.get("train"), dict) else d.get("train")
if train_default is None:
    train_default = "shapes" if source == "reference" else ""
train_path = train_default if isinstance(train_default, str) else train_default.get("path", "")
train_root = "" if isinstance(train_default, str) else train_default.get("image_root", "")
# Widget keys carry the prefill's hash: a new prefill shows new values instead of the old widgets' state.
tag = hashlib.sha1(repr(sorted(prefill.items())).encode()).hexdigest()[:8]

with st.form(f"recipe_{tag}"):
    st.markdown(f"**Model:** `{source}` · **evaluated on:** `{common.data_label(data)}` (change both in the "
                "sidebar)")
    name = st.text_input("Run name (optional)", value=prefill.get("name") or "", placeholder="e.g. layer30-kd")
    c1, c2, c3 = st.columns(3)
    with c1:
        st.markdown("**Prune**")
        methods = ["none", "layer", "width"]
        method = st.selectbox("Method", methods, index=methods.index(p.get("method", "none")))
        ratio = st.slider("Fraction of the language model removed", 0.0, 0.9, float(p.get("ratio", 0.0)), 0.05)
        scorers = ["default", *LAYER_SCORERS, *WIDTH_SCORERS]
        scorer = st.selectbox("Scorer", scorers, index=scorers.index(p.get("scorer")) if p.get("scorer") in scorers
                              else 0, help="layer: block_influence; width: taylor (paper), activation (Minitron), "
                                           "magnitude")
        layers = loaded.anatomy.num_layers
        start, stop = (p.get("layer_range") or (None, None))
        first = st.number_input("Eligible layers from", 0, max(0, layers - 1), int(start or 0),
                                help="width default: the first 3 and the last layer stay whole (the paper)")
        last = st.number_input("… up to (exclusive; 0 = default range)", 0, layers, int(stop or 0))
        calibration = st.number_input("Calibration records", 1, 1000, 10)
    with c2:
        st.markdown("**Recover**")
        modes = ["none", "projector", "lora", "full"]
        mode = st.selectbox("Train", modes, index=modes.index(r.get("mode", "none")))
        kds = ["none", "logits", "hidden", "hidden+logits"]
        distillation = st.selectbox("Distillation from the original", kds, index=kds.index(r.get("distillation", "none")),
                                    help="hidden = SFT + hidden-state L2 (the paper's best)")
        train_source = st.text_input("Training data (recovery and calibration)", value=train_path,
                                     placeholder="/path/to/train.json, a datasets folder, or shapes")
        train_images = st.text_input("Its image folder (default: the file's folder)", value=train_root)
        fraction = (d.get("train") or {}).get("fraction", 0.05) if isinstance(d.get("train"), dict) else 0.05
        data_fraction = st.number_input("Fraction of the training data", 0.0001, 1.0, float(fraction), 0.01,
                                        format="%.4f")
        learning_rate = st.number_input("Learning rate", 1e-6, 1e-1, float(r.get("learning_rate", 1e-4)),
                                        format="%.0e")
        max_steps = st.number_input("Max steps (0 = one full epoch)", 0, 100_000, int(r.get("max_steps") or 0))
        checkpointing = st.checkbox("Gradient checkpointing", value=bool(r.get("gradient_checkpointing", False)),
                                    help="recompute activations in the backward: much less memory, ~30 % slower")
        job_slots = jobs.slots()
        processes = st.number_input(
            "Processes (job slots: one per GPU)", 1, len(job_slots),
            min(len(job_slots), int((prefill.get("hardware") or {}).get("processes", 1))),
            help=f"this machine's slots: {', '.join(job_slots)}. Above 1 the job waits for that many free slots and "
                 "runs under accelerate launch: recovery DDP (FSDP for full finetuning), evaluation split")
    with c3:
        st.markdown("**Quantize, visual tokens, evaluate**")
        formats = ["none", "int8", "nf4"]
        quantize = st.selectbox("Quantize", formats, index=formats.index(prefill.get("quantize", "none")))
        keep_ratio = st.slider("Visual tokens kept", 0.05, 1.0, float(v.get("keep_ratio", 1.0)), 0.05)
        token_scorer = st.selectbox("Token scorer", TOKEN_SCORERS,
                                    index=TOKEN_SCORERS.index(v.get("scorer", "attention")))
        alpha = st.slider("α (semantic vs quantization)", 0.0, 1.0, float(v.get("alpha", 0.7)), 0.05)
        eval_samples = st.number_input("Evaluation records (of the sidebar's data)", 1, 100_000,
                                       int((d.get("eval") or {}).get("samples", 200)
                                           if isinstance(d.get("eval"), dict) else 200))
    submitted = st.form_submit_button("Launch job", type="primary", disabled=not loaded.has_weights)

if submitted:
    if data is None:
        st.error(f"Pick the data to evaluate `{source}` on in the sidebar first: the built-in shapes are only the "
                 "reference model's data.")
        st.stop()
    train_value = train_source.strip() if not train_images.strip() else {"path": train_source.strip(),
                                                                          "image_root": train_images.strip()}
    raw_data = {"eval": {"source": data, "samples": int(eval_samples)}}
    if train_source.strip():
        raw_data["train"] = {"source": train_value, "fraction": data_fraction}
        raw_data["calibration"] = {"source": train_value, "samples": int(calibration)}
    raw = {"name": name.strip() or None, "model": source,
           "prune": {"method": method, "ratio": ratio, "scorer": None if scorer == "default" else scorer,
                     "layer_range": [int(first), int(last)] if last else None},
           "recovery": {"mode": mode, "distillation": distillation, "learning_rate": learning_rate,
                        "max_steps": int(max_steps) or None, "epochs": r.get("epochs", 1),
                        "batch_size": r.get("batch_size", 16), "gradient_checkpointing": checkpointing},
           "quantize": quantize,
           "visual_tokens": {"keep_ratio": keep_ratio, "scorer": token_scorer, "alpha": alpha},
           "data": raw_data, "hardware": {**dict(zip(("device", "dtype"), common.current_hardware())),
                                          "processes": int(processes), "kernels": common.current_kernels()}}
    with common.shown_as_message():
        recipe = Recipe.from_dict(raw)
    plan = memory_view.plan(loaded, recipe)
    if plan["fits"] is False:
        st.error(f"Not launched: the run's estimated peak does not fit. Would fit: {plan['suggestion']}")
        memory_view.plan_table(plan, common.hardware_label())
        st.stop()
    with common.shown_as_message():
        job_id = jobs.submit(recipe)
    jobs_view.select(job_id)
    st.toast(f"Job {job_id} launched")

with st.expander("Recipe as YAML (the same file `python -m compression run` takes)"):
    st.code(yaml.safe_dump(prefill, sort_keys=False), language="yaml")

with st.expander("Memory plan: each stage's estimated peak on the sidebar's hardware (checked again at launch)"):
    try:
        prefilled = Recipe.from_dict({**prefill, "hardware": dict(zip(("device", "dtype"), common.current_hardware()))})
        memory_view.plan_table(memory_view.plan(loaded, prefilled), common.hardware_label())
    except ValueError as e:  # e.g. no data chosen yet for a model other than the reference
        st.caption(f"No plan for the prefilled recipe: {common.one_line(e)}")

# ------------------------------------------------------------------------------------------- a sweep
sweep_view.builder(source, loaded.has_weights, data,
                   ({"path": train_path, "image_root": train_root} if train_root else train_path) or None)

# ------------------------------------------------------------------------------------------- live jobs
st.subheader("Jobs")
jobs_view.live_jobs(jobs)
