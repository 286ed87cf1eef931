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

Pruning at inference, without editing transformers: image features come from
``model.model.get_image_features``; the kept image tokens (in their original order) replace the
``<image>`` placeholders and the dropped placeholders are removed from the sequence and from the
attention mask; ``model.generate(inputs_embeds=..., attention_mask=...)`` then runs. Left padding stays
left padding: every row has the same number of image tokens, so every row loses the same number of
positions and the batch stays rectangular.

**Positions** (``positions=``): ``"original"`` (default) passes each kept token's position id from the
dense sequence (gaps where tokens were dropped, as FastV keeps them), and generate continues from the
last one. ``"contiguous"`` passes none, so generate derives them from the attention mask (cumulative
sum): the remaining tokens are re-indexed contiguously and the text after the image moves closer to
it, as if the image had fewer patches. Why the default: on an earlier reference checkpoint (60 questions,
50 % kept) re-indexing cost 13-17 more points than original positions; on the shipped run at 12.5 % under
W4A4 both gave 61.6 % (benchmarks/results/tokens.md), so it is never worse in what was measured.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
from PIL import Image
from torch import nn

from compression.models import Anatomy, LoadedModel, anatomy_from_config

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

def visual_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projector output for a batch of images, ``[B, N, D]`` (CLS already dropped by the model's strategy)."""
    out = model.model.get_image_features(pixel_values=pixel_values)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        feats = torch.stack(list(feats))
    return feats


@dataclass
class MergedInputs:
    """The dense multimodal sequence, as LLaVA builds it internally."""

    inputs_embeds: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # [B, L]
    image_positions: torch.Tensor  # [B, N] sequence index of each visual token, in order
    question_mask: torch.Tensor  # [B, L] True on the text tokens after the image (question and template)
    features: torch.Tensor  # [B, N, D] projector output


def merge_inputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> MergedInputs:
    """Embed the text and put the projector output at the ``<image>`` placeholders."""
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    features = visual_features(model, inputs["pixel_values"])
    embeds = model.get_input_embeddings()(input_ids)
    features = features.to(embeds.dtype)
    image_mask = input_ids == model.config.image_token_index
    batch, num_visual = features.shape[:2]
    per_row = image_mask.sum(-1)
    if not bool((per_row == num_visual).all()):
        raise ValueError(f"each prompt must hold exactly {num_visual} <image> tokens (one image per prompt); "
                         f"found {per_row.tolist()}")
    embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features)
    image_positions = image_mask.nonzero()[:, 1].view(batch, num_visual)
    after_image = torch.arange(input_ids.shape[1], device=input_ids.device) > image_positions[:, -1:]
    return MergedInputs(embeds, attention_mask, image_positions, after_image & attention_mask.bool(), features)


@contextmanager
def _eager_attention(language_model: nn.Module) -> Iterator[None]:
    # sdpa never materialises attention probabilities; eager does, and returns them from each attention module
    config = language_model.config
    previous = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


@torch.no_grad()
def probe_layer(model: nn.Module, anatomy: Anatomy, merged: MergedInputs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states entering decoder ``layer`` ``[B, L, D]`` and that layer's attention ``[B, H, L, L]``.

    Runs the language model only up to ``layer`` (the later layers are detached for the call).
    """
    layers = anatomy.decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range; expected 0..{len(layers) - 1} (decoder layers)")
    language_model = model.get_submodule(anatomy.language_model)
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
        with _eager_attention(language_model):
            language_model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask, use_cache=False)
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

def _grid_shape(anatomy: Anatomy, num_visual: int) -> tuple[int, int, int]:
    """``(rows, cols, skip)``: the patch grid and how many leading tokens (a kept CLS) lie outside it."""
    side = anatomy.image_size // anatomy.patch_size
    if num_visual == side * side:
        return side, side, 0
    if num_visual == side * side + 1:
        return side, side, 1
    return 1, num_visual, 0  # not a square patch grid (e.g. a pooling projector): one row


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
    merged = merge_inputs(model, question_inputs(loaded.prompt, [image], [question]).to(device))
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
    rows, cols, skip = _grid_shape(anatomy, visual.shape[1])
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
    inputs_embeds: torch.Tensor  # [B, L - N + k, D]
    attention_mask: torch.Tensor  # [B, L - N + k]
    kept: torch.Tensor  # [B, k] indices (0..N-1) of the kept visual tokens, ascending
    position_ids: torch.Tensor | None = None  # [B, L - N + k] when positions="original"

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        kwargs = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask}
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


@torch.no_grad()
def prune_visual_tokens(model: nn.Module, inputs: dict[str, torch.Tensor], config: TokenPruningConfig,
                        generator: torch.Generator | None = None) -> PrunedInputs:
    """``inputs_embeds`` and ``attention_mask`` holding only the kept visual tokens (see the module docstring)."""
    return prune_merged(model, merge_inputs(model, inputs), config, generator)


@torch.no_grad()
def prune_merged(model: nn.Module, merged: MergedInputs, config: TokenPruningConfig,
                 generator: torch.Generator | None = None) -> PrunedInputs:
    """``prune_visual_tokens`` from an already merged sequence (one vision pass serves several ratios)."""
    batch, num_visual = merged.image_positions.shape
    keep = keep_count(num_visual, config.keep_ratio)
    kept = select_tokens(score_visual_tokens(model, merged, config, generator), keep)
    sequence_keep = torch.ones_like(merged.attention_mask, dtype=torch.bool)
    sequence_keep.scatter_(1, merged.image_positions, False)
    sequence_keep.scatter_(1, torch.gather(merged.image_positions, 1, kept), True)
    length = sequence_keep.shape[1] - (num_visual - keep)
    embeds = merged.inputs_embeds[sequence_keep].view(batch, length, -1)
    mask = merged.attention_mask[sequence_keep].view(batch, length)
    position_ids = None
    if config.positions == "original":
        # the positions generate would give the dense sequence (left padding: cumulative sum of the mask)
        dense = (merged.attention_mask.long().cumsum(-1) - 1).masked_fill(merged.attention_mask == 0, 0)
        position_ids = dense[sequence_keep].view(batch, length)
    return PrunedInputs(embeds, mask, kept, position_ids)


def make_generate_fn(keep_ratio: float, scorer: Scorer, alpha: float = 0.7, seed: int = 0,
                     semantic: SemanticSource = "attention", layer: int = FASTV_LAYER,
                     positions: PositionMode = "original") -> Callable[[nn.Module, dict, int], torch.Tensor]:
    """``generate_fn(model, inputs, max_new_tokens) -> new token ids`` for ``evaluate.accuracy(generate_fn=...)``."""
    config = TokenPruningConfig(keep_ratio, scorer, alpha, semantic, layer, seed, positions=positions)
    generator = torch.Generator().manual_seed(seed)

    def generate_fn(model: nn.Module, inputs: dict, max_new_tokens: int) -> torch.Tensor:
        pruned = prune_visual_tokens(model, inputs, config, generator)
        # with inputs_embeds and no input_ids, generate returns only the new tokens
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
