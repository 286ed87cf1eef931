"""The anatomy of one loaded model: where its parts live and the sizes structural pruning needs.

An ``Anatomy`` is what every method module (importance, prune, recover, quantize, tokens, whatif,
export, the UI) reads; it is built from the model's config by its family description
(``compression.models.families``), so no module outside the families asks which architecture it has.
Names follow transformers' own config fields (``num_key_value_heads``, ``intermediate_size``, ``head_dim``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


class ModelLoadError(ValueError):
    """The model source cannot be used; the message is one line naming the value and what was expected."""


@dataclass
class Anatomy:
    """Where the parts of a vision-language model live, and the sizes that structural pruning needs.

    Module paths are dotted names relative to the ``...ForConditionalGeneration`` model. Per-layer lists
    (``heads_per_layer`` ...) have one entry per decoder layer; they differ from layer to layer only in a
    non-uniformly pruned model. ``projectors`` are every module (or parameter) between the vision tower
    and the language model: what "projector" recovery trains (LLaVA's MLP, Qwen's merger and its
    DeepStack mergers, Idefics3's connector, LLaVA-NeXT's ``image_newline``); ``projector`` is the first.
    ``frozen_vision`` are the modules of the vision tower that no recovery mode trains and pruning never touches
    (the whole tower, or for Qwen the tower before its merger): teacher and student share them during distillation
    (``compression.methods.vision_sharing``); their parameters are the ``vision`` count of ``parameter_counts``.
    ``visual_tokens`` is exact for fixed-count families and the count for one ``image_size`` image (one
    tile) otherwise (``visual_tokens_fixed`` False; ``visual_tokens_note`` says how the count varies).
    """

    language_model_type: str
    vision_model_type: str
    vision_tower: str
    projector: str
    language_model: str
    layers: str
    lm_head: str
    embed_tokens: str
    attention: str  # attribute of a decoder layer
    mlp: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    gate_proj: str | None
    up_proj: str
    down_proj: str
    num_layers: int
    hidden_size: int
    head_dim: int
    heads_per_layer: list[int]
    kv_heads_per_layer: list[int]
    intermediate_per_layer: list[int]
    visual_tokens: int
    image_size: int
    patch_size: int
    vocab_size: int
    image_token_index: int
    family: str = "LLaVA"
    model_type: str = "llava"
    norm: str = "model.language_model.norm"
    projectors: tuple[str, ...] = ()
    frozen_vision: tuple[str, ...] = ()
    head_norms: tuple[str, ...] = ()  # per-head q/k norms inside the attention module (Qwen3, Gemma 3)
    fused: tuple[str, ...] = ()  # fused projections (Phi-3 qkv_proj / gate_up_proj): width pruning refuses them
    heads_prunable: bool = True  # False: the attention derives head_dim from the head count (Qwen2-VL text)
    visual_tokens_fixed: bool = True
    visual_tokens_note: str = ""
    vision_layers: int = 0
    vision_hidden_size: int = 0
    vision_patches: int = 0  # patches the vision tower sees for one ``image_size`` image (its sequence length)
    forward_kwargs: tuple[str, ...] = ()  # processor outputs the forward pass takes beyond ids, mask, pixels
    skip_quantization: list[str] = field(default_factory=list)  # module prefixes kept in floating point

    def __post_init__(self) -> None:
        if not self.projectors:
            self.projectors = (self.projector,)
        if not self.frozen_vision:
            self.frozen_vision = (self.vision_tower,)

    @property
    def num_attention_heads(self) -> int:
        return self.heads_per_layer[0]

    @property
    def num_key_value_heads(self) -> int:
        return self.kv_heads_per_layer[0]

    @property
    def gqa_group_size(self) -> int:
        """Query heads sharing one KV head (1 = multi-head attention)."""
        return self.heads_per_layer[0] // self.kv_heads_per_layer[0]

    @property
    def intermediate_size(self) -> int:
        return self.intermediate_per_layer[0]

    @property
    def uniform(self) -> bool:
        return len({(h, k, m) for h, k, m in zip(self.heads_per_layer, self.kv_heads_per_layer,
                                                  self.intermediate_per_layer)}) <= 1

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        attn = layer.get_submodule(self.attention)
        return {"q": getattr(attn, self.q_proj), "k": getattr(attn, self.k_proj),
                "v": getattr(attn, self.v_proj), "o": getattr(attn, self.o_proj)}

    def mlp_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        mlp = layer.get_submodule(self.mlp)
        out = {"up": getattr(mlp, self.up_proj), "down": getattr(mlp, self.down_proj)}
        if self.gate_proj:
            out["gate"] = getattr(mlp, self.gate_proj)
        return out

    def projector_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every parameter of the projector(s), in order, once each."""
        out: list[nn.Parameter] = []
        for path in self.projectors:
            try:
                out += list(model.get_submodule(path).parameters())
            except AttributeError:
                out.append(model.get_parameter(path))  # a bare parameter, e.g. LLaVA-NeXT's image_newline
        return list({id(p): p for p in out}.values())

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                 gqa_group_size=self.gqa_group_size, intermediate_size=self.intermediate_size, uniform=self.uniform)
        d["projectors"] = list(self.projectors)
        d["frozen_vision"] = list(self.frozen_vision)
        d["head_norms"] = list(self.head_norms)
        d["fused"] = list(self.fused)
        d["forward_kwargs"] = list(self.forward_kwargs)
        return d
