"""Visual-token scores and visual-token pruning at inference (QAPruner, arXiv 2604.02816; FastV, arXiv 2403.06764).

Per visual token ``v_i`` (``D`` channels) of one image:

- outlier intensity ``R_i = max_j v_ij - min_j v_ij``;
- simulated quantization error ``E_i = ||v_i - Q(v_i)||_2``, ``Q`` symmetric INT4 per group of 128
  channels (the whole vector when ``D < 128``; a last, shorter group when ``D`` is not a multiple),
  scale ``max|v| / 7`` per group;
- quantization score ``S^Q_i = (minmax(E)_i + minmax(R)_i) / 2`` (min-max over the image's tokens);
- semantic relevance ``S^P``: (a) mean cosine similarity of the visual token to the question's text
  tokens (the text after the image), (b) attention the last text token pays to it at one decoder
  layer, averaged over heads (FastV; layer 2 by default, FastV's K);
- hybrid ``S_i = alpha * minmax(S^P)_i + (1 - alpha) * S^Q_i`` (alpha 0.7); keep the top-k.

Where scores are taken: ``layer=None`` is the projector output (what QAPruner scores); ``layer=L``
is the hidden state *entering* decoder layer ``L`` (layer 0 = the input embeddings), and the
attention score is then read inside that same layer.

Pruning at inference, without editing transformers, for every family (``compression.models.families``):
image features come from ``model.model.get_image_features`` with the family's own inputs (``image_sizes``,
``image_grid_thw``, ``pixel_attention_mask``...); the kept image tokens (in their original order) replace the
image placeholders (``image_token_index`` of the description) and the dropped placeholders are removed from
the sequence, the attention mask and what else the language model reads per token: Gemma 3 / PaliGemma
``token_type_ids`` (their image and prefix masks), Qwen's 3-D M-RoPE ``position_ids`` (computed on the dense
sequence, then indexed), Qwen3-VL's DeepStack features (added back at the kept tokens after decoder layers
``0..k-1`` by hooks); ``model.generate(inputs_embeds=..., attention_mask=...)`` then runs. Left padding stays
left padding. Rows with different visual-token counts (any-res, tiles, native resolution) are scored in
groups of equal count and left-padded to one length.

**Positions** (``positions=``): ``"original"`` (default) passes each kept token's position id from the
dense sequence (gaps where tokens were dropped, as FastV keeps them), and generate continues from the
last one. ``"contiguous"`` passes none, so generate derives them from the attention mask (cumulative
sum): the remaining tokens are re-indexed contiguously and the text after the image moves closer to
it, as if the image had fewer patches. Why the default: on an earlier reference checkpoint (60 questions,
50 % kept) re-indexing cost 13-17 more points than original positions; on the shipped run at 12.5 % under
W4A4 both gave 61.6 % (benchmarks/results/tokens.md), so it is never worse in what was measured.
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch
from PIL import Image
from torch import nn

from compression.models import Anatomy, LoadedModel, anatomy_from_config, families

Scorer = Literal["none", "semantic", "outlier", "hybrid", "random"]
SemanticSource = Literal["attention", "similarity"]
SCORERS: tuple[str, ...] = ("none", "semantic", "outlier", "hybrid", "random")
SEMANTIC_SOURCES: tuple[str, ...] = ("attention", "similarity")
PositionMode = Literal["contiguous", "original"]
POSITION_MODES: tuple[str, ...] = ("contiguous", "original")
# The recipe (compression.runs.recipe) names the semantic source and fuses through alpha: "attention" with
# alpha < 1 is the QAPruner hybrid, with alpha = 1 pure FastV; "quantization" is S^Q alone.
RECIPE_SCORERS: dict[str, tuple[str, str | None]] = {
    "attention": ("hybrid", "attention"), "similarity": ("hybrid", "similarity"),
    "quantization": ("outlier", None)}
FASTV_LAYER = 2  # FastV reads attention after layer K=2; shallower layers attend almost uniformly
INT4_MAX = 7  # symmetric INT4: integers -8..7, scale max|v| / 7 as in QAPruner


# ------------------------------------------------------------------------------------------ pure scores

def outlier_intensity(v: torch.Tensor) -> torch.Tensor:
    """``R_i = max_j v_ij - min_j v_ij``: ``[..., N, D] -> [..., N]``."""
    return v.amax(-1) - v.amin(-1)


def _groups(v: torch.Tensor, group: int) -> list[torch.Tensor]:
    if group < 1:
        raise ValueError(f"group {group} must be a positive number of channels")
    return list(torch.split(v, min(group, v.shape[-1]), dim=-1))


def int4_quantize(v: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Symmetric INT4 fake quantization per group of ``group`` channels, scale ``max|v| / 7``."""
    out = []
    for g in _groups(v.float(), group):
        scale = g.abs().amax(-1, keepdim=True) / INT4_MAX
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group quantizes exactly
        out.append(torch.clamp(torch.round(g / scale), -INT4_MAX - 1, INT4_MAX) * scale)
    return torch.cat(out, dim=-1)


