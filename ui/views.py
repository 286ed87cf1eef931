"""Plain functions that turn library objects into tables, diagrams and plotly figures for the pages.

No streamlit here, so each view is testable on its own. Every figure title says whether its
numbers are *measured* (a model ran on this machine) or *estimated* (arithmetic on the config).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go

if TYPE_CHECKING:
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
    projector = sum(p.numel() for p in anatomy.projector_parameters(model) if id(p) not in seen)
    seen.update(id(p) for p in anatomy.projector_parameters(model))  # first: Qwen's merger is inside its tower
    rows = [("vision tower", "vision tower", _count(model.get_submodule(anatomy.vision_tower), seen)),
            ("projector", "projector", projector),
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


# The charts below are built from graph_objects traces, not plotly.express: px assembles a figure through
# many validated updates (80-140 ms a chart on 2 cores, on every rerun of the page); the same traces cost a
# few milliseconds.

def parameter_chart(breakdown: pd.DataFrame) -> go.Figure:
    """Parameters per part, stacked by component."""
    bars = [go.Bar(x=rows["params"], y=rows["part"], name=component, orientation="h", texttemplate="%{x:.3s}",
                   hovertemplate=f"%{{y}}, {component}: %{{x:,}} parameters<extra></extra>")
            for component, rows in breakdown.groupby("component", sort=False)]
    return go.Figure(bars, layout=dict(
        title="Parameters by part (counted from the model)", barmode="relative", height=260,
        margin=dict(l=10, r=10, t=40, b=10), xaxis_title="parameters",
        yaxis=dict(categoryorder="array", categoryarray=list(PART_COLORS)[::-1])))


def architecture_rows(loaded) -> pd.DataFrame:
    """One row per stage of the pipeline: vision tower -> projector -> language model."""
    a = loaded.anatomy
    config = loaded.model.config
    text = config.text_config
    counts = parameter_breakdown(loaded).groupby("part", sort=False)["params"].sum()
    return pd.DataFrame([
        {"stage": "vision tower", "type": a.vision_model_type.replace("_vision_model", "").upper(),
         "layers": a.vision_layers, "hidden": a.vision_hidden_size,
         "detail": f"{a.image_size}px image, patch {a.patch_size} -> {a.visual_tokens} visual tokens"
                   + ("" if a.visual_tokens_fixed else " (varies with the image)"),
         "params": int(counts["vision tower"])},
        {"stage": "projector", "type": getattr(config, "projector_hidden_act", "mlp") + " MLP",
         "layers": 2, "hidden": text.hidden_size,
         "detail": f"{a.vision_hidden_size} -> {text.hidden_size}", "params": int(counts["projector"])},
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
    bar = go.Bar(x=list(per_type), y=list(per_type.values()), texttemplate="%{y:.0%}",
                 hovertemplate="%{x}: %{y:.1%}<extra></extra>")
    return go.Figure(bar, layout=dict(title=title, height=300, margin=dict(l=10, r=10, t=40, b=10),
                                      xaxis_title="question type", yaxis=dict(title="accuracy", range=[0, 1],
                                                                              tickformat=".0%")))


def pareto_front(frame: pd.DataFrame, cost: str, quality: str) -> pd.DataFrame:
    """Rows not dominated by another row (lower-or-equal cost with higher-or-equal quality), by cost
    (``compression.runs.sweep.pareto_front``: equal rows stay together)."""
    from compression.runs.sweep import pareto_front as front

    indices = front([(float(c), float(q)) for c, q in zip(frame[cost], frame[quality])])
    return frame.iloc[indices].sort_values([cost, quality], ascending=[True, False])


def tradeoff_chart(frame: pd.DataFrame, cost: str, quality: str, cost_label: str, title: str) -> go.Figure:
    """Scatter of every model with its Pareto front drawn as a step line."""
    traces = [go.Scatter(x=rows[cost], y=rows[quality], mode="markers", name=kind, text=rows["name"],
                         marker=dict(size=12),
                         hovertemplate=f"<b>%{{text}}</b><br>{cost_label}: %{{x:.3g}}<br>accuracy %{{y:.1%}}"
                                       "<extra></extra>")
              for kind, rows in frame.groupby("kind", sort=False)]
    front = pareto_front(frame, cost, quality)
    if len(front) > 1:
        traces.append(go.Scatter(x=front[cost], y=front[quality], mode="lines", line_shape="hv",
                                 line=dict(color="grey", dash="dot"), name="Pareto front"))
    return go.Figure(traces, layout=dict(title=title, height=360, margin=dict(l=10, r=10, t=40, b=10),
                                         xaxis_title=cost_label, legend_title_text="kind",
                                         yaxis=dict(title="accuracy", tickformat=".0%", range=[0, 1.05])))


# --------------------------------------------------------------------------------------------- sweep fronts

METHOD_COLORS = {"layer": "#4C78A8", "width": "#F58518", "none": "#54A24B"}
RECOVERY_SYMBOLS = {"none": "circle", "projector": "square", "lora": "triangle-up", "sft": "diamond",
                    "sft+hidden": "diamond-wide", "sft+logits": "hexagon"}
FRONT_AXES = {  # cost column -> (how to show it, axis label, what-if column)
    "size_bytes": (lambda v: v / 1e6, "weights on disk (MB)", "size_bytes_estimated"),
    "prefill_ms": (lambda v: v, "prefill latency (ms, batch 1)", "prefill_ms_estimated"),
}


def front_chart(table: pd.DataFrame, cost: str, front: list[str], title: str, chosen: str | None = None) -> go.Figure:
    """A sweep's measured points on accuracy vs ``cost`` (``size_bytes`` or ``prefill_ms``): the original
    as a star, runs coloured by pruning method and shaped by recovery, the Pareto front as a step line
    through ringed points, each run's what-if estimate as a hollow marker joined to it, and the chosen
    run ringed in red. Every marker carries ``customdata = [name, recipe]`` (hover and selection)."""
    scale, axis_label, estimate = FRONT_AXES[cost]

    # plain lists, not Series: plotly converts a Series through narwhals, 5x the cost of a list
    def x(rows: pd.DataFrame, column: str = cost) -> list:
        return scale(rows[column]).tolist()

    def y(rows: pd.DataFrame) -> list:
        return rows["accuracy"].tolist()

    def names(rows: pd.DataFrame) -> list:
        return rows[["name", "recipe"]].to_numpy().tolist()

    # a click selects a point (Streamlit's on_select); the "chosen" ring marks it, so nothing is dimmed
    undimmed = dict(selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)))
    traces = []
    runs = table[table["kind"] == "run"]
    guessed = runs.dropna(subset=[estimate, cost])
    if len(guessed):
        xs, ys = [], []
        for measured, guess, accuracy in zip(x(guessed), x(guessed, estimate), y(guessed)):
            xs += [measured, guess, None]
            ys += [accuracy, accuracy, None]
        traces.append(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="#bbbbbb", width=1), hoverinfo="skip",
                                 showlegend=False, **undimmed))
        traces.append(go.Scatter(
            x=x(guessed, estimate), y=y(guessed), mode="markers", name="what-if estimate",
            marker=dict(symbol="circle-open", size=9, color="#888888", line=dict(width=1.5)),
            customdata=names(guessed), **undimmed,
            hovertemplate=f"<b>what-if for %{{customdata[0]}}</b><br>%{{customdata[1]}}<br>estimated {axis_label}: "
                          "%{x:.3g}<extra></extra>"))
    for method, group in runs.groupby("method", sort=False):
        traces.append(go.Scatter(
            x=x(group), y=y(group), mode="markers", name=f"{method}wise" if method != "none" else "not pruned",
            marker=dict(size=12, color=METHOD_COLORS.get(method, "#72B7B2"),
                        symbol=[RECOVERY_SYMBOLS.get(r, "circle") for r in group["recovery"]],
                        line=dict(width=1, color="white")),
            customdata=names(group), **undimmed,
            hovertemplate=f"<b>%{{customdata[0]}}</b><br>%{{customdata[1]}}<br>accuracy %{{y:.1%}}<br>{axis_label}: "
                          "%{x:.3g}<extra></extra>"))
    originals = table[table["kind"] == "original"].dropna(subset=[cost])
    if len(originals):
        traces.append(go.Scatter(
            x=x(originals), y=y(originals), mode="markers", name="original",
            marker=dict(symbol="star", size=18, color="#333333"), customdata=names(originals), **undimmed,
            hovertemplate=f"<b>%{{customdata[0]}}</b><br>accuracy %{{y:.1%}}<br>{axis_label}: "
                          "%{x:.3g}<extra></extra>"))
    on_front = table[table["name"].isin(front)].dropna(subset=[cost]).sort_values([cost, "accuracy"],
                                                                                ascending=[True, False])
    if len(on_front):
        traces.append(go.Scatter(x=x(on_front), y=y(on_front), mode="lines+markers", line_shape="hv",
                                 line=dict(color="#E45756", dash="dot", width=2),
                                 marker=dict(symbol="circle-open", size=20, color="#E45756", line=dict(width=2)),
                                 name="Pareto front", hoverinfo="skip", **undimmed))
    picked = table[table["name"] == chosen].dropna(subset=[cost]) if chosen else table.iloc[0:0]
    if len(picked):
        traces.append(go.Scatter(x=x(picked), y=y(picked), mode="markers", name="chosen",
                                 marker=dict(symbol="circle-open", size=28, color="#B279A2", line=dict(width=3)),
                                 hoverinfo="skip", **undimmed))
    low = max(0.0, float(table["accuracy"].min()) - 0.1) if len(table) else 0.0
    return go.Figure(traces, layout=dict(
        title=title, height=420, margin=dict(l=10, r=10, t=40, b=10), xaxis_title=axis_label,
        yaxis=dict(title="accuracy (measured)", tickformat=".0%", range=[low, 1.02]),
        legend=dict(orientation="h", y=-0.18), clickmode="event+select"))


def recovery_legend() -> str:
    """Which marker shape is which recovery, for the caption under the front charts."""
    return ", ".join(f"{symbol.replace('-', ' ')} = {name}" for name, symbol in RECOVERY_SYMBOLS.items())


def front_table(table: pd.DataFrame, front: dict[str, list[str]]) -> pd.DataFrame:
    """The sweep's points as a table: measured and what-if columns, and which front each is on."""
    shown = pd.DataFrame({
        "name": table["name"], "recipe": table["recipe"], "accuracy": table["accuracy"],
        "size MB": table["size_bytes"] / 1e6, "size MB (what-if)": table["size_bytes_estimated"] / 1e6,
        "prefill ms": table["prefill_ms"], "prefill ms (what-if)": table["prefill_ms_estimated"],
        "front (size)": table["name"].isin(front.get("size", [])),
        "front (latency)": table["name"].isin(front.get("prefill_ms", []))})
    return shown.reset_index(drop=True)


