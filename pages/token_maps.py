"""Token maps: per-visual-token scores laid over the image (QAPruner, arXiv 2604.02816), and which
tokens survive a keep ratio under each scorer."""
import hashlib

import streamlit as st

from ui import common, inputs, views

common.page_header("Token maps", "Outlier intensity, INT4 quantization error, semantic relevance and the QAPruner "
                   "hybrid score of every visual token, over the image.")
loaded = common.loaded_model(need_weights=True)
import torch  # noqa: E402 - after the first paint (app.py)

from compression.methods import tokens  # noqa: E402

image, question, _ = inputs.image_and_question("tokens")

a, b, c, d = st.columns(4)
where = a.selectbox("Scores taken at", ["projector output", *[f"decoder layer {i}" for i in
                                                              range(loaded.anatomy.num_layers)]], key="tokens_where")
semantic = b.radio("Semantic relevance", ["attention", "similarity"], horizontal=True, key="tokens_semantic",
                   help="attention: what the last text token attends to (FastV); similarity: cosine to the question")
alpha = c.slider("α (semantic weight in the hybrid)", 0.0, 1.0, 0.7, 0.05, key="tokens_alpha")
keep_ratio = d.slider("Keep ratio", 0.05, 1.0, 0.25, 0.05, key="tokens_keep")
layer = None if where == "projector output" else int(where.rsplit(" ", 1)[1])


@st.cache_data(max_entries=64, show_spinner="Scoring visual tokens…")
def analysis(source: str, fingerprint: str, image_hash: str, question: str, layer: int | None, alpha: float) -> dict:
    return tokens.analyze_tokens(common.loaded_model(source=source), image, question, layer=layer, alpha=alpha)


image_hash = hashlib.sha1(inputs.png_bytes(image)).hexdigest()
with common.shown_as_message():
    result = analysis(loaded.name, loaded.fingerprint, image_hash, question, layer, alpha)
semantic_grid = result[f"semantic_{semantic}"]
# the hybrid in the payload fuses attention; with similarity chosen, fuse the same way here
if semantic == "similarity":
    sem = torch.tensor(semantic_grid)
    hybrid_grid = tokens.hybrid_score(sem.flatten()[None], torch.tensor(result["quant_score"]).flatten()[None],
                                      alpha)[0].reshape(sem.shape).tolist()
else:
    hybrid_grid = result["hybrid"]

st.subheader("Scores over the image")
background = views.image_uri(image)  # encoded once for the seven maps
maps = [("Outlier intensity R (max − min)", result["outlier"]), ("INT4 quantization error E", result["quant_error"]),
        (f"Semantic relevance S^P ({semantic})", semantic_grid), (f"Hybrid S (α = {alpha:.2f})", hybrid_grid)]
for column, (title, grid) in zip(st.columns(4), maps):
    column.plotly_chart(views.token_map(background, grid, title), key=f"map_{title}")
common.measured(f"{result['visual_tokens']} visual tokens ({result['grid'][0]}x{result['grid'][1]}) at the "
                f"{result['where']}; attention read at decoder layer {result['attention_layer']}; brighter = higher.")

st.subheader(f"Which tokens survive at keep ratio {keep_ratio:.0%}")
num = result["grid"][0] * result["grid"][1]
keep = tokens.keep_count(num, keep_ratio)
survivors = [("semantic only", semantic_grid), ("quantization only (S^Q)", result["quant_score"]),
             (f"hybrid (α = {alpha:.2f})", hybrid_grid)]
for column, (title, grid) in zip(st.columns(3), survivors):
    kept = set(tokens.select_tokens(torch.tensor(grid).flatten()[None], keep)[0].tolist())
    column.plotly_chart(views.token_map(background, grid, f"{title}: {keep} of {num} kept",
                                        dropped=set(range(num)) - kept, show_scores=False), key=f"kept_{title}")
st.caption("Dark cells are the visual tokens dropped before the language model; the kept ones keep their order.")
with st.expander("Scores as a table"):
    st.dataframe(result["scores"], hide_index=True)
