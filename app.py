"""MLLM Compression Studio, the entry page (Model): what the chosen model is made of, how well it
answers and how fast.

    streamlit run app.py          # http://localhost:8501, the reference model chosen

The other pages are ``pages/*.py`` (Streamlit's multipage folder). Each page, this one included,
opens with ``common.page_header``, which sets the page up itself (page config, sidebar links, model
picker), so a bookmark straight to ``/compress`` works without this file having run first.
Pages are thin: each calls the library in ``compression/``.

First paint before torch: the title and sidebar are drawn first; torch, transformers and the model
load after them, behind the model cache's spinner, and only then the modules that need torch
(issue 12; ``tests/test_first_paint.py`` holds this).
"""
import streamlit as st

from ui import common

common.page_header("Model", "Architecture, parameters, measured accuracy and latency, and one answer.")
loaded = common.loaded_model()
from compression.measure import evaluate  # noqa: E402 - after the first paint, see above
from compression.models import parameter_counts  # noqa: E402
from ui import measure, views  # noqa: E402

counts = parameter_counts(loaded.model, loaded.anatomy)

st.subheader("Architecture")
a = loaded.anatomy
st.markdown(f"**Family:** {a.family} (`{a.model_type}`) · language model `{a.language_model_type}` · vision tower "
            f"`{a.vision_model_type}` · visual tokens per image: "
            + (f"{a.visual_tokens}" if a.visual_tokens_fixed else f"{a.visual_tokens} for one "
               f"{a.image_size} px image ({a.visual_tokens_note or 'the count follows the image'})"))
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
source = common.data_source("eval")
samples = st.select_slider("Records", options=[20, 50, 100, 200, 500], value=100, key="model_samples",
                           help="the first records (with an image) of the chosen data")
selection = common.selection("eval", samples)
kernels = common.current_kernels()
report = measure.cached_evaluation(loaded, selection, kernels)
if st.button("Measure accuracy and latency", type="primary" if report is None else "secondary"):
    with st.spinner(f"Answering {len(selection)} records and timing prefill / decode…"), common.shown_as_message():
        report = measure.measure(loaded, selection, kernels)
if report is None:
    st.caption(f"Not measured yet for this model on {selection.describe()}.")
else:
    a, b, c = st.columns(3)
    a.metric(f"Accuracy ({report['metric'].replace('_', ' ')})", f"{report['accuracy']:.1%}", help=report["data"])
    b.metric("Prefill (image + question)", f"{report['prefill_ms']:.1f} ms")
    c.metric("Decode", f"{report['decode_tokens_per_s']:.0f} tokens/s")
    if report["per_type"]:
        st.plotly_chart(views.per_type_chart(report["per_type"], "Accuracy per record type (measured)"),
                        key="per_type_chart")
    common.measured(f"{report['data']}, prompted with {report['prompt']}; latency is the median of "
                    f"{report.get('latency_repeats', 9)} runs at batch 1 after warm-up, on "
                    f"{report.get('kernels', 'eager')} kernels, {report['measured_at']}.")

st.subheader(f"A record of {source.label}")
index = st.number_input("Record", min_value=0, max_value=len(source) - 1, value=0, step=1, key="model_record")


@st.cache_data(max_entries=256, show_spinner=False)
def answer_of(model: str, fingerprint: str, data_key: str, index: int) -> tuple[str, float]:
    record = source.record(index)
    return evaluate.ask(common.loaded_model(source=model), record.images[0], record.question)


with common.shown_as_message():
    record = source.record(int(index))
if not record.images:
    st.info(f"Record {record.index} is text-only; pick a record with an image.")
    st.stop()
image_col, text_col = st.columns([1, 2])
shown = record.images[0]
image_col.image(shown.resize((256, 256), 0) if max(shown.size) <= 128 else shown, width=256,
                caption=f"record {record.index} ({shown.width}x{shown.height})")
with text_col:
    with common.shown_as_message():
        answer, ms = answer_of(loaded.name, loaded.fingerprint, source.fingerprint(), int(index))
    st.markdown(f"**Question**{f' ({record.type})' if record.type else ''}: {record.question}")
    st.markdown(f"**Model's answer:** {answer}  \n**Expected:** {record.answer}")
    if evaluate.normalize_answer(answer) == evaluate.normalize_answer(record.answer):
        st.success("correct")
    else:
        st.warning("wrong")
    common.measured(f"answered in {ms:.0f} ms (first call includes warm-up), prompted with {loaded.prompt.name}")