# --------------------------------------------------------------------------------------------- what-if

WHAT_IF_QUANTITIES = {  # label -> how to read it from a what_if dict
    "parameters": lambda e: e["params_total"],
    "size (bf16)": lambda e: e["bytes"]["bf16"],
    "prefill FLOPs": lambda e: e["prefill_flops"]["total"],
    "prefill latency": lambda e: e["prefill_ms"],
    "decode latency / token": lambda e: e["decode_ms_per_token"],
    "KV cache / token": lambda e: e["kv_cache_bytes_per_token"]["bf16"],
}


def what_if_table(estimates: dict[str, dict]) -> pd.DataFrame:
    """One row per quantity, one column per model variant (``original``, ``layerwise``, ``widthwise``)."""
    return pd.DataFrame({name: {q: read(e) for q, read in WHAT_IF_QUANTITIES.items()}
                         for name, e in estimates.items()})


def what_if_chart(estimates: dict[str, dict], hardware: str) -> go.Figure:
    """Each quantity relative to the original (1.0 = unchanged), one bar per pruning paradigm."""
    table = what_if_table(estimates)
    relative = table.div(table["original"], axis=0).drop(columns="original")
    bars = [go.Bar(x=list(relative.index), y=relative[paradigm], name=paradigm, texttemplate="%{y:.2f}",
                   hovertemplate=f"{paradigm}, %{{x}}: %{{y:.3f}} of the original<extra></extra>")
            for paradigm in relative.columns]
    return go.Figure(bars, layout=dict(
        title=f"Estimated, relative to the original (1.0 = unchanged; latency on {hardware})", barmode="group",
        height=360, margin=dict(l=10, r=10, t=40, b=10), yaxis_title="after / before",
        shapes=[dict(type="line", xref="paper", x0=0, x1=1, y0=1.0, y1=1.0,
                     line=dict(dash="dot", color="grey"))]))


