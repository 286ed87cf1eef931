"""Structural pruning of a LLaVA language model: budget -> plan -> surgery -> Hugging Face folder.

Follows Huang et al., "Investigating Structural Pruning and Recovery Techniques for Compressing
MLLMs" (arXiv 2507.20749; code ``YiranHuangIrene/VLMCompression``):

- **layerwise**: remove the decoder layers with the lowest block influence (not necessarily
  contiguous), renumber each attention's ``layer_idx`` so the KV cache still lines up, and set
  ``num_hidden_layers`` (and ``layer_types``);
- **widthwise**: in an eligible layer range (default as in the paper: the first 3 layers and the
  last layer left whole) keep the most important attention heads and MLP neurons, the same
  fraction in every eligible layer; slice q/k/v/o (Phi: ``dense``) rows/columns with their
  biases and gate/up/down (Phi: ``fc1``/``fc2``). ``hidden_size`` and ``head_dim`` never change.
  GQA-aware: a layer keeps ``k`` whole KV groups with the same number ``g`` of query heads in
  each (``k * g`` heads), so ``num_key_value_groups = g`` stays an integer.

``make_plan`` needs only module shapes, so it works on a config-only (meta device) model; the
parameter counts in a plan are exact (computed from the linear shapes, biases included).
``save_pruned`` writes a folder that plain transformers loads: uniform widths as an ordinary
``llava`` config, non-uniform widths as ``model_type: "llava_pruned"`` with the modeling files
and ``auto_map`` shipped in the folder (``trust_remote_code=True``).
"""
from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from torch import nn

from compression.models import Anatomy, LoadedModel, anatomy_from_config, parameter_counts
from compression.models.families.processors import save_processor
from compression.measure.whatif import HARDWARE, bytes_by_dtype, what_if  # noqa: F401 - re-exported: prune.what_if
from compression.measure.whatif import _unpack

NEURON_MULTIPLE = 32  # bitsandbytes nf4 on CPU asserts N % 32 == 0 (shared/NOTES-reference-model.md)
# "auto": the largest GEMM-friendly multiple that is at most 1/32 of the layer's neurons (a step of at most ~3 %)
AUTO_MULTIPLES = (128, 64, 32)
PAPER_FIRST_LAYERS_KEPT = 3  # paper default: the first 3 decoder layers and the last one left whole
PAPER_LAST_LAYERS_KEPT = 1

Method = Literal["layer", "width"]


class Plan(BaseModel):
    """What a prune will do, and what it will give; JSON-serialisable (``plan.model_dump(mode="json")``).

    Layer indices refer to the model *before* pruning. ``params_*`` count the whole model (as
    ``from_pretrained`` will), ``language_params_*`` the language model; the ratio is of the latter.
    """

    method: Method
    ratio_requested: float | None
    ratio_achieved: float
    target_mb: float | None = None
    layers_removed: list[int] = Field(default_factory=list)
    heads_kept: dict[int, list[int]] = Field(default_factory=dict)     # query-head indices kept per layer
    kv_heads_kept: dict[int, list[int]] = Field(default_factory=dict)  # KV-head indices kept per layer
    neurons_kept: dict[int, list[int]] = Field(default_factory=dict)
    params_before: int
    params_after: int
    language_params_before: int
    language_params_after: int
    bytes_after: dict[str, int]  # estimate per storage dtype: fp32, bf16, int8, nf4
    widths_after: dict[str, list[int]]  # per remaining layer: num_attention_heads, num_key_value_heads, intermediate_size
    scorer: str
    layer_range: tuple[int, int] | None = None
    notes: list[str] = Field(default_factory=list)
    # what serving the result needs (``servability``): plain transformers or custom code, tensor-parallel sizes
    servable: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.model_validate_json(text)


# ------------------------------------------------------------------------------------------------ costs

@dataclass
class LayerCost:
    """Parameters of one decoder layer and what one unit of each kind costs in it (biases included)."""

    params: int
    per_head: int     # q rows + o columns of one query head
    per_kv_head: int  # k and v rows of one KV head
    per_neuron: int   # gate/up rows + down column of one MLP neuron
    heads: int
    kv_heads: int
    neurons: int


def _bias(linear: nn.Linear) -> int:
    return int(linear.bias is not None)


def layer_costs(model: nn.Module, anatomy: Anatomy) -> list[LayerCost]:
    """Exact per-layer costs from the module shapes (works on meta-device models)."""
    hd, costs = anatomy.head_dim, []
    for i, layer in enumerate(anatomy.decoder_layers(model)):
        a, m = anatomy.attention_linears(layer), anatomy.mlp_linears(layer)
        per_neuron = sum(m[n].in_features + _bias(m[n]) for n in ("gate", "up") if n in m) + m["down"].out_features
        costs.append(LayerCost(
            params=sum(p.numel() for p in layer.parameters()),
            per_head=hd * (a["q"].in_features + _bias(a["q"])) + hd * a["o"].out_features,
            per_kv_head=sum(hd * (a[n].in_features + _bias(a[n])) for n in ("k", "v")),
            per_neuron=per_neuron, heads=anatomy.heads_per_layer[i], kv_heads=anatomy.kv_heads_per_layer[i],
            neurons=anatomy.intermediate_per_layer[i]))
    return costs


