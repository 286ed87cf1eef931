"""Plain functions that turn library objects into tables, diagrams and plotly figures for the pages.

No streamlit here, so each view is testable on its own. Every figure title says whether its
numbers are *measured* (a model ran on this machine) or *estimated* (arithmetic on the config).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import plotly.express as px
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
    frame = pd.DataFrame({"question type": list(per_type), "accuracy": list(per_type.values())})
    fig = px.bar(frame, x="question type", y="accuracy", title=title, range_y=[0, 1], text_auto=".0%")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10), yaxis_tickformat=".0%")
    return fig


def pareto_front(frame: pd.DataFrame, cost: str, quality: str) -> pd.DataFrame:
    """Rows not dominated by another row (lower-or-equal cost with higher-or-equal quality), by cost
    (``compression.runs.sweep.pareto_front``: equal rows stay together)."""
    from compression.runs.sweep import pareto_front as front

    indices = front([(float(c), float(q)) for c, q in zip(frame[cost], frame[quality])])
    return frame.iloc[indices].sort_values([cost, quality], ascending=[True, False])


def tradeoff_chart(frame: pd.DataFrame, cost: str, quality: str, cost_label: str, title: str) -> go.Figure:
    """Scatter of every model with its Pareto front drawn as a step line."""
    fig = px.scatter(frame, x=cost, y=quality, color="kind", hover_name="name", title=title,
                     labels={cost: cost_label, quality: "accuracy"})
    front = pareto_front(frame, cost, quality)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front[cost], y=front[quality], mode="lines", line_shape="hv",
                                 line=dict(color="grey", dash="dot"), name="Pareto front"))
    fig.update_traces(marker=dict(size=12))
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=40, b=10), yaxis_tickformat=".0%",
                      yaxis_range=[0, 1.05])
    return fig


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
    fig = go.Figure()
    runs = table[table["kind"] == "run"]
    guessed = runs.dropna(subset=[estimate, cost])
    if len(guessed):
        xs, ys = [], []
        for row in guessed.itertuples():
            xs += [scale(getattr(row, cost)), scale(getattr(row, estimate)), None]
            ys += [row.accuracy, row.accuracy, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="#bbbbbb", width=1), hoverinfo="skip",
                                 showlegend=False))
        fig.add_trace(go.Scatter(
            x=scale(guessed[estimate]), y=guessed["accuracy"], mode="markers", name="what-if estimate",
            marker=dict(symbol="circle-open", size=9, color="#888888", line=dict(width=1.5)),
            customdata=guessed[["name", "recipe"]].to_numpy(),
            hovertemplate=f"<b>what-if for %{{customdata[0]}}</b><br>%{{customdata[1]}}<br>estimated {axis_label}: "
                          "%{x:.3g}<extra></extra>"))
    for method, group in runs.groupby("method", sort=False):
        fig.add_trace(go.Scatter(
            x=scale(group[cost]), y=group["accuracy"], mode="markers", name=f"{method}wise" if method != "none"
            else "not pruned", marker=dict(size=12, color=METHOD_COLORS.get(method, "#72B7B2"),
                                           symbol=[RECOVERY_SYMBOLS.get(r, "circle") for r in group["recovery"]],
                                           line=dict(width=1, color="white")),
            customdata=group[["name", "recipe"]].to_numpy(),
            hovertemplate=f"<b>%{{customdata[0]}}</b><br>%{{customdata[1]}}<br>accuracy %{{y:.1%}}<br>{axis_label}: "
                          "%{x:.3g}<extra></extra>"))
    originals = table[table["kind"] == "original"].dropna(subset=[cost])
    if len(originals):
        fig.add_trace(go.Scatter(
            x=scale(originals[cost]), y=originals["accuracy"], mode="markers", name="original",
            marker=dict(symbol="star", size=18, color="#333333"), customdata=originals[["name", "recipe"]].to_numpy(),
            hovertemplate=f"<b>%{{customdata[0]}}</b><br>accuracy %{{y:.1%}}<br>{axis_label}: %{{x:.3g}}<extra></extra>"))
    on_front = table[table["name"].isin(front)].dropna(subset=[cost]).sort_values([cost, "accuracy"],
                                                                                ascending=[True, False])
    if len(on_front):
        fig.add_trace(go.Scatter(x=scale(on_front[cost]), y=on_front["accuracy"], mode="lines+markers",
                                 line_shape="hv", line=dict(color="#E45756", dash="dot", width=2),
                                 marker=dict(symbol="circle-open", size=20, color="#E45756", line=dict(width=2)),
                                 name="Pareto front", hoverinfo="skip"))
    picked = table[table["name"] == chosen].dropna(subset=[cost]) if chosen else table.iloc[0:0]
    if len(picked):
        fig.add_trace(go.Scatter(x=scale(picked[cost]), y=picked["accuracy"], mode="markers", name="chosen",
                                 marker=dict(symbol="circle-open", size=28, color="#B279A2", line=dict(width=3)),
                                 hoverinfo="skip"))
    # a click selects a point (Streamlit's on_select); the "chosen" ring marks it, so nothing is dimmed
    fig.update_traces(selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=1)))
    low = max(0.0, float(table["accuracy"].min()) - 0.1) if len(table) else 0.0
    fig.update_layout(title=title, height=420, margin=dict(l=10, r=10, t=40, b=10), yaxis_tickformat=".0%",
                      yaxis_range=[low, 1.02], xaxis_title=axis_label, yaxis_title="accuracy (measured)",
                      legend=dict(orientation="h", y=-0.18), clickmode="event+select")
    return fig


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
    long = relative.reset_index(names="quantity").melt(id_vars="quantity", var_name="paradigm", value_name="ratio")
    fig = px.bar(long, x="quantity", y="ratio", color="paradigm", barmode="group", text_auto=".2f",
                 title=f"Estimated, relative to the original (1.0 = unchanged; latency on {hardware})",
                 labels={"ratio": "after / before", "quantity": ""})
    fig.add_hline(y=1.0, line_dash="dot", line_color="grey")
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="")
    return fig


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
    """Block influence per layer (bars; the layers the budget removes in red) beside the removal loss."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2 if removal_loss is not None else 1, subplot_titles=(
        "block influence (1 - cos(h_in, h_out))", "loss increase when the layer is skipped"))
    colors = ["#E45756" if layer in removed else "#4C78A8" for layer in block_influence["layer"]]
    fig.add_trace(go.Bar(x=block_influence["layer"], y=block_influence["score"], marker_color=colors,
                         name="block influence", showlegend=False), row=1, col=1)
    if removal_loss is not None:
        colors = ["#E45756" if layer in removed else "#72B7B2" for layer in removal_loss["layer"]]
        fig.add_trace(go.Bar(x=removal_loss["layer"], y=removal_loss["score"], marker_color=colors,
                             name="removal loss", showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="decoder layer", dtick=1)
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=60, b=10),
                      title="Layer importance (measured on calibration samples; red = removed by the budget)")
    return fig


