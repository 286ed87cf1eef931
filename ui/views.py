"""Plain functions that turn library objects into tables, diagrams and plotly figures for the pages.

No streamlit here, so each view is testable on its own. Every figure title says whether its
numbers are *measured* (a model ran on this machine) or *estimated* (arithmetic on the config).
"""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from torch import nn

PART_COLORS = {"vision tower": "#4C78A8", "projector": "#F58518", "language model": "#54A24B"}


def _count(module: nn.Module, seen: set[int]) -> int:
    n = 0
    for p in module.parameters():
        if id(p) not in seen:  # tied weights count once, as save_pretrained stores them once
            seen.add(id(p))
            n += p.numel()
    return n


def parameter_breakdown(loaded) -> pd.DataFrame:
    """Parameters per part and component: ``part, component, params`` (works on meta models too)."""
    model, anatomy = loaded.model, loaded.anatomy
    seen: set[int] = set()
    rows = [("vision tower", "vision tower", _count(model.get_submodule(anatomy.vision_tower), seen)),
            ("projector", "projector", _count(model.get_submodule(anatomy.projector), seen)),
            ("language model", "embeddings", _count(model.get_submodule(anatomy.embed_tokens), seen))]
    attention = mlp = 0
    for layer in anatomy.decoder_layers(model):
        attention += _count(layer.get_submodule(anatomy.attention), seen)
        mlp += _count(layer.get_submodule(anatomy.mlp), seen)
    rows += [("language model", "attention", attention), ("language model", "MLP", mlp),
             ("language model", "LM head", _count(model.get_submodule(anatomy.lm_head), seen))]
    rest = _count(model, seen)  # norms and anything else the layers hold
    rows.append(("language model", "norms", rest))
    return pd.DataFrame(rows, columns=["part", "component", "params"])


def parameter_chart(breakdown: pd.DataFrame) -> go.Figure:
    fig = px.bar(breakdown, x="params", y="part", color="component", orientation="h",
                 title="Parameters by part (counted from the model)",
                 labels={"params": "parameters", "part": ""}, text_auto=".3s")
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="",
                      yaxis=dict(categoryorder="array", categoryarray=list(PART_COLORS)[::-1]))
    return fig


def architecture_rows(loaded) -> pd.DataFrame:
    """One row per stage of the pipeline: vision tower -> projector -> language model."""
    a = loaded.anatomy
    config = loaded.model.config
    vision, text = config.vision_config, config.text_config
    counts = parameter_breakdown(loaded).groupby("part", sort=False)["params"].sum()
    return pd.DataFrame([
        {"stage": "vision tower", "type": a.vision_model_type.replace("_vision_model", "").upper(),
         "layers": vision.num_hidden_layers, "hidden": vision.hidden_size,
         "detail": f"{a.image_size}px image, patch {a.patch_size} -> {a.visual_tokens} visual tokens",
         "params": int(counts["vision tower"])},
        {"stage": "projector", "type": getattr(config, "projector_hidden_act", "mlp") + " MLP",
         "layers": 2, "hidden": text.hidden_size,
         "detail": f"{vision.hidden_size} -> {text.hidden_size}", "params": int(counts["projector"])},
        {"stage": "language model", "type": a.language_model_type.capitalize(), "layers": a.num_layers,
         "hidden": a.hidden_size,
         "detail": (f"{a.num_attention_heads} heads x {a.head_dim}, {a.num_key_value_heads} KV heads "
                    f"(GQA group {a.gqa_group_size}), MLP {a.intermediate_size}"
                    + ("" if a.uniform else ", widths differ per layer")),
         "params": int(counts["language model"])},
    ])


def architecture_dot(loaded) -> str:
    """A Graphviz diagram of image -> vision tower -> projector -> language model -> answer."""
    rows = architecture_rows(loaded).to_dict("records")

    def node(name: str, r: dict, color: str) -> str:
        label = f"{r['stage']}\\n{r['type']}, {r['layers']} layers, hidden {r['hidden']}\\n{r['detail']}\\n{r['params']:,} params"
        return f'{name} [label="{label}", fillcolor="{color}"];'

    v, p, lm = rows
    return "\n".join([
        "digraph G { rankdir=LR; bgcolor=transparent;",
        'node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, fontcolor=white];',
        'image [label="image", shape=note, fillcolor="#bbbbbb", fontcolor=black];',
        'question [label="question", shape=note, fillcolor="#bbbbbb", fontcolor=black];',
        node("vision", v, PART_COLORS["vision tower"]), node("projector", p, PART_COLORS["projector"]),
        node("lm", lm, PART_COLORS["language model"]),
        'answer [label="answer", shape=note, fillcolor="#bbbbbb", fontcolor=black];',
        "image -> vision -> projector -> lm -> answer; question -> lm;", "}"])


def per_type_chart(per_type: dict[str, float], title: str) -> go.Figure:
    frame = pd.DataFrame({"question type": list(per_type), "accuracy": list(per_type.values())})
    fig = px.bar(frame, x="question type", y="accuracy", title=title, range_y=[0, 1], text_auto=".0%")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10), yaxis_tickformat=".0%")
    return fig


def pareto_front(frame: pd.DataFrame, cost: str, quality: str) -> pd.DataFrame:
    """Rows not dominated by another row (lower-or-equal cost with higher-or-equal quality), by cost."""
    ordered = frame.dropna(subset=[cost, quality]).sort_values([cost, quality], ascending=[True, False])
    keep, best = [], float("-inf")
    for index, row in ordered.iterrows():
        if row[quality] > best:
            keep.append(index)
            best = row[quality]
    return ordered.loc[keep]


def tradeoff_chart(frame: pd.DataFrame, cost: str, quality: str, cost_label: str, title: str) -> go.Figure:
    """Scatter of every model with its Pareto front drawn as a step line."""
    fig = px.scatter(frame, x=cost, y=quality, color="kind", hover_name="name", title=title,
                     labels={cost: cost_label, quality: "accuracy"})
    front = pareto_front(frame, cost, quality)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front[cost], y=front[quality], mode="lines", line_shape="hv",
                                 line=dict(color="grey", dash="dot"), name="Pareto front"))
    fig.update_traces(marker=dict(size=12))
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=40, b=10), yaxis_tickformat=".0%")
    return fig
