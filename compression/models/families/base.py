"""What a family description says, and the one generic function that turns it into an ``Anatomy``.

A ``Family`` is declarative: the transformers classes, where the language model, vision tower and
projector live, which config field holds the image token id, what else the forward pass takes from the
processor, and how visual tokens are placed (fixed or variable count; 1-D or Qwen's 3-D M-RoPE
positions; Gemma's ``token_type_ids``; Qwen3-VL's DeepStack features). Its language model is described
by a ``TextStack`` (``compression.models.families.text``), keyed by the text config's ``model_type``:
projection names, fused projections, per-head norms. What a description cannot say in fields (how many
visual tokens one image gives) is one function in the family's own module, ``geometry(config)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from compression.models.anatomy import Anatomy, ModelLoadError


@dataclass(frozen=True)
class TextStack:
    """A decoder-only language model as a VLM embeds it: the names inside one decoder layer.

    ``head_norms`` are RMSNorms applied per head to q and k (Qwen3, Gemma 3): a weight of ``head_dim``
    is shared by every head and stays as it is when heads go; a weight of ``heads * head_dim`` is per
    head and is sliced with them. ``fused`` projections (Phi-3's ``qkv_proj``, ``gate_up_proj``) hold
    several projections' rows in one matrix; width pruning refuses them rather than slice them wrong.
    ``qkv_bias``: q/k/v carry biases (Qwen2), sliced with their rows.
    """

    name: str
    attention: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp: tuple[str | None, str, str] = ("gate_proj", "up_proj", "down_proj")
    head_norms: tuple[str, ...] = ()
    fused: tuple[str, ...] = ()
    qkv_bias: bool = False
    # False when the attention derives head_dim from hidden_size / num_attention_heads instead of reading
    # config.head_dim: fewer heads would not load, so width pruning removes MLP neurons only
    heads_prunable: bool = True


@dataclass(frozen=True)
class Geometry:
    """What one image becomes: ``tokens`` visual tokens (exact when ``fixed``; else for one
    ``image_size`` image / tile, with ``note`` saying how it varies) from ``patches`` vision-tower positions."""

    image_size: int
    patch_size: int
    patches: int
    tokens: int
    fixed: bool
    vision_layers: int
    vision_hidden_size: int
    note: str = ""


@dataclass(frozen=True)
class Family:
    """One vision-language model family, as transformers implements it (module docstring)."""

    name: str  # what users call it: "Qwen2.5-VL"
    model_type: str  # the top-level config's model_type
    model_class: str  # transformers class names
    config_class: str
    processor_class: str
    image_processor_class: str  # the PIL image processor (works without torchvision)
    text_types: tuple[str, ...]  # language backbones it is tested with (text_config.model_type)
    vision_types: tuple[str, ...]
    geometry: Callable[[Any], Geometry]
    language_model: str = "model.language_model"
    vision_tower: str = "model.vision_tower"
    projectors: tuple[str, ...] = ("model.multi_modal_projector",)
    # the frozen part of the vision tower, identical in teacher and student (shared while distilling); empty: the
    # whole tower. A listed ModuleList (Qwen's blocks) is shared as a whole and its layers' outputs cached one by one.
    frozen_vision: tuple[str, ...] = ()
    lm_head: str = "lm_head"
    image_token_field: str = "image_token_index"
    forward_kwargs: tuple[str, ...] = ()
    # token_type_ids the processor returns: "image" = 1 on visual tokens (Gemma 3: bidirectional attention
    # inside an image); "prefix" = 0 on image + prompt, 1 on the answer (PaliGemma's prefix-LM mask)
    token_types: Literal["none", "image", "prefix"] = "none"
    positions: Literal["1d", "mrope"] = "1d"  # mrope: Qwen's (temporal, height, width) position ids
    deepstack: bool = False  # Qwen3-VL adds vision features from inner vision layers after decoder layers 0..k-1
    video_processor: bool = False  # its stock processor takes a video processor (needs torchvision here)
    processor_defaults: dict[str, Any] = field(default_factory=dict)  # class attributes of the image-only processor

    @property
    def pruned_model_type(self) -> str:
        """``model_type`` of its non-uniformly pruned folders (``compression.models.pruned``)."""
        return f"{self.model_type}_pruned"

    @property
    def model_types(self) -> tuple[str, ...]:
        return (self.model_type, self.pruned_model_type)

    def transformers_class(self, which: Literal["model", "config", "processor"] = "model"):
        import transformers

        name = {"model": self.model_class, "config": self.config_class, "processor": self.processor_class}[which]
        return getattr(transformers, name)

    def image_token_id(self, config) -> int:
        return int(getattr(config, self.image_token_field))

    def describe(self) -> dict[str, Any]:
        """The facts a user reads in the README table / the UI: what this family is and how it is handled."""
        return {"family": self.name, "model_type": self.model_type, "class": self.model_class,
                "language_models": list(self.text_types), "vision_towers": list(self.vision_types),
                "projector": list(self.projectors), "forward_kwargs": list(self.forward_kwargs),
                "positions": self.positions, "token_types": self.token_types, "deepstack": self.deepstack,
                "image_only_processor": self.video_processor}


def widths(text_config) -> tuple[list[int], list[int], list[int]]:
    """Per-layer (query heads, KV heads, MLP neurons): ``pruned_widths`` when the layers differ."""
    n = text_config.num_hidden_layers
    pruned = getattr(text_config, "pruned_widths", None)  # written by compression.methods.prune for non-uniform widths
    if pruned:
        return (list(pruned["num_attention_heads"]), list(pruned["num_key_value_heads"]),
                list(pruned["intermediate_size"]))
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    return [heads] * n, [kv] * n, [text_config.intermediate_size] * n


def build_anatomy(family: Family, config, stack: TextStack) -> Anatomy:
    """The ``Anatomy`` of ``config`` as ``family`` and its language model's ``stack`` describe it."""
    text, vision = config.text_config, config.vision_config
    if vision.model_type not in family.vision_types:
        raise ModelLoadError(f"unsupported architecture: {family.name} with vision tower {vision.model_type!r}; "
                             f"supported: {', '.join(family.vision_types)}")
    heads, kv, inter = widths(text)
    q, k, v, o = stack.attention
    gate, up, down = stack.mlp
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    geo = family.geometry(config)
    lm = family.language_model
    skip = [family.vision_tower, *[p for p in family.projectors if not p.startswith(family.vision_tower + ".")],
            family.lm_head]
    return Anatomy(
        language_model_type=text.model_type, vision_model_type=vision.model_type,
        vision_tower=family.vision_tower, projector=family.projectors[0], language_model=lm,
        layers=f"{lm}.layers", lm_head=family.lm_head, embed_tokens=f"{lm}.embed_tokens", attention="self_attn",
        mlp="mlp", q_proj=q, k_proj=k, v_proj=v, o_proj=o, gate_proj=gate, up_proj=up, down_proj=down,
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, head_dim=head_dim,
        heads_per_layer=heads, kv_heads_per_layer=kv, intermediate_per_layer=inter,
        visual_tokens=geo.tokens, image_size=geo.image_size, patch_size=geo.patch_size,
        vocab_size=text.vocab_size, image_token_index=family.image_token_id(config),
        family=family.name, model_type=family.model_type, norm=f"{lm}.norm", projectors=family.projectors,
        frozen_vision=family.frozen_vision or (family.vision_tower,),
        head_norms=stack.head_norms, fused=stack.fused, heads_prunable=stack.heads_prunable, visual_tokens_fixed=geo.fixed, visual_tokens_note=geo.note,
        vision_layers=geo.vision_layers, vision_hidden_size=geo.vision_hidden_size, vision_patches=geo.patches,
        forward_kwargs=family.forward_kwargs, skip_quantization=skip)