def removed_units(plan, kind: str, frame: pd.DataFrame) -> set[tuple[int, int]]:
    """(layer, unit) pairs a width plan drops: every unit of an eligible layer not in its kept list."""
    kept = plan.heads_kept if kind == "heads" else plan.neurons_kept
    unit = "head" if kind == "heads" else "neuron"
    return {(int(r.layer), int(getattr(r, unit))) for r in frame.itertuples()
            if int(r.layer) in kept and int(getattr(r, unit)) not in set(kept[int(r.layer)])}


def unit_heatmap(frame: pd.DataFrame, kind: str, removed: set[tuple[int, int]], sort: bool,
                 title: str) -> go.Figure:
    """Layers x units heatmap of scores; removed units are hatched out with an x marker (heads)
    or dimmed (neurons, too many to mark one by one)."""
    unit = "head" if kind == "heads" else "neuron"
    grid = frame.pivot(index="layer", columns=unit, values="score").sort_index()
    mask = pd.DataFrame(False, index=grid.index, columns=grid.columns)
    for layer, u in removed:
        if layer in mask.index and u in mask.columns:
            mask.loc[layer, u] = True
    if sort:  # each layer's units in descending score order: shows how peaked the importance is
        order = grid.apply(lambda row: row.sort_values(ascending=False).index.tolist(), axis=1)
        grid = pd.DataFrame([grid.loc[i, order[i]].to_numpy() for i in grid.index], index=grid.index)
        mask = pd.DataFrame([mask.loc[i, order[i]].to_numpy() for i in mask.index], index=mask.index)
    values = grid.to_numpy(dtype=float)
    shown = values.copy()
    if kind == "neurons" and mask.to_numpy().any():
        shown[mask.to_numpy()] = float("nan")  # a removed neuron is a gap in its layer's row
    fig = go.Figure(go.Heatmap(z=shown, x=list(range(grid.shape[1])), y=list(grid.index), colorscale="Viridis",
                               colorbar=dict(title="score"),
                               hovertemplate=f"layer %{{y}}, {unit} %{{x}}: %{{z:.4g}}<extra></extra>"))
    if kind == "heads" and removed:
        ys, xs = mask.to_numpy().nonzero()
        fig.add_trace(go.Scatter(x=xs, y=[grid.index[i] for i in ys], mode="markers", name="removed by the budget",
                                 marker=dict(symbol="x", size=14, color="#E45756", line=dict(width=2))))
    fig.update_layout(title=title, height=340, margin=dict(l=10, r=10, t=50, b=10),
                      xaxis_title=f"{unit} (sorted by score)" if sort else unit, yaxis_title="decoder layer",
                      yaxis=dict(autorange="reversed", dtick=1), legend=dict(orientation="h", y=-0.2))
    return fig