def _three_digits(n: float, units: tuple[tuple[str, float], ...], base: str) -> str:
    for unit, scale in units:
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"
    return f"{n:.3g} {base}".strip()


def human_count(n: float) -> str:
    return _three_digits(n, (("B", 1e9), ("M", 1e6), ("k", 1e3)), "")


def human_bytes(n: float) -> str:
    return _three_digits(n, (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)), "B")


def human_flops(n: float) -> str:
    return _three_digits(n, (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)), "FLOP")


def human_ms(ms: float) -> str:
    return f"{ms / 1000:,.3g} s" if ms >= 1000 else f"{ms:.3g} ms"


def width_summary(plan, anatomy) -> str:
    """'keeps 3 of 6 heads and 192 of 512 MLP neurons in layers 3-6; the others whole' from a width plan."""
    heads, neurons = plan.widths_after["num_attention_heads"], plan.widths_after["intermediate_size"]
    changed = [i for i, (h, m) in enumerate(zip(heads, neurons))
               if h != anatomy.heads_per_layer[i] or m != anatomy.intermediate_per_layer[i]]
    if not changed:
        return "keeps every head and neuron"
    kinds = sorted({(heads[i], neurons[i]) for i in changed})
    layers = f"layers {changed[0]}-{changed[-1]}" if changed == list(range(changed[0], changed[-1] + 1)) \
        else "layers " + ", ".join(map(str, changed))
    what = "; ".join(f"{h} of {anatomy.num_attention_heads} heads and {m} of {anatomy.intermediate_size} MLP neurons"
                     for h, m in kinds)
    return f"keeps {what} in {layers}; the other layers stay whole"