def _decoder_linear_weights(anatomy: Anatomy, heads: list[int], kv: list[int], inter: list[int]) -> int:
    """Weights (no biases) of the decoder linears: what int8 / nf4 quantization stores in low bits."""
    mlp_mats = 3 if anatomy.gate_proj else 2
    return sum(anatomy.hidden_size * (anatomy.head_dim * (2 * h + 2 * k) + mlp_mats * m)
               for h, k, m in zip(heads, kv, inter))


# ------------------------------------------------------------------------------------------------ planning

def default_layer_range(num_layers: int) -> tuple[int, int]:
    """The paper's widthwise range: first 3 layers and the last layer left whole."""
    return (min(PAPER_FIRST_LAYERS_KEPT, num_layers), max(0, num_layers - PAPER_LAST_LAYERS_KEPT))


def _check_range(layer_range: tuple[int, int], n: int, method: str) -> tuple[int, int]:
    start, stop = int(layer_range[0]), int(layer_range[1])
    if not 0 <= start < stop <= n:
        raise ValueError(f"layer range [{start}, {stop}) is empty or outside the {n} decoder layers; expected "
                         f"0 <= start < stop <= {n}" + (" (the default leaves the first 3 and the last layer "
                                                        "whole: pass a layer range for models this small)"
                                                        if method == "width" else ""))
    return start, stop


def head_configurations(heads: int, kv_heads: int) -> list[tuple[int, int]]:
    """Every (KV groups kept, query heads kept per group), GQA-aware, sorted by total heads kept."""
    return list(_head_configurations(heads, kv_heads))


@functools.lru_cache(maxsize=256)  # a width plan asks for the same shapes at each of its 400 candidate fractions
def _head_configurations(heads: int, kv_heads: int) -> tuple[tuple[int, int], ...]:
    group = heads // kv_heads
    return tuple(sorted({(k, g) for k in range(1, kv_heads + 1) for g in range(1, group + 1)},
                        key=lambda c: (c[0] * c[1], c[0])))