# --------------------------------------------------------------------------------------------- token maps

def model_view(image, side: int = 256):
    """The image as the vision tower sees it (centre square, as CLIP's shortest-edge resize + centre
    crop does), enlarged to ``side`` pixels for display."""
    from PIL import Image

    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return image.crop(box).resize((side, side), Image.Resampling.NEAREST if s <= 128 else Image.Resampling.BILINEAR)


def token_map(image, grid: list[list[float]], title: str, dropped: set[int] | None = None,
              show_scores: bool = True) -> go.Figure:
    """The score grid laid over the image (one cell per visual token); dropped tokens greyed out."""
    rows, cols = len(grid), len(grid[0])
    fig = go.Figure()
    if show_scores:
        fig.add_trace(go.Heatmap(z=grid, opacity=0.55, colorscale="Inferno", showscale=False,
                                 hovertemplate="row %{y}, col %{x}: %{z:.4g}<extra></extra>"))
    else:  # an invisible layer, so the axes span the grid and hovering still names the token
        fig.add_trace(go.Heatmap(z=grid, opacity=0.0, showscale=False,
                                 hovertemplate="row %{y}, col %{x}<extra></extra>"))
    fig.add_layout_image(source=model_view(image), xref="x", yref="y", x=-0.5, y=-0.5, sizex=cols, sizey=rows,
                         sizing="stretch", layer="below")
    for token in sorted(dropped or ()):
        r, c = divmod(token, cols)
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5, line_width=0,
                      fillcolor="rgba(40,40,40,0.82)")
    fig.update_xaxes(visible=False, range=[-0.5, cols - 0.5], constrain="domain")
    fig.update_yaxes(visible=False, range=[rows - 0.5, -0.5], scaleanchor="x")
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=260, margin=dict(l=0, r=0, t=36, b=0))
    return fig


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
    fig = px.bar(frame, x="question type", y="accuracy", color="model", barmode="group",
                 title="Accuracy per question type (measured)", range_y=[0, 1.05])
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=40, b=10), yaxis_tickformat=".0%",
                      legend=dict(orientation="h", y=-0.25))
    return fig


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