# --------------------------------------------------------------------------------------------- importance

def layer_importance_chart(block_influence: pd.DataFrame, removal_loss: pd.DataFrame | None,
                           removed: list[int]) -> go.Figure:
    """Block influence per layer (bars; the layers the budget removes in red) beside the removal loss.

    Two side-by-side axes laid out directly (what ``make_subplots`` builds, at a fifth of its cost)."""
    panels = [("block influence (1 - cos(h_in, h_out))", block_influence, "#4C78A8", "block influence")]
    if removal_loss is not None:
        panels.append(("loss increase when the layer is skipped", removal_loss, "#72B7B2", "removal loss"))
    width, gap = (1.0, 0.0) if len(panels) == 1 else (0.45, 0.1)
    traces, layout = [], dict(height=320, margin=dict(l=10, r=10, t=60, b=10), annotations=[],
                              title="Layer importance (measured on calibration samples; red = removed by the budget)")
    for n, (title, frame, color, name) in enumerate(panels):
        suffix = "" if n == 0 else str(n + 1)
        colors = ["#E45756" if layer in removed else color for layer in frame["layer"]]
        traces.append(go.Bar(x=frame["layer"], y=frame["score"], marker_color=colors, name=name, showlegend=False,
                             xaxis=f"x{suffix}", yaxis=f"y{suffix}"))
        left = n * (width + gap)
        layout[f"xaxis{suffix}"] = dict(domain=[left, left + width], anchor=f"y{suffix}", title_text="decoder layer",
                                        dtick=1)
        layout[f"yaxis{suffix}"] = dict(anchor=f"x{suffix}")
        layout["annotations"].append(dict(text=title, x=left + width / 2, y=1.0, xref="paper", yref="paper",
                                          xanchor="center", yanchor="bottom", showarrow=False, font=dict(size=16)))
    return go.Figure(traces, layout=layout)


def removed_units(plan, kind: str, frame: pd.DataFrame) -> set[tuple[int, int]]:
    """(layer, unit) pairs a width plan drops: every unit of an eligible layer not in its kept list."""
    kept = plan.heads_kept if kind == "heads" else plan.neurons_kept
    unit = "head" if kind == "heads" else "neuron"
    kept_pairs = {(layer, int(u)) for layer, units in kept.items() for u in units}
    return {(layer, u) for layer, u in zip(frame["layer"].astype(int).tolist(), frame[unit].astype(int).tolist())
            if layer in kept and (layer, u) not in kept_pairs}


