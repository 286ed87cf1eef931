"""MLLM Compression Studio, the entry page (Model): what the chosen model is made of, how well it
answers and how fast.

    streamlit run app.py          # http://localhost:8501, the reference model chosen

The other pages are ``pages/*.py`` (Streamlit's multipage folder). Each page, this one included,
opens with ``common.page_header``, which sets the page up itself (page config, sidebar links, model
picker), so a bookmark straight to ``/compress`` works without this file having run first.
Pages are thin: each calls the library in ``compression/``.
"""
import streamlit as st

from compression.data import shapes as data
from compression.measure import evaluate
from compression.models import parameter_counts
from ui import common, measure, views

common.page_header("Model", "Architecture, parameters, measured accuracy and latency, and one answer.")
loaded = common.loaded_model()
counts = parameter_counts(loaded.model, loaded.anatomy)

st.subheader("Architecture")
st.graphviz_chart(views.architecture_dot(loaded))
st.dataframe(views.architecture_rows(loaded), hide_index=True,
             column_config={"params": st.column_config.NumberColumn(format="localized")})

left, right = st.columns([2, 1])
with left:
    st.plotly_chart(views.parameter_chart(views.parameter_breakdown(loaded)), key="params_chart")
with right:
    st.metric("Parameters", f"{counts['total'] / 1e6:,.2f} M")
    st.metric("Language model", f"{counts['language'] / 1e6:,.2f} M",
              help="decoder layers, embeddings and LM head")
    if loaded.has_weights:
        st.metric("Size on disk", f"{evaluate.size_bytes(loaded.model, loaded.path) / 1e6:,.1f} MB")
    else:
        st.metric("Size at fp32 (estimated)", f"{counts['total'] * 4 / 1e9:,.2f} GB")
st.caption("Parameter counts are counted from the model's tensors (exact).")

if not loaded.has_weights:
    st.info(f"`{loaded.name}` is config-only (no weights): accuracy, latency and answers need weights. "
            "The Budget & what-if page works with it.")
    st.stop()

st.subheader("Accuracy and latency")
samples = st.select_slider("Test questions", options=[20, 50, 100, 200, 500], value=100, key="model_samples")
report = measure.cached_evaluation(loaded, samples)
if st.button("Measure accuracy and latency", type="primary" if report is None else "secondary"):
    with st.spinner(f"Answering {samples} test questions and timing prefill / decode…"):
        report = measure.measure(loaded, samples)
if report is None:
    st.caption("Not measured yet for this model and number of questions.")
else:
    a, b, c = st.columns(3)
    a.metric("Exact-match accuracy", f"{report['accuracy']:.1%}", help=f"{report['samples']} test questions")
    b.metric("Prefill (image + question)", f"{report['prefill_ms']:.1f} ms")
    c.metric("Decode", f"{report['decode_tokens_per_s']:.0f} tokens/s")
    st.plotly_chart(views.per_type_chart(report["per_type"], "Accuracy per question type (measured)"),
                    key="per_type_chart")
    common.measured(f"{report['samples']} held-out questions; latency is the median of "
                    f"{report.get('latency_repeats', 9)} runs at batch 1 after warm-up, "
                    f"{report['measured_at']}.")

st.subheader("A ShapesVQA sample")
index = st.number_input("Test sample", min_value=0, max_value=data.SPLIT_SIZES["test"] - 1, value=0, step=1)


@st.cache_data(max_entries=256, show_spinner=False)
def answer_of(source: str, fingerprint: str, index: int) -> tuple[str, float]:
    sample = data.generate("test", index)
    return evaluate.ask(common.loaded_model(source=source), sample.image, sample.question)


sample = data.generate("test", int(index))
image_col, text_col = st.columns([1, 2])
image_col.image(sample.image.resize((256, 256), 0), caption=f"test #{index} (64x64, shown enlarged)")
with text_col:
    answer, ms = answer_of(loaded.name, loaded.fingerprint, int(index))
    st.markdown(f"**Question** ({sample.qtype}): {sample.question}")
    st.markdown(f"**Model's answer:** {answer}  \n**Expected:** {sample.answer}")
    if evaluate.normalize_answer(answer) == evaluate.normalize_answer(sample.answer):
        st.success("correct")
    else:
        st.warning("wrong")
    common.measured(f"answered in {ms:.0f} ms (first call includes warm-up)")
