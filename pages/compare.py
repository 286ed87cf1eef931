"""Compare: the same image and question to the original and to a chosen run, side by side — answers,
latency, and each model's token map."""
import hashlib

import streamlit as st

from compression.runs import jobs
from ui import common, inputs, views

common.page_header("Compare", "Ask the original and a compressed run the same question about the same image.")
runs = {r["name"]: r for r in jobs.list_runs()}
if not runs:
    st.info("No finished runs yet: launch a job on the Compress page.")
    st.stop()
name = common.run_picker("Run", list(runs), key="compare_run")
run = runs[name]
recipe = run.get("recipe") or run["metrics"].get("recipe") or {}
st.caption(f"`{name}`: {views._describe_recipe(recipe)}, compressed from `{recipe.get('model', '?')}`.")
original = common.loaded_model(need_weights=True, source=recipe.get("model", "reference"))
compressed = common.loaded_model(need_weights=True, source=f"run:{name}")
import torch  # noqa: E402 - after the first paint (app.py)

from compression.measure.evaluate import normalize_answer  # noqa: E402
from compression.methods import tokens  # noqa: E402
from ui import compare  # noqa: E402

generate_fn = compare.generate_fn_for(recipe)

image, question, expected = inputs.image_and_question("compare")
image_hash = hashlib.sha1(inputs.png_bytes(image)).hexdigest()
background = views.image_uri(image)  # encoded once for both maps


@st.cache_data(max_entries=64, show_spinner="Both models answer (timed interleaved)…")
def answers(run_name: str, image_hash: str, question: str) -> dict:
    return compare.answer_both({"original": (original, None), "compressed": (compressed, generate_fn)},
                               image, question)


@st.cache_data(max_entries=64, show_spinner="Scoring visual tokens…")
def token_scores(source: str, fingerprint: str, image_hash: str, question: str, alpha: float) -> dict:
    return tokens.analyze_tokens(common.loaded_model(source=source), image, question, alpha=alpha)


with common.shown_as_message():
    result = answers(name, image_hash, question)
keep_ratio = (recipe.get("visual_tokens") or {}).get("keep_ratio", 1.0)
columns = st.columns(2)
for column, (label, loaded, key, shown) in zip(columns, (("Original", original, "original", recipe.get("model")),
                                                          ("Compressed", compressed, "compressed", name))):
    with column:
        st.markdown(f"#### {label}: `{shown}`")
        reply = result[key]
        st.markdown(f"**Answer:** {reply['answer'] or '(empty)'}")
        if expected is not None:
            right = normalize_answer(reply["answer"]) == normalize_answer(expected)
            (st.success if right else st.warning)("correct" if right else f"wrong (expected {expected})")
        st.metric("Latency (answer, batch 1)", f"{reply['latency_ms']:.0f} ms",
                  None if key == "original" else
                  f"{result['original']['latency_ms'] / reply['latency_ms']:.2f}x vs original", delta_color="off")
        if tokens is not None:
            with common.shown_as_message():
                scores = token_scores(loaded.name, loaded.fingerprint, image_hash, question,
                                      (recipe.get("visual_tokens") or {}).get("alpha", 0.7))
            grid, what = compare.score_grid(scores, recipe)
            dropped = None
            if key == "compressed" and keep_ratio < 1 and (recipe.get("visual_tokens") or {}).get("scorer") != "random":
                num = len(grid) * len(grid[0])
                kept = set(tokens.select_tokens(torch.tensor(grid).flatten()[None],
                                                tokens.keep_count(num, keep_ratio))[0].tolist())
                dropped = set(range(num)) - kept
            title = what + (f", {keep_ratio:.0%} kept" if dropped else "")
            st.plotly_chart(views.token_map(background, grid, title, dropped=dropped), key=f"compare_map_{key}")
common.measured("answers timed interleaved (original, compressed, …): median of 3 after one warm-up; token maps are "
                "the run's visual-token score at the projector output (QAPruner hybrid unless the recipe says otherwise).")