def int4_group_error(v: torch.Tensor, group: int = 128) -> torch.Tensor:
    """``E_i = ||v_i - Q(v_i)||_2`` with ``Q`` = ``int4_quantize``: ``[..., N, D] -> [..., N]``."""
    return torch.linalg.vector_norm(v.float() - int4_quantize(v, group), dim=-1)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise over the last dimension (the image's tokens); a constant row becomes 0."""
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def quantization_score(v: torch.Tensor, group: int = 128) -> torch.Tensor:
    """``S^Q = (minmax(E) + minmax(R)) / 2``: ``[..., N, D] -> [..., N]`` in [0, 1]."""
    return (minmax(int4_group_error(v, group)) + minmax(outlier_intensity(v.float()))) / 2


def hybrid_score(semantic: torch.Tensor, quant: torch.Tensor, alpha: float = 0.7) -> torch.Tensor:
    """``S = alpha * minmax(S^P) + (1 - alpha) * S^Q``; ``S^P`` is min-max normalised so both lie in [0, 1]."""
    _check_alpha(alpha)
    return alpha * minmax(semantic.float()) + (1 - alpha) * quant


def keep_count(num_tokens: int, keep_ratio: float) -> int:
    """Tokens kept: ``round(keep_ratio * N)`` (half up), at least one."""
    return max(1, min(num_tokens, math.floor(keep_ratio * num_tokens + 0.5)))


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} must lie in [0, 1] (weight of the semantic score)")


# ------------------------------------------------------------------------------------------ model access

def _anatomy(model: nn.Module, anatomy: Anatomy | None = None) -> Anatomy:
    return anatomy or anatomy_from_config(model.config)