def unit_heatmap(frame: pd.DataFrame, kind: str, removed: set[tuple[int, int]], sort: bool,
                 title: str) -> go.Figure:
    """Layers x units heatmap of scores; removed units are hatched out with an x marker (heads)
    or dimmed (neurons, too many to mark one by one)."""
    unit = "head" if kind == "heads" else "neuron"
    grid = frame.pivot(index="layer", columns=unit, values="score").sort_index()
    values = grid.to_numpy(dtype=float)
    rows = {layer: i for i, layer in enumerate(grid.index)}
    columns = {u: j for j, u in enumerate(grid.columns)}
    mask = np.zeros(values.shape, dtype=bool)
    for layer, u in removed:
        if layer in rows and u in columns:
            mask[rows[layer], columns[u]] = True
    if sort:  # each layer's units in descending score order (ties in index order): how peaked the importance is
        order = np.argsort(-values, axis=1, kind="stable")
        values, mask = np.take_along_axis(values, order, axis=1), np.take_along_axis(mask, order, axis=1)
    shown = values.copy()
    if kind == "neurons" and mask.any():
        shown[mask] = float("nan")  # a removed neuron is a gap in its layer's row
    traces = [go.Heatmap(z=shown, x=list(range(grid.shape[1])), y=list(grid.index), colorscale="Viridis",
                         colorbar=dict(title="score"),
                         hovertemplate=f"layer %{{y}}, {unit} %{{x}}: %{{z:.4g}}<extra></extra>")]
    if kind == "heads" and removed:
        ys, xs = mask.nonzero()
        traces.append(go.Scatter(x=xs, y=[grid.index[i] for i in ys], mode="markers", name="removed by the budget",
                                 marker=dict(symbol="x", size=14, color="#E45756", line=dict(width=2))))
    return go.Figure(traces, layout=dict(
        title=title, height=340, margin=dict(l=10, r=10, t=50, b=10),
        xaxis_title=f"{unit} (sorted by score)" if sort else unit,
        yaxis=dict(title="decoder layer", autorange="reversed", dtick=1), legend=dict(orientation="h", y=-0.2)))


# --------------------------------------------------------------------------------------------- token maps

def model_view(image, side: int = 256):
    """The image as the vision tower sees it (centre square, as CLIP's shortest-edge resize + centre
    crop does), enlarged to ``side`` pixels for display."""
    from PIL import Image

    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return image.crop(box).resize((side, side), Image.Resampling.NEAREST if s <= 128 else Image.Resampling.BILINEAR)


def image_uri(image, side: int = 256) -> str:
    """``model_view(image)`` as a PNG data URI: encode it once for every map of the same image."""
    import base64
    import io

    buffer = io.BytesIO()
    model_view(image, side).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def token_map(image, grid: list[list[float]], title: str, dropped: set[int] | None = None,
              show_scores: bool = True) -> go.Figure:
    """The score grid laid over the image (one cell per visual token); dropped tokens greyed out.

    ``image``: a PIL image, or its ``image_uri`` when several maps share it. The dropped tokens are one
    heatmap layer over the image (a cell per token, blank where kept), not a shape per token: hundreds of
    shapes cost the server seconds to validate and the browser to draw."""
    rows, cols = len(grid), len(grid[0])
    if show_scores:
        traces = [go.Heatmap(z=grid, opacity=0.55, colorscale="Inferno", showscale=False,
                             hovertemplate="row %{y}, col %{x}: %{z:.4g}<extra></extra>")]
    else:  # an invisible layer, so the axes span the grid and hovering still names the token
        traces = [go.Heatmap(z=grid, opacity=0.0, showscale=False, hovertemplate="row %{y}, col %{x}<extra></extra>")]
    if dropped:
        cells = np.full(rows * cols, np.nan)
        cells[sorted(dropped)] = 1.0
        traces.append(go.Heatmap(z=cells.reshape(rows, cols), zmin=0, zmax=1, opacity=0.82, showscale=False,
                                 colorscale=[[0, "rgb(40,40,40)"], [1, "rgb(40,40,40)"]], hoverongaps=False,
                                 hovertemplate="row %{y}, col %{x}: dropped<extra></extra>"))
    source = image if isinstance(image, str) else image_uri(image)
    return go.Figure(traces, layout=dict(
        title=dict(text=title, font=dict(size=13)), height=260, margin=dict(l=0, r=0, t=36, b=0),
        images=[dict(source=source, xref="x", yref="y", x=-0.5, y=-0.5, sizex=cols, sizey=rows, sizing="stretch",
                     layer="below")],
        xaxis=dict(visible=False, range=[-0.5, cols - 0.5], constrain="domain"),
        yaxis=dict(visible=False, range=[rows - 0.5, -0.5], scaleanchor="x")))