def _heads_for(fraction_kept: float, heads: int, kv_heads: int,
               allowed=lambda config: True) -> tuple[int, int]:
    target = fraction_kept * heads
    # nearest total; on a tie keep more KV groups (finer attention, the KV cache saving is small)
    configs = [c for c in _head_configurations(heads, kv_heads) if allowed(c)] or [(kv_heads, heads // kv_heads)]
    return min(configs, key=lambda c: (abs(c[0] * c[1] - target), -c[0]))


TENSOR_PARALLEL = (2, 4, 8)


def servability(anatomy: Anatomy, heads: list[int], kv: list[int], inter: list[int]) -> dict[str, Any]:
    """Whether a model of these per-layer widths loads in plain transformers (no custom code) and which
    tensor-parallel sizes its attention shards over (query and KV heads, and MLP neurons, divisible by it)."""
    uniform = len(set(zip(heads, kv, inter))) == 1
    plain = uniform and anatomy.hidden_size % heads[0] == 0
    parallel = {str(t): all(h % t == 0 and k % t == 0 and m % t == 0 for h, k, m in zip(heads, kv, inter))
                for t in TENSOR_PARALLEL}
    return {"plain_transformers": plain,
            "needs": "nothing beyond transformers" if plain else
            "its modeling file (trust_remote_code=True): " + ("widths differ per layer" if not uniform else
                                                              f"hidden {anatomy.hidden_size} is not a multiple of "
                                                              f"{heads[0]} heads"),
            "tensor_parallel": parallel}


def _servable_heads(anatomy: Anatomy, heads: int, kv_heads: int):
    """Head configurations a servable plan may use: the tensor-parallel sizes the model had, kept, and
    ``hidden_size`` a multiple of the query heads (plain transformers' config check)."""
    sizes = [t for t in TENSOR_PARALLEL if heads % t == 0 and kv_heads % t == 0]
    return lambda c: (anatomy.hidden_size % (c[0] * c[1]) == 0
                      and all((c[0] * c[1]) % t == 0 and c[0] % t == 0 for t in sizes))


def auto_multiple(neurons: int) -> int:
    """The ``neuron_multiple="auto"`` choice for a layer of ``neurons``: 128 (the GEMM tile of AMX, AVX-512 and GPU
    tensor cores) for a layer of 4096 neurons or more, 64 from 2048, else 32; one the layer's count divides.
    Measured on LLaVA-1.5-7B's shapes in bf16 (``benchmarks/results/scale.md``): decode of a width plan rounded
    to 32 reached 0.79-0.92 of its byte ratio, rounded to 128 0.92-0.95."""
    return next((m for m in AUTO_MULTIPLES if neurons % m == 0 and neurons >= 32 * m), NEURON_MULTIPLE)


def _neurons_for(fraction_kept: float, neurons: int, multiple: int | str = NEURON_MULTIPLE) -> int:
    """Neurons kept: the nearest multiple of ``multiple`` (``"auto"``: ``auto_multiple``; else of 32, else any
    count) the layer allows."""
    multiple = auto_multiple(neurons) if multiple == "auto" else multiple
    for m in dict.fromkeys((multiple, NEURON_MULTIPLE)):
        if neurons % m == 0:
            return max(m, int(round(fraction_kept * neurons / m)) * m)
    return max(1, int(round(fraction_kept * neurons)))


def _score_order(scores: pd.DataFrame | None, layer: int, unit: str, n: int) -> list[int]:
    """Unit indices of one layer, most important first (index order when no scores are given)."""
    if scores is None:
        return list(range(n))
    rows = scores[scores["layer"] == layer]
    if len(rows) != n:
        raise ValueError(f"scores hold {len(rows)} {unit} rows for layer {layer}; the model has {n}")
    # stable: equal scores keep index order
    return rows.sort_values(["score", unit], ascending=[False, True], kind="stable")[unit].astype(int).tolist()


def _pick_heads(order: list[int], heads: int, kv_heads: int, config: tuple[int, int],
                scores: pd.DataFrame | None, layer: int) -> tuple[list[int], list[int]]:
    """Kept query heads and KV heads: the best ``k`` KV groups, the best ``g`` query heads in each."""
    k, g = config
    group = heads // kv_heads
    rank = {h: r for r, h in enumerate(order)}
    if scores is not None:
        by_head = scores[scores["layer"] == layer].set_index("head")["score"]
        group_score = {j: float(sum(by_head[h] for h in range(j * group, (j + 1) * group))) for j in range(kv_heads)}
    else:
        group_score = {j: -j for j in range(kv_heads)}
    kv_kept = sorted(sorted(range(kv_heads), key=lambda j: (-group_score[j], j))[:k])
    heads_kept = []
    for j in kv_kept:
        members = sorted(range(j * group, (j + 1) * group), key=lambda h: rank[h])
        heads_kept += members[:g]
    return sorted(heads_kept), kv_kept


def _bytes_after(anatomy: Anatomy, total: int, heads, kv, inter) -> dict[str, int]:
    return bytes_by_dtype(total, _decoder_linear_weights(anatomy, heads, kv, inter))


def _budget_ratio(counts: dict[str, int], model: nn.Module, anatomy: Anatomy, ratio: float | None,
                  target_mb: float | None, target_dtype: str) -> tuple[float, bool]:
    """The language-model fraction to remove, and whether it is a floor (target size) or a nearest (ratio)."""
    if (ratio is None) == (target_mb is None):
        raise ValueError("give exactly one budget: a ratio of language-model parameters or a target size in MB")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise ValueError(f"ratio {ratio} must be between 0 and 1 (fraction of language-model parameters removed)")
        return float(ratio), False
    now = bytes_by_dtype(counts["total"], _decoder_linear_weights(
        anatomy, anatomy.heads_per_layer, anatomy.kv_heads_per_layer, anatomy.intermediate_per_layer))
    if target_dtype not in now:
        raise ValueError(f"target dtype {target_dtype!r} is not one of {', '.join(now)}")
    size_mb = now[target_dtype] / 1e6
    if target_mb <= 0 or target_mb >= size_mb:
        raise ValueError(f"target {target_mb} MB must be above 0 and below the current size "
                         f"{size_mb:.1f} MB at {target_dtype}")
    per_param = now[target_dtype] / counts["total"]  # average bytes per parameter at that dtype
    return (size_mb - target_mb) * 1e6 / per_param / counts["language"], True


def make_plan(source: LoadedModel | tuple[nn.Module, Anatomy], method: Method, ratio: float | None = None,
              target_mb: float | None = None, scores: pd.DataFrame | dict[str, pd.DataFrame] | None = None,
              layer_range: tuple[int, int] | None = None, target_dtype: str = "fp32",
              scorer: str | None = None, servable: bool = False,
              neuron_multiple: int | str = "auto") -> Plan:
    """Turn a budget into a plan.

    ``source``: a ``LoadedModel`` (weights or config-only) or ``(model, anatomy)``.
    ``method``: ``"layer"`` or ``"width"``. Budget: ``ratio`` (fraction of language-model
    parameters to remove; the nearest achievable is chosen) or ``target_mb`` (size at
    ``target_dtype``; the smallest plan that fits is chosen). ``scores``: for ``layer`` a
    ``layer_importance`` frame; for ``width`` ``{"heads": ..., "neurons": ...}`` from
    ``unit_importance``. Without scores, layer plans drop the deepest layers before the last
    (Gromov et al. 2024) and width plans keep the lowest indices (counts are exact either way).
    ``layer_range`` ``(start, stop)``: eligible layers (width default: first 3 and last whole).
    ``neuron_multiple`` (width): kept MLP neurons per layer are a multiple of it where the layer's
    width allows (at least 32, what bitsandbytes nf4 on CPU needs; 64 / 128 suit GEMM tiles). ``"auto"`` (the
    default): ``auto_multiple`` per layer, 128 for 7B-sized layers, 32 for small ones.
    ``servable``: width plans prune every layer alike (one width: plain transformers loads it, no custom
    code) and keep the tensor-parallel sizes (2, 4, 8) the model's head, KV-head and neuron counts divide
    by. Every plan says what serving it needs in ``plan.servable`` (``servability``).
    Raises ``ValueError`` (one line, with the reason) for infeasible budgets.
    """
    model, anatomy = _unpack(source)
    if method not in ("layer", "width"):
        raise ValueError(f"method {method!r} is not 'layer' or 'width'")
    counts = parameter_counts(model, anatomy)
    wanted, is_floor = _budget_ratio(counts, model, anatomy, ratio, target_mb, target_dtype)
    costs = layer_costs(model, anatomy)
    if method == "layer":
        plan = _plan_layers(model, anatomy, counts, costs, wanted, is_floor, ratio, target_mb, scores,
                            layer_range, scorer)
    else:
        if neuron_multiple != "auto" and (not isinstance(neuron_multiple, int) or neuron_multiple < 1
                                          or neuron_multiple % NEURON_MULTIPLE):
            raise ValueError(f"neuron_multiple {neuron_multiple} must be a positive multiple of {NEURON_MULTIPLE}")
        if servable and layer_range is not None and tuple(layer_range) != (0, anatomy.num_layers):
            raise ValueError(f"a servable width plan prunes every layer alike; layer range {tuple(layer_range)} leaves "
                             f"some whole (expected none, or (0, {anatomy.num_layers}))")
        plan = _plan_width(model, anatomy, counts, costs, wanted, is_floor, ratio, target_mb, scores,
                           (0, anatomy.num_layers) if servable else layer_range, scorer, servable, neuron_multiple)
    plan.servable = servability(anatomy, plan.widths_after["num_attention_heads"],
                                plan.widths_after["num_key_value_heads"], plan.widths_after["intermediate_size"])
    return plan


def _choose(achieved: list[float], wanted: float, is_floor: bool) -> int | None:
    """Index of the candidate to use: nearest to ``wanted``, or the smallest at or above it (floor)."""
    if is_floor:
        fitting = [i for i, a in enumerate(achieved) if a >= wanted - 1e-12]
        return fitting[0] if fitting else None
    return int(np.argmin([abs(a - wanted) for a in achieved]))


def _describe(ratio: float | None, target_mb: float | None) -> str:
    return f"ratio {ratio:g}" if ratio is not None else f"target {target_mb:g} MB"


def _plan_layers(model, anatomy, counts, costs, wanted, is_floor, ratio, target_mb, scores, layer_range,
                 scorer) -> Plan:
    n = anatomy.num_layers
    start, stop = _check_range(layer_range or (0, n), n, "layer")
    eligible = list(range(start, stop))
    if isinstance(scores, dict):
        scores = scores.get("layers")
    if scores is not None:
        by_layer = scores.set_index("layer")["score"]
        order = sorted(eligible, key=lambda i: (float(by_layer[i]), i))  # least important first
        scorer = scorer or str(scores["method"].iloc[0])
    else:
        order = sorted(eligible, key=lambda i: (i == n - 1, -i))  # deepest first, the last layer last
        scorer = scorer or "none (deepest layers before the last, Gromov et al. 2024)"
    order = order[:n - 1]  # at least one layer must remain
    language = counts["language"]
    achieved = [sum(costs[i].params for i in order[:k]) / language for k in range(len(order) + 1)]
    what = _describe(ratio, target_mb)
    if not order:
        raise ValueError(f"{what}: no layer is eligible for removal in range [{start}, {stop})")
    if wanted > achieved[-1] + 1e-9 and (is_floor or wanted - achieved[-1] > (achieved[1] - achieved[0]) / 2):
        raise ValueError(f"{what} would remove all {n} layers; at most {achieved[-1]:.2f} is possible "
                         f"({len(order)} of {n} layers)")
    k = _choose(achieved, wanted, is_floor)
    if k == 0:
        raise ValueError(f"{what} removes no layer: one layer is {achieved[1]:.3f} of the language model; "
                         f"ask for at least {achieved[1] / 2:.3f}")
    removed = sorted(order[:k])
    kept = [i for i in range(n) if i not in removed]
    heads = [anatomy.heads_per_layer[i] for i in kept]
    kv = [anatomy.kv_heads_per_layer[i] for i in kept]
    inter = [anatomy.intermediate_per_layer[i] for i in kept]
    cut = sum(costs[i].params for i in removed)
    total = counts["total"] - cut
    return Plan(method="layer", ratio_requested=ratio, ratio_achieved=cut / language, target_mb=target_mb,
                layers_removed=removed, params_before=counts["total"], params_after=total,
                language_params_before=language, language_params_after=language - cut,
                bytes_after=_bytes_after(anatomy, total, heads, kv, inter),
                widths_after={"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter},
                scorer=scorer, layer_range=(start, stop),
                notes=[f"removes {k} of {n} decoder layers; layer_idx renumbered for the KV cache"])


def _width_counts(costs: list[LayerCost], eligible: list[int], fraction_removed: float, heads_prunable: bool = True,
                  servable: Anatomy | None = None, neuron_multiple: int | str = NEURON_MULTIPLE):
    """Per eligible layer: (head config, neurons kept), and the parameters removed."""
    chosen, cut, by_shape = {}, 0, {}
    for i in eligible:
        c = costs[i]
        shape = (c.heads, c.kv_heads, c.neurons)
        if shape not in by_shape:  # layers of one shape keep the same widths: choose once per shape (7B: 1 of 28)
            allowed = _servable_heads(servable, c.heads, c.kv_heads) if servable else (lambda config: True)
            k, g = (_heads_for(1 - fraction_removed, c.heads, c.kv_heads, allowed) if heads_prunable
                    else (c.kv_heads, c.heads // c.kv_heads))
            m = _neurons_for(1 - fraction_removed, c.neurons, neuron_multiple)
            if servable:
                sizes = [t for t in TENSOR_PARALLEL if c.neurons % t == 0]
                while m > 1 and any(m % t for t in sizes):
                    m -= 1
            by_shape[shape] = ((k, g), m)
        (k, g), m = chosen[i] = by_shape[shape]
        cut += (c.heads - k * g) * c.per_head + (c.kv_heads - k) * c.per_kv_head + (c.neurons - m) * c.per_neuron
    return chosen, cut


def _plan_width(model, anatomy, counts, costs, wanted, is_floor, ratio, target_mb, scores, layer_range,
                scorer, servable: bool = False, neuron_multiple: int | str = NEURON_MULTIPLE) -> Plan:
    n = anatomy.num_layers
    start, stop = _check_range(layer_range or default_layer_range(n), n, "width")
    eligible = list(range(start, stop))
    language = counts["language"]
    fractions = np.linspace(0, 0.995, 400)
    if anatomy.fused:
        raise ValueError(f"width pruning of {anatomy.language_model_type} is not supported: its projections "
                         f"{', '.join(anatomy.fused)} are fused; use layerwise pruning")
    candidates = [_width_counts(costs, eligible, f, anatomy.heads_prunable, anatomy if servable else None,
                                neuron_multiple)
                  for f in fractions]
    achieved = [cut / language for _, cut in candidates]
    what = _describe(ratio, target_mb)
    best = max(achieved)
    step = min((b - a for a, b in zip(achieved, achieved[1:]) if b > a), default=0.0)
    if wanted > best + 1e-9 and (is_floor or wanted - best > max(step, 0.01)):
        raise ValueError(f"{what} is more than layers [{start}, {stop}) can give: at most {best:.2f} is possible "
                         f"(1 head and {NEURON_MULTIPLE} neurons left per layer); widen the layer range or use "
                         "layerwise pruning")
    pick = _choose(achieved, wanted, is_floor)
    chosen, cut = candidates[pick]
    if cut == 0:
        smallest = min((a for a in achieved if a > 0), default=0.0)
        raise ValueError(f"{what} removes nothing in layers [{start}, {stop}): the smallest step is {smallest:.3f} "
                         "of the language model")
    head_scores = neuron_scores = None
    if isinstance(scores, dict):
        head_scores, neuron_scores = scores.get("heads"), scores.get("neurons")
    elif scores is not None:
        raise ValueError("width plans take scores as {'heads': frame, 'neurons': frame}")
    heads_kept, kv_kept, neurons_kept = {}, {}, {}
    for i, ((k, g), m) in chosen.items():
        c = costs[i]
        order = _score_order(head_scores, i, "head", c.heads)
        heads_kept[i], kv_kept[i] = _pick_heads(order, c.heads, c.kv_heads, (k, g), head_scores, i)
        neurons_kept[i] = sorted(_score_order(neuron_scores, i, "neuron", c.neurons)[:m])
    heads = [len(heads_kept.get(i, [])) or anatomy.heads_per_layer[i] for i in range(n)]
    kv = [len(kv_kept.get(i, [])) or anatomy.kv_heads_per_layer[i] for i in range(n)]
    inter = [len(neurons_kept.get(i, [])) or anatomy.intermediate_per_layer[i] for i in range(n)]
    names = [s for s, f in (("heads", head_scores), ("neurons", neuron_scores)) if f is not None]
    if scorer is None:
        methods = sorted({str(f["method"].iloc[0]) for f in (head_scores, neuron_scores) if f is not None})
        scorer = "/".join(methods) if methods else "none (lowest indices kept)"
    notes = [f"same fraction removed in every layer of [{start}, {stop}); heads kept as whole KV groups "
             "with the same query heads per group (GQA)"]
    if not anatomy.heads_prunable:
        notes.append(f"attention heads kept: the {anatomy.language_model_type} attention derives head_dim from "
                     "hidden_size / num_attention_heads, so fewer heads would not load; MLP neurons only")
    used = sorted({auto_multiple(costs[i].neurons) if neuron_multiple == "auto" else neuron_multiple for i in chosen})
    if len(used) == 1 and all(costs[i].neurons % used[0] == 0 for i in chosen):
        notes.append(f"neuron counts rounded to multiples of {used[0]}"
                     + (" (bitsandbytes nf4 on CPU needs it)" if used[0] == NEURON_MULTIPLE else " (GEMM tiles)")
                     + (": auto for layers of this width" if neuron_multiple == "auto" else ""))
    elif all(c.neurons % NEURON_MULTIPLE == 0 for c in costs):
        notes.append(f"neuron counts rounded to multiples of {NEURON_MULTIPLE} (bitsandbytes nf4 on CPU needs it)")
    if scores is not None and len(names) < 2:
        notes.append(f"only {', '.join(names) or 'no'} scores given; the rest keep the lowest indices")
    total = counts["total"] - cut
    return Plan(method="width", ratio_requested=ratio, ratio_achieved=cut / language, target_mb=target_mb,
                heads_kept=heads_kept, kv_heads_kept=kv_kept, neurons_kept=neurons_kept,
                params_before=counts["total"], params_after=total, language_params_before=language,
                language_params_after=language - cut, bytes_after=_bytes_after(anatomy, total, heads, kv, inter),
                widths_after={"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter},
                scorer=scorer, layer_range=(start, stop), notes=notes)


# ------------------------------------------------------------------------------------------------ surgery

def _sliced_linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = old.weight.detach()
    bias = old.bias.detach() if old.bias is not None else None
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols)
    # built on meta and given the sliced tensors: no initialised matrix of the new size is allocated and thrown
    # away (at 7B shapes that doubled the surgery's peak and its time)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(weight if rows is not None or cols is not None else weight.clone(),
                              requires_grad=old.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias if rows is not None else bias.clone(), requires_grad=old.bias.requires_grad)
    return new


def _head_rows(heads: list[int], head_dim: int, device) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long, device=device)


def _slice_head_norm(attn: nn.Module, name: str, head_dim: int, rows_by_heads: dict[int, torch.Tensor]) -> None:
    """A per-head q/k norm: one of ``head_dim`` is shared by every head and stays; one of ``heads * head_dim``
    belongs to the heads and keeps the rows of those kept."""
    norm = getattr(attn, name)
    weight = getattr(norm, "weight", None)
    if weight is None or weight.numel() == head_dim:
        return
    heads = weight.numel() // head_dim
    if weight.numel() % head_dim or heads not in rows_by_heads:
        raise ValueError(f"{name} has {weight.numel()} weights; expected head_dim {head_dim} or a multiple "
                         f"matching the heads ({sorted(rows_by_heads)})")
    rows = rows_by_heads[heads]
    norm.weight = nn.Parameter(weight.detach().index_select(0, rows).clone(), requires_grad=weight.requires_grad)
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(rows),)


def _prune_layer_width(layer: nn.Module, anatomy: Anatomy, i: int, heads: list[int] | None,
                       kv_heads: list[int] | None, neurons: list[int] | None) -> None:
    hd = anatomy.head_dim
    attn, mlp = layer.get_submodule(anatomy.attention), layer.get_submodule(anatomy.mlp)
    if anatomy.fused:
        raise ValueError(f"width pruning of {anatomy.language_model_type} is not supported: its projections "
                         f"{', '.join(anatomy.fused)} are fused; use layerwise pruning")
    if heads is not None and not anatomy.heads_prunable and len(heads) != anatomy.heads_per_layer[i]:
        raise ValueError(f"layer {i}: the {anatomy.language_model_type} attention derives head_dim from the head "
                         "count, so its heads cannot be pruned; prune MLP neurons only")
    if heads is not None:
        n_heads, n_kv = anatomy.heads_per_layer[i], anatomy.kv_heads_per_layer[i]
        group = n_heads // n_kv
        kv_heads = sorted(kv_heads) if kv_heads is not None else sorted({h // group for h in heads})
        heads = sorted(heads)
        per_group = {j: sum(h // group == j for h in heads) for j in kv_heads}
        if any(h // group not in per_group for h in heads) or len(set(per_group.values())) != 1 or not heads:
            raise ValueError(f"layer {i}: heads {heads} do not fill KV groups {kv_heads} evenly (groups of {group}); "
                             "keep the same number of query heads in every kept KV group")
        if max(heads) >= n_heads or max(kv_heads) >= n_kv:
            raise ValueError(f"layer {i}: head index out of range ({n_heads} heads, {n_kv} KV heads)")
        device = getattr(attn, anatomy.q_proj).weight.device
        q_rows, kv_rows = _head_rows(heads, hd, device), _head_rows(kv_heads, hd, device)
        setattr(attn, anatomy.q_proj, _sliced_linear(getattr(attn, anatomy.q_proj), rows=q_rows))
        setattr(attn, anatomy.k_proj, _sliced_linear(getattr(attn, anatomy.k_proj), rows=kv_rows))
        setattr(attn, anatomy.v_proj, _sliced_linear(getattr(attn, anatomy.v_proj), rows=kv_rows))
        setattr(attn, anatomy.o_proj, _sliced_linear(getattr(attn, anatomy.o_proj), cols=q_rows))
        for name in anatomy.head_norms:
            _slice_head_norm(attn, name, hd, {n_heads: q_rows, n_kv: kv_rows})
        attn.num_key_value_groups = len(heads) // len(kv_heads)  # read by repeat_kv / SDPA's GQA path
    if neurons is not None:
        neurons = sorted(neurons)
        if not neurons or max(neurons) >= anatomy.intermediate_per_layer[i]:
            raise ValueError(f"layer {i}: neuron indices must be within 0..{anatomy.intermediate_per_layer[i] - 1}")
        idx = torch.tensor(neurons, dtype=torch.long, device=getattr(mlp, anatomy.up_proj).weight.device)
        for name in (anatomy.gate_proj, anatomy.up_proj):
            if name:
                setattr(mlp, name, _sliced_linear(getattr(mlp, name), rows=idx))
        setattr(mlp, anatomy.down_proj, _sliced_linear(getattr(mlp, anatomy.down_proj), cols=idx))


def _remove_layers(model: nn.Module, anatomy: Anatomy, removed: list[int]) -> None:
    n = anatomy.num_layers
    if any(not 0 <= i < n for i in removed) or len(set(removed)) >= n:
        raise ValueError(f"layers_removed {removed} must be distinct indices in 0..{n - 1}, leaving at least one")
    layers = anatomy.decoder_layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in set(removed)]
    parent_name, _, attr = anatomy.layers.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, nn.ModuleList(kept))
    for new_idx, layer in enumerate(kept):
        # the KV cache is indexed by layer_idx: stale indices would read another layer's keys
        layer.get_submodule(anatomy.attention).layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    text = model.config.text_config
    keep_idx = [i for i in range(n) if i not in set(removed)]
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[i] for i in keep_idx]
    text.num_hidden_layers = len(kept)


def _sync_config(model: nn.Module, anatomy: Anatomy) -> None:
    """Write the real per-layer widths into the config: plain fields when uniform, else ``pruned_widths``.

    Non-uniform (or uniform but failing transformers' ``hidden_size % num_attention_heads == 0``
    check) models become their family's pruned class (LLaVA: ``LlavaPrunedForConditionalGeneration``):
    the config object's class is swapped in place, so every submodule that holds a reference to it
    sees the change; a uniform model goes back to the family's stock class.
    """
    from compression.models import families
    from compression.models.pruned import pruned_classes

    family = families.family_for(model.config)
    text = model.config.text_config
    heads, kv, inter = [], [], []
    for layer in anatomy.decoder_layers(model):
        a, m = anatomy.attention_linears(layer), anatomy.mlp_linears(layer)
        heads.append(a["q"].out_features // anatomy.head_dim)
        kv.append(a["k"].out_features // anatomy.head_dim)
        inter.append(m["up"].out_features)
    text.head_dim = anatomy.head_dim  # explicit: hidden_size / num_attention_heads no longer gives it
    uniform = len(set(zip(heads, kv, inter))) == 1
    if uniform and text.hidden_size % heads[0] == 0:
        text.num_attention_heads, text.num_key_value_heads, text.intermediate_size = heads[0], kv[0], inter[0]
        if hasattr(text, "pruned_widths"):
            del text.pruned_widths
        if model.config.model_type == family.pruned_model_type:
            model.config.__class__ = family.transformers_class("config")
            model.__class__ = family.transformers_class("model")
        return
    config_class, model_class = pruned_classes(family)
    text.pruned_widths = {"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter}
    if family.model_type != "llava":  # the generic pruned class finds the layers and projections by these names
        text.pruned_widths.update(layers=anatomy.layers, attention=[anatomy.q_proj, anatomy.k_proj, anatomy.v_proj,
                                                                    anatomy.o_proj],
                                  mlp=[anatomy.gate_proj, anatomy.up_proj, anatomy.down_proj])
    if not isinstance(model.config, config_class):
        model.config.__class__ = config_class
        model.__class__ = model_class
    _forget_legacy_key_mapping(model)


def _forget_legacy_key_mapping(model: nn.Module) -> None:
    """A model read by ``from_pretrained`` remembers transformers' legacy LLaVA key renaming and
    ``save_pretrained`` writes the old keys back ("language_model.model..."); transformers maps them
    back only for model_type "llava", so a "llava_pruned" folder would load with random weights.
    Forgetting the mapping makes it save today's module names, which load as they are."""
    vars(model).pop("_weight_conversions", None)


def apply_plan(model: nn.Module, anatomy: Anatomy, plan: Plan) -> tuple[nn.Module, Anatomy]:
    """Physically prune ``model`` in place as ``plan`` says; returns it with its new anatomy.

    The config is rewritten to match (``num_hidden_layers``, ``layer_types``, widths, explicit
    ``head_dim``), so ``save_pretrained`` / ``from_pretrained`` round-trip.
    """
    if plan.method == "layer":
        _remove_layers(model, anatomy, plan.layers_removed)
    else:
        layers = anatomy.decoder_layers(model)
        touched = set(plan.heads_kept) | set(plan.neurons_kept)
        if any(not 0 <= i < anatomy.num_layers for i in touched):
            raise ValueError(f"plan names layers {sorted(touched)}; the model has {anatomy.num_layers}")
        with torch.no_grad():
            for i in sorted(touched):
                _prune_layer_width(layers[i], anatomy, i, plan.heads_kept.get(i), plan.kv_heads_kept.get(i),
                                   plan.neurons_kept.get(i))
    _sync_config(model, anatomy)
    return model, anatomy_from_config(model.config)


def prune(loaded: LoadedModel, plan: Plan) -> LoadedModel:
    """``apply_plan`` on a loaded model; returns a LoadedModel describing the pruned one."""
    model, anatomy = apply_plan(loaded.model, loaded.anatomy, plan)
    return LoadedModel(model, loaded.processor, anatomy, f"{loaded.name} ({plan.method} {plan.ratio_achieved:.0%})",
                       loaded.kind, None, loaded.has_weights, f"{loaded.fingerprint}-pruned", dict(loaded.extras))


# ------------------------------------------------------------------------------------------------ saving

def save_pruned(model: nn.Module, processor: Any, out_dir: str | Path, plan: Plan | None = None) -> Path:
    """Write a Hugging Face folder; nothing is visible at ``out_dir`` until it is complete.

    Uniform widths: the family's own config (``AutoModelForImageTextToText.from_pretrained``).
    Non-uniform (LLaVA): ``model_type: "llava_pruned"`` plus ``configuration_llava_pruned.py`` /
    ``modeling_llava_pruned.py`` and ``auto_map`` (``from_pretrained(..., trust_remote_code=True)``).
    ``plan`` (optional) is written beside it as ``pruning_plan.json``.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} already exists and is not empty; expected a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from compression.models import families

    if model.config.model_type == families.family_for(model.config).pruned_model_type:
        _forget_legacy_key_mapping(model)
    try:
        model.save_pretrained(tmp)
        if processor is not None:
            save_processor(processor, tmp)
        if plan is not None:
            (tmp / "pruning_plan.json").write_text(plan.to_json())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The CLI / UI view of a plan: the contract keys first, then everything else."""
    d = plan.model_dump(mode="json")
    keys = ["method", "ratio_requested", "ratio_achieved", "params_before", "params_after", "bytes_after"]
    keys += ["layers_removed"] if plan.method == "layer" else ["heads_kept", "kv_heads_kept", "neurons_kept"]
    return {**{k: d[k] for k in keys}, **{k: v for k, v in d.items() if k not in keys}}


def load_plan(path: str | Path) -> Plan:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"plan file {p} does not exist; expected a JSON plan from `plan --json`")
    try:
        return Plan.from_json(p.read_text())
    except ValueError as e:
        raise ValueError(f"{p} is not a pruning plan: {str(e).splitlines()[0]}") from None


__all__ = ["Plan", "make_plan", "apply_plan", "save_pruned", "prune", "what_if", "layer_costs",
           "head_configurations", "default_layer_range", "plan_summary", "load_plan", "HARDWARE"]