def _image_feature_kwargs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The processor outputs ``get_image_features`` takes besides ``pixel_values`` (image_sizes, image_grid_thw,
    pixel_attention_mask, batch_num_images: whatever this family's signature names)."""
    names = inspect.signature(model.model.get_image_features).parameters
    return {k: v for k, v in inputs.items() if k in names and k not in ("pixel_values", "input_ids", "attention_mask")}


def _image_outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every visual token of the batch, in placement order ``[T, D]`` (what fills the image placeholders,
    row by row), and Qwen3-VL's DeepStack features ``[T, D]`` per injection layer (empty elsewhere)."""
    out = model.model.get_image_features(pixel_values=inputs["pixel_values"], **_image_feature_kwargs(model, inputs))
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    deepstack = [_flat(d) for d in (getattr(out, "deepstack_features", None) or [])]
    return _flat(feats), deepstack


def _flat(features) -> torch.Tensor:
    """``[T, D]`` from a tensor ``[..., D]`` or a list of per-image tensors."""
    if isinstance(features, (list, tuple)):
        return torch.cat([_flat(f) for f in features])
    return features.reshape(-1, features.shape[-1])


def visual_features(model: nn.Module, pixel_values: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Projector output ``[B, N, D]`` for a batch of images of one visual-token count (CLS already dropped by
    the model's strategy). ``pixel_values`` may be the processor's whole output (families needing image_sizes,
    image_grid_thw, ...)."""
    inputs = pixel_values if isinstance(pixel_values, dict) else {"pixel_values": pixel_values}
    flat, _ = _image_outputs(model, inputs)
    images = inputs["pixel_values"].shape[0] if "image_grid_thw" not in inputs else inputs["image_grid_thw"].shape[0]
    return flat.view(images, -1, flat.shape[-1])


@dataclass
class MergedInputs:
    """The dense multimodal sequence, as the model builds it internally (one image per prompt, or per row
    the same number of visual tokens).

    ``extras`` are the inputs the language model needs besides embeddings and mask, aligned with the
    sequence (Gemma's ``token_type_ids`` ``[B, L]``; Qwen's M-RoPE ``position_ids`` ``[3, B, L]``, computed on
    this dense sequence); ``deepstack`` holds Qwen3-VL's features to add at the visual positions after
    decoder layer ``k`` (``[B, N, D]`` each)."""

    inputs_embeds: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # [B, L]
    image_positions: torch.Tensor  # [B, N] sequence index of each visual token, in order
    question_mask: torch.Tensor  # [B, L] True on the text tokens after the image (question and template)
    features: torch.Tensor  # [B, N, D] projector output
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    deepstack: list[torch.Tensor] = field(default_factory=list)


def _dense(model: nn.Module, inputs: dict[str, torch.Tensor], anatomy: Anatomy):
    """Embeddings with the visual tokens in place, for the whole batch, and what goes with them."""
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    flat, deepstack = _image_outputs(model, inputs)
    embeds = model.get_input_embeddings()(input_ids)
    image_mask = input_ids == anatomy.image_token_index
    if int(image_mask.sum()) != flat.shape[0]:
        raise ValueError(f"the prompts hold {int(image_mask.sum())} image tokens and the images give {flat.shape[0]} "
                         "visual tokens; expected one image placeholder per image, expanded by the processor")
    embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), flat.to(embeds.dtype))
    extras: dict[str, torch.Tensor] = {}
    if "token_type_ids" in anatomy.forward_kwargs and "token_type_ids" in inputs:
        extras["token_type_ids"] = inputs["token_type_ids"]
    if families.family_for(model.config).positions == "mrope":
        # computed on the full sequence: dropping tokens first would shift every later image's grid positions
        extras["position_ids"], _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=attention_mask)
    return embeds, attention_mask, image_mask, flat.to(embeds.dtype), extras, [d.to(embeds.dtype) for d in deepstack]


def _merged(embeds, mask, image_mask, flat, extras, deepstack, rows) -> MergedInputs:
    """The ``MergedInputs`` of the batch rows ``rows`` (all of one visual-token count)."""
    counts = image_mask.sum(-1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    n = int(counts[rows[0]])
    take = torch.cat([torch.arange(int(offsets[r]), int(offsets[r]) + n) for r in rows])
    index = torch.tensor(rows, device=embeds.device)
    positions = image_mask[index].nonzero()[:, 1].view(len(rows), n)
    sub_mask = mask[index]
    after_image = torch.arange(embeds.shape[1], device=embeds.device) > positions[:, -1:]
    sub_extras = {k: (v[:, index] if k == "position_ids" else v[index]) for k, v in extras.items()}
    return MergedInputs(embeds[index], sub_mask, positions, after_image & sub_mask.bool(),
                        flat[take].view(len(rows), n, -1), sub_extras, [d[take].view(len(rows), n, -1) for d in deepstack])


def merge_inputs(model: nn.Module, inputs: dict[str, torch.Tensor], anatomy: Anatomy | None = None) -> MergedInputs:
    """Embed the text and put the projector output at the image placeholders (every row must hold the same
    number of visual tokens; ``prune_visual_tokens`` handles batches whose rows differ)."""
    anatomy = _anatomy(model, anatomy)
    dense = _dense(model, inputs, anatomy)
    counts = dense[2].sum(-1)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise ValueError(f"each prompt must hold the same number of visual tokens (one image per prompt); "
                         f"found {counts.tolist()}")
    return _merged(*dense, list(range(len(counts))))


def _row_groups(image_mask: torch.Tensor) -> list[list[int]]:
    """Batch rows grouped by their visual-token count (variable-count families give different counts)."""
    groups: dict[int, list[int]] = {}
    for r, n in enumerate(image_mask.sum(-1).tolist()):
        groups.setdefault(int(n), []).append(r)
    if 0 in groups:
        raise ValueError(f"batch rows {groups[0]} hold no image; visual-token pruning needs one image per prompt")
    return list(groups.values())


@contextmanager
def _deepstack_injection(model: nn.Module, anatomy: Anatomy, rows: torch.Tensor, cols: torch.Tensor,
                         deepstack: list[torch.Tensor], length: int) -> Iterator[None]:
    """Qwen3-VL adds DeepStack features to the visual positions' hidden states after decoder layers
    ``0..k-1`` (``Qwen3VLTextModel._deepstack_process``); given ``inputs_embeds`` the model cannot, so hooks
    do it at ``(rows, cols)`` (``deepstack[k]`` ``[T, D]``), on the prefill pass only (a pass of ``length``
    tokens; decode steps carry no visual tokens)."""
    if not deepstack:
        yield
        return
    layers = anatomy.decoder_layers(model)
    handles = []

    def hook(k):
        def fn(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] != length:
                return output
            hidden = hidden.index_put((rows, cols), deepstack[k].to(hidden.dtype), accumulate=True)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        return fn

    for k in range(min(len(deepstack), len(layers))):
        handles.append(layers[k].register_forward_hook(hook(k)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _merged_deepstack(merged: MergedInputs):
    batch, n = merged.image_positions.shape
    rows = torch.arange(batch, device=merged.image_positions.device).repeat_interleave(n)
    return rows, merged.image_positions.reshape(-1), [d.reshape(-1, d.shape[-1]) for d in merged.deepstack]


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    # sdpa never materialises attention probabilities; eager does, and returns them from each attention module.
    # Every config of the model is switched: the masks are built from the text config, the attention reads its own.
    configs = [c for c in {id(c): c for c in (model.config, model.config.get_text_config())}.values()]
    previous = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for c, p in zip(configs, previous):
            c._attn_implementation = p


def _language_kwargs(merged: MergedInputs) -> dict[str, torch.Tensor]:
    return {"inputs_embeds": merged.inputs_embeds, "attention_mask": merged.attention_mask, **merged.extras}


@torch.no_grad()
def probe_layer(model: nn.Module, anatomy: Anatomy, merged: MergedInputs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states entering decoder ``layer`` ``[B, L, D]`` and that layer's attention ``[B, H, L, L]``.

    Runs the model's own forward (its masks: Gemma's bidirectional image blocks; its positions: Qwen's
    M-RoPE) on the merged embeddings, with the layers after ``layer`` detached for the call.
    """
    layers = anatomy.decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range; expected 0..{len(layers) - 1} (decoder layers)")
    language_model = model.get_submodule(anatomy.language_model)
    base = model.get_submodule(anatomy.language_model.rpartition(".")[0])  # the VLM body: builds masks, positions
    captured: dict[str, torch.Tensor] = {}

    def keep_input(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    def keep_attention(module, args, output):
        captured["attention"] = output[1]

    hooks = [layers[layer].register_forward_pre_hook(keep_input, with_kwargs=True),
             layers[layer].get_submodule(anatomy.attention).register_forward_hook(keep_attention)]
    attribute = anatomy.layers.rsplit(".", 1)[-1]
    try:
        setattr(language_model, attribute, nn.ModuleList(list(layers)[:layer + 1]))
        with _eager_attention(model), _deepstack_injection(model, anatomy, *_merged_deepstack(merged),
                                                            merged.inputs_embeds.shape[1]):
            base(**_language_kwargs(merged), use_cache=False)
    finally:
        setattr(language_model, attribute, layers)
        for h in hooks:
            h.remove()
    if captured.get("attention") is None:
        raise RuntimeError(f"decoder layer {layer} returned no attention weights under eager attention")
    return captured["hidden"], captured["attention"]


def _gather(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[b, positions[b]]`` for ``x`` ``[B, L, ...]`` and ``positions`` ``[B, N]``."""
    index = positions.view(*positions.shape, *([1] * (x.dim() - 2))).expand(*positions.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def text_similarity(visual: torch.Tensor, hidden: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each visual token ``[B, N, D]`` to the question tokens of ``hidden`` ``[B, L, D]``."""
    cos = nn.functional.normalize(visual.float(), dim=-1) @ nn.functional.normalize(hidden.float(), dim=-1).transpose(1, 2)
    weights = question_mask.float().unsqueeze(1)
    return (cos * weights).sum(-1) / weights.sum(-1).clamp(min=1)


def last_token_attention(attention: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Attention from the last position (left padding: the last text token) to ``positions``, mean over heads."""
    return _gather(attention[:, :, -1, :].float().mean(1).unsqueeze(-1), positions).squeeze(-1)


def _default_layer(anatomy: Anatomy) -> int:
    return min(FASTV_LAYER, anatomy.num_layers - 1)


# ------------------------------------------------------------------------------------------ analysis (the maps)

def _grid_shape(anatomy: Anatomy, num_visual: int, grid: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """``(rows, cols, skip)``: the patch grid and how many leading tokens (a kept CLS) lie outside it.

    ``grid``: the image's merged-patch grid when the family reports one (Qwen's ``image_grid_thw``)."""
    if grid is not None and grid[0] * grid[1] == num_visual:
        return grid[0], grid[1], 0
    side = anatomy.image_size // anatomy.patch_size
    if num_visual == side * side:
        return side, side, 0
    if num_visual == side * side + 1:
        return side, side, 1
    root = math.isqrt(num_visual)
    if root * root == num_visual:  # a pooled square grid (Gemma 3's 256 = 16 x 16)
        return root, root, 0
    return 1, num_visual, 0  # tiles, newline tokens, pixel shuffle: one row


@torch.no_grad()
def analyze_tokens(loaded: LoadedModel, image: Image.Image, question: str, layer: int | None = None,
                   alpha: float = 0.7, attention_layer: int | None = None) -> dict:
    """Every per-visual-token score of one image + question, as grids shaped like the patch grid.

    ``layer=None``: scores at the projector output, attention read at ``attention_layer``
    (default FastV's layer 2); ``layer=L``: hidden states entering decoder layer L and its attention.
    """
    from compression.models.prompting import question_inputs

    if not loaded.has_weights:
        raise ValueError(f"model {loaded.name} is config-only (no weights); token scores need weights")
    if not question.strip():
        raise ValueError("question is empty; expected a question about the image")
    _check_alpha(alpha)
    model, anatomy = loaded.model, loaded.anatomy
    for name, value in (("layer", layer), ("attention_layer", attention_layer)):
        if value is not None and not 0 <= value < anatomy.num_layers:
            raise ValueError(f"{name} {value} is out of range; expected 0..{anatomy.num_layers - 1} (decoder layers)")
    read_at = layer if layer is not None else (attention_layer if attention_layer is not None else _default_layer(anatomy))
    device = next(model.parameters()).device
    inputs = question_inputs(loaded.prompt, [image], [question]).to(device)
    merged = merge_inputs(model, inputs, anatomy)
    grid = None
    if "image_grid_thw" in inputs:  # Qwen: (t, h, w) patches, merged spatial_merge_size x spatial_merge_size
        merge = model.config.vision_config.spatial_merge_size
        _, h, w = inputs["image_grid_thw"][0].tolist()
        grid = (h // merge, w // merge)
    hidden, attention = probe_layer(model, anatomy, merged, read_at)
    if layer is None:
        visual, context = merged.features, merged.inputs_embeds
    else:
        visual, context = _gather(hidden, merged.image_positions), hidden
    scores = {
        "outlier": outlier_intensity(visual.float()),
        "quant_error": int4_group_error(visual),
        "quant_score": quantization_score(visual),
        "semantic_similarity": text_similarity(visual, context, merged.question_mask),
        "semantic_attention": last_token_attention(attention, merged.image_positions),
    }
    scores["hybrid"] = hybrid_score(scores["semantic_attention"], scores["quant_score"], alpha)
    rows, cols, skip = _grid_shape(anatomy, visual.shape[1], grid)
    payload = {"kind": "tokens", "method": "qapruner", "layer": layer, "attention_layer": read_at, "alpha": alpha,
               "where": "projector output" if layer is None else f"input of decoder layer {layer}",
               "visual_tokens": int(visual.shape[1]), "hidden_size": int(visual.shape[-1]),
               "grid": [rows, cols], "cls_outside_grid": bool(skip)}
    flat = {name: s[0, skip:].tolist() for name, s in scores.items()}
    for name, values in flat.items():
        payload[name] = [values[r * cols:(r + 1) * cols] for r in range(rows)]
    payload["scores"] = [{"token": i + skip, "row": i // cols, "col": i % cols, **{n: v[i] for n, v in flat.items()}}
                         for i in range(rows * cols)]
    return payload


# ------------------------------------------------------------------------------------------ pruning at inference

@dataclass
class TokenPruningConfig:
    """Visual-token pruning options (a recipe's ``tokens:`` section).

    ``semantic`` picks S^P: FastV attention at decoder ``layer`` (needs a partial dense pass up to that
    layer) or cosine similarity to the question at the projector output (no extra pass).
    """

    keep_ratio: float = 1.0  # fraction of visual tokens kept, e.g. 0.5 / 0.25 / 0.125
    scorer: Scorer = "none"  # none keeps every token
    alpha: float = 0.7  # weight of the semantic score in the hybrid (QAPruner default)
    semantic: SemanticSource = "attention"
    layer: int = FASTV_LAYER  # decoder layer whose attention is read; clipped to the model's last layer
    seed: int = 0  # for the random scorer
    group: int = 128  # channels per INT4 group in the quantization score
    positions: PositionMode = "original"  # position ids after dropping: the dense ones kept, or re-indexed

    def __post_init__(self) -> None:
        if self.scorer in RECIPE_SCORERS:
            scorer, semantic = RECIPE_SCORERS[self.scorer]
            self.scorer = "semantic" if scorer == "hybrid" and self.alpha == 1.0 else scorer
            self.semantic = semantic or self.semantic
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer {self.scorer!r} is unknown; expected one of {', '.join(SCORERS)} "
                             f"(or a recipe name: {', '.join(RECIPE_SCORERS)})")
        if self.semantic not in SEMANTIC_SOURCES:
            raise ValueError(f"semantic {self.semantic!r} is unknown; expected one of {', '.join(SEMANTIC_SOURCES)}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio {self.keep_ratio} must lie in (0, 1]")
        if self.scorer == "none" and self.keep_ratio != 1.0:
            raise ValueError(f"keep_ratio {self.keep_ratio} needs a scorer (semantic, outlier, hybrid or random); "
                             "scorer 'none' keeps every visual token")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions {self.positions!r} is unknown; expected one of {', '.join(POSITION_MODES)}")
        _check_alpha(self.alpha)
        if self.layer < 0:
            raise ValueError(f"layer {self.layer} must be a decoder layer index >= 0")


@dataclass
class PrunedInputs:
    """The sequence with only the kept visual tokens. Rows whose visual-token counts differ (variable-count
    families) are left-padded to one length; ``kept`` is then a list of per-row index tensors."""

    inputs_embeds: torch.Tensor  # [B, L - N + k, D]
    attention_mask: torch.Tensor  # [B, L - N + k]
    kept: torch.Tensor | list[torch.Tensor]  # [B, k] indices (0..N-1) of the kept visual tokens, ascending
    position_ids: torch.Tensor | None = None  # [B, L - N + k] when positions="original" ([3, B, ...] for M-RoPE)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # token_type_ids, sliced like the sequence
    deepstack: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None = None  # rows, cols, features (Qwen3-VL)

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        kwargs = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask, **self.extras}
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        return kwargs


def score_visual_tokens(model: nn.Module, merged: MergedInputs, config: TokenPruningConfig,
                        generator: torch.Generator | None = None, anatomy: Anatomy | None = None) -> torch.Tensor:
    """The pruning score of every visual token, ``[B, N]``; higher is kept first."""
    batch, num_visual = merged.image_positions.shape
    if config.scorer == "random":
        return torch.rand(batch, num_visual, generator=generator).to(merged.features.device)
    if config.scorer == "none":
        return torch.zeros(batch, num_visual, device=merged.features.device)
    quant = quantization_score(merged.features, config.group)
    if config.scorer == "outlier":
        return quant
    if config.semantic == "similarity":
        semantic = text_similarity(merged.features, merged.inputs_embeds, merged.question_mask)
    else:
        anatomy = anatomy or anatomy_from_config(model.config)
        _, attention = probe_layer(model, anatomy, merged, min(config.layer, anatomy.num_layers - 1))
        semantic = last_token_attention(attention, merged.image_positions)
    if config.scorer == "semantic":
        return semantic
    return hybrid_score(semantic, quant, config.alpha)


def select_tokens(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores per row, in their original (ascending) order: ``[B, keep]``."""
    return torch.topk(scores, keep, dim=-1).indices.sort(-1).values


def _left_pad(rows: list[torch.Tensor], value=0) -> torch.Tensor:
    """Stack per-row tensors ``[L_b, ...]`` into ``[B, max L, ...]``, padding on the left."""
    length = max(r.shape[0] for r in rows)
    return torch.stack([torch.cat([r.new_full((length - r.shape[0], *r.shape[1:]), value), r]) for r in rows])


@torch.no_grad()
def prune_visual_tokens(model: nn.Module, inputs: dict[str, torch.Tensor], config: TokenPruningConfig,
                        generator: torch.Generator | None = None) -> PrunedInputs:
    """``inputs_embeds`` and ``attention_mask`` holding only the kept visual tokens (see the module docstring).

    Rows are scored in groups of equal visual-token count (all rows, for fixed-count families). What the
    family's language model reads beside the embeddings is cut the same way: Gemma's ``token_type_ids``,
    Qwen's M-RoPE ``position_ids`` (computed on the dense sequence, then indexed) and Qwen3-VL's DeepStack
    features (added back at the kept tokens' new positions during generation).
    """
    anatomy = _anatomy(model)
    mrope = families.family_for(model.config).positions == "mrope"
    if mrope and config.positions == "contiguous":
        raise ValueError("positions 'contiguous' is not defined for M-RoPE (Qwen-VL: 3-D image positions); "
                         "expected positions 'original'")
    dense = _dense(model, inputs, anatomy)
    per_row: dict[int, dict] = {}
    for rows in _row_groups(dense[2]):
        merged = _merged(*dense, rows)
        count, num_visual = merged.image_positions.shape
        keep = keep_count(num_visual, config.keep_ratio)
        kept = select_tokens(score_visual_tokens(model, merged, config, generator, anatomy), keep)
        sequence_keep = torch.ones_like(merged.attention_mask, dtype=torch.bool)
        sequence_keep.scatter_(1, merged.image_positions, False)
        sequence_keep.scatter_(1, torch.gather(merged.image_positions, 1, kept), True)
        if mrope:
            dense_positions = merged.extras["position_ids"]  # [3, G, L]
        else:  # the positions generate would give the dense sequence (left padding: cumulative sum of the mask)
            dense_positions = (merged.attention_mask.long().cumsum(-1) - 1).masked_fill(merged.attention_mask == 0, 0)
        new_index = sequence_keep.long().cumsum(-1) - 1  # position of each kept token in the shortened sequence
        kept_positions = torch.gather(merged.image_positions, 1, kept)
        for i, r in enumerate(rows):
            keep_row = sequence_keep[i]
            per_row[r] = {
                "embeds": merged.inputs_embeds[i][keep_row], "mask": merged.attention_mask[i][keep_row], "kept": kept[i],
                "positions": dense_positions[:, i][:, keep_row].T if mrope else dense_positions[i][keep_row],
                "extras": {k: v[i][keep_row] for k, v in merged.extras.items() if k != "position_ids"},
                "visual": new_index[i][kept_positions[i]], "deepstack": [d[i, kept[i]] for d in merged.deepstack]}
    order = [per_row[r] for r in range(len(per_row))]
    lengths = {len(o["mask"]) for o in order}
    pad = max(lengths) - torch.tensor([len(o["mask"]) for o in order])
    embeds, mask = _left_pad([o["embeds"] for o in order]), _left_pad([o["mask"] for o in order])
    position_ids = None
    if config.positions == "original":
        position_ids = _left_pad([o["positions"] for o in order])
        position_ids = position_ids.permute(2, 0, 1).contiguous() if mrope else position_ids
    extras = {k: _left_pad([o["extras"][k] for o in order]) for k in order[0]["extras"]}
    kept_all = [o["kept"] for o in order]
    kept_out = torch.stack(kept_all) if len({len(k) for k in kept_all}) == 1 else kept_all
    deepstack = None
    if merged.deepstack:
        rows_index = torch.cat([torch.full_like(o["visual"], b) for b, o in enumerate(order)])
        cols_index = torch.cat([o["visual"] + int(pad[b]) for b, o in enumerate(order)])
        features = [torch.cat([o["deepstack"][k] for o in order]) for k in range(len(merged.deepstack))]
        deepstack = (rows_index, cols_index, features)
    return PrunedInputs(embeds, mask, kept_out, position_ids, extras, deepstack)


@contextmanager
def injected(model: nn.Module, pruned: PrunedInputs) -> Iterator[None]:
    """The context in which ``model`` runs (or generates) on ``pruned.model_kwargs()``: Qwen3-VL's DeepStack
    features go back in at the kept visual tokens, and ``generate`` accepts ``inputs_embeds``.

    transformers 5.23's ``generate`` refuses ``inputs_embeds`` when the model's ``prepare_inputs_for_generation``
    does not name the argument, though Gemma 3's and PaliGemma's pass it on to the base implementation,
    which handles it; for the call, the instance gets a wrapper that names it."""
    prepare = model.prepare_inputs_for_generation
    patched = "inputs_embeds" not in inspect.signature(prepare).parameters
    if patched:
        def prepare_inputs_for_generation(input_ids, inputs_embeds=None, **kwargs):
            return prepare(input_ids, inputs_embeds=inputs_embeds, **kwargs)

        model.prepare_inputs_for_generation = prepare_inputs_for_generation
    try:
        if pruned.deepstack is None:
            yield
        else:
            rows, cols, features = pruned.deepstack
            with _deepstack_injection(model, _anatomy(model), rows, cols, features, pruned.inputs_embeds.shape[1]):
                yield
    finally:
        if patched:
            del model.prepare_inputs_for_generation


def make_generate_fn(keep_ratio: float, scorer: Scorer, alpha: float = 0.7, seed: int = 0,
                     semantic: SemanticSource = "attention", layer: int = FASTV_LAYER,
                     positions: PositionMode = "original") -> Callable[[nn.Module, dict, int], torch.Tensor]:
    """``generate_fn(model, inputs, max_new_tokens) -> new token ids`` for ``evaluate.accuracy(generate_fn=...)``."""
    config = TokenPruningConfig(keep_ratio, scorer, alpha, semantic, layer, seed, positions=positions)
    generator = torch.Generator().manual_seed(seed)

    def generate_fn(model: nn.Module, inputs: dict, max_new_tokens: int) -> torch.Tensor:
        pruned = prune_visual_tokens(model, inputs, config, generator)
        # with inputs_embeds and no input_ids, generate returns only the new tokens
        with injected(model, pruned):
            return model.generate(**pruned.model_kwargs(), max_new_tokens=max_new_tokens, do_sample=False)

    return generate_fn


def make_inputs_fn(keep_ratio: float, scorer: Scorer, alpha: float = 0.7, seed: int = 0,
                   semantic: SemanticSource = "attention", layer: int = FASTV_LAYER,
                   positions: PositionMode = "original") -> Callable[[nn.Module, dict], dict]:
    """``inputs_fn(model, processor_inputs) -> model kwargs`` for ``evaluate.latency(inputs_fn=...)``.

    The scoring itself runs inside ``inputs_fn``, outside the timed forward: latency then measures
    the language model on the pruned sequence only.
    """
    config = TokenPruningConfig(keep_ratio, scorer, alpha, semantic, layer, seed, positions=positions)
    generator = torch.Generator().manual_seed(seed)

    def inputs_fn(model: nn.Module, inputs: dict) -> dict:
        device = next(model.parameters()).device
        return prune_visual_tokens(model, {k: v.to(device) for k, v in inputs.items()}, config,
                                   generator).model_kwargs()

    return inputs_fn