# --------------------------------------------------------------------------------------------- results

def _describe_recipe(recipe: dict) -> str:
    prune, recovery = recipe.get("prune", {}), recipe.get("recovery", {})
    parts = []
    if prune.get("method", "none") != "none":
        parts.append(f"{prune['method']} {prune['ratio']:.0%}")
    if recovery.get("mode", "none") != "none":
        kd = recovery.get("distillation", "none")
        train = (recipe.get("data") or {}).get("train") or {}
        amount = (f"{train['fraction']:g}" if train.get("fraction") is not None else
                  f"{train.get('samples')} records" if train.get("samples") else
                  f"{recovery.get('data_fraction', 0):g}")  # runs written before the data section
        parts.append(f"{recovery['mode']}{' + KD ' + kd if kd != 'none' else ''} on {amount}")
    if recipe.get("quantize", "none") != "none":
        parts.append(recipe["quantize"])
    keep = (recipe.get("visual_tokens") or {}).get("keep_ratio", 1.0)
    if keep < 1:
        parts.append(f"{keep:.0%} visual tokens")
    return ", ".join(parts) or "no compression"


def measured_on(run: dict) -> str:
    """What a run's accuracies were measured on (runs written before the data section: ShapesVQA)."""
    m = run["metrics"]
    return m.get("eval_data") or f"{m.get('eval_samples')} ShapesVQA questions"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _peak(metrics: dict, key: str) -> float | None:
    """The largest per-stage peak a run recorded (measured or predicted), in GiB."""
    values = ((metrics.get("memory") or {}).get(key) or {}).values()
    return round(max(values) / 2**30, 2) if values else None


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """One row per finished run and one per distinct original it was compressed from (measured numbers)."""
    rows, originals = [], {}
    for run in runs:
        m, recipe = run["metrics"], run.get("recipe") or run["metrics"].get("recipe") or {}
        o, c = m["original"], m["compressed"]
        what_if = m.get("what_if") or {}
        estimate = (what_if.get("compressed") or {}).get("prefill_ms"), (what_if.get("original") or {}).get("prefill_ms")
        prune = recipe.get("prune", {})
        rows.append({
            "name": run["name"], "kind": f"{prune.get('method', 'none')}wise" if prune.get("method", "none") != "none"
            else "not pruned", "original": recipe.get("model", "?"), "recipe": _describe_recipe(recipe),
            "accuracy": c["accuracy"], "accuracy kept": (m.get("kept") or {}).get("accuracy"),
            "params": c["params_total"], "size MB": c["size_bytes"] / 1e6, "prefill ms": c.get("prefill_ms"),
            "decode tok/s": c.get("decode_tokens_per_s"),
            "prefill speedup (measured)": (m.get("speedup") or {}).get("prefill"),
            "prefill speedup (estimated)": _ratio(estimate[1], estimate[0]),
            "params kept (measured)": c["params_total"] / o["params_total"],
            "params kept (estimated)": _ratio((what_if.get("compressed") or {}).get("params_total"),
                                             (what_if.get("original") or {}).get("params_total")),
            "measured on": measured_on(run),
            "hardware": (m.get("hardware") or {}).get("label", "cpu, fp32 (before hardware was recorded)"),
            "peak memory GiB (measured)": _peak(m, "peak_bytes"),
            "peak memory GiB (predicted)": _peak(m, "predicted_bytes"),
            "eval questions": m.get("eval_samples"), "finished": pd.Timestamp(run["finished"], unit="s").floor("s"),
        })
        # an original is one point per (model, evaluation data): runs scored on other data are not comparable
        originals.setdefault((recipe.get("model", "?"), measured_on(run)), {
            "name": f"original: {recipe.get('model', '?')}", "kind": "original", "original": recipe.get("model", "?"),
            "recipe": "as loaded", "accuracy": o["accuracy"], "accuracy kept": 1.0, "params": o["params_total"],
            "size MB": o["size_bytes"] / 1e6, "prefill ms": o.get("prefill_ms"),
            "decode tok/s": o.get("decode_tokens_per_s"), "measured on": measured_on(run),
            "eval questions": m.get("eval_samples")})
    return pd.DataFrame(list(originals.values()) + rows)


def per_type_frame(runs: list[dict]) -> pd.DataFrame:
    """Accuracy per question type: ``model, question type, accuracy`` for each run and its original."""
    rows, seen = [], set()
    for run in runs:
        m = run["metrics"]
        original = f"original: {(run.get('recipe') or {}).get('model', '?')}"
        if original not in seen:
            seen.add(original)
            rows += [{"model": original, "question type": t, "accuracy": a} for t, a in m["original"]["per_type"].items()]
        rows += [{"model": run["name"], "question type": t, "accuracy": a} for t, a in m["compressed"]["per_type"].items()]
    return pd.DataFrame(rows)


def per_type_comparison(frame: pd.DataFrame) -> go.Figure:
    bars = [go.Bar(x=rows["question type"], y=rows["accuracy"], name=model,
                   hovertemplate=f"{model}, %{{x}}: %{{y:.1%}}<extra></extra>")
            for model, rows in frame.groupby("model", sort=False)]
    return go.Figure(bars, layout=dict(title="Accuracy per question type (measured)", barmode="group", height=360,
                                       margin=dict(l=10, r=10, t=40, b=10), xaxis_title="question type",
                                       yaxis=dict(title="accuracy", tickformat=".0%", range=[0, 1.05]),
                                       legend=dict(orientation="h", y=-0.25)))


def what_if_vs_measured(frame: pd.DataFrame) -> go.Figure:
    """Estimated against measured, per run: prefill speedup and parameters kept (y = x is a perfect estimate)."""
    runs = frame[frame["kind"] != "original"]
    fig = go.Figure()
    for label, est, meas, symbol in (("prefill speedup", "prefill speedup (estimated)", "prefill speedup (measured)",
                                      "circle"),
                                     ("params kept", "params kept (estimated)", "params kept (measured)", "diamond")):
        ok = runs.dropna(subset=[est, meas])
        fig.add_trace(go.Scatter(x=ok[est], y=ok[meas], mode="markers", name=label, text=ok["name"],
                                 marker=dict(size=12, symbol=symbol),
                                 hovertemplate="%{text}<br>estimated %{x:.3f}<br>measured %{y:.3f}<extra></extra>"))
    values = pd.concat([runs[c] for c in runs.columns if "(estimated)" in c or "(measured)" in c]).dropna()
    if len(values):
        low, high = float(values.min()) * 0.9, float(values.max()) * 1.1
        fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="estimate = measurement",
                                 line=dict(color="grey", dash="dot")))
    fig.update_layout(title="What-if estimate vs measurement (after / before, per run)", height=360,
                      xaxis_title="estimated (roofline, cpu profile)", yaxis_title="measured on this machine",
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig


# --------------------------------------------------------------------------------------------- export

def load_snippet(export_dir) -> str:
    """The exact Python that loads an exported folder (plain transformers, or remote code when the
    widths differ per layer and the folder ships its modeling file)."""
    import json
    from pathlib import Path

    folder = Path(export_dir)
    config = json.loads((folder / "config.json").read_text())
    remote = ", trust_remote_code=True" if config.get("auto_map") else ""  # per-layer widths ship their code
    return (f"from transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            f"model = AutoModelForImageTextToText.from_pretrained({str(folder)!r}{remote})\n"
            f"processor = AutoProcessor.from_pretrained({str(folder)!r})")
