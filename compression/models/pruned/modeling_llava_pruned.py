"""LLaVA whose decoder layers each have their own attention and MLP widths (structurally pruned).

Self-contained (imports only torch and transformers): ``compression.methods.prune.save_pruned`` ships
this file in the model folder with an ``auto_map``, so the folder loads with
``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`` and no project import.

How: build the ordinary ``LlavaForConditionalGeneration`` from the config, then replace each
decoder layer's q/k/v/o (Phi: ``dense``) and gate/up/down (Phi: ``fc1``/``fc2``) linears with
linears of that layer's width (``text_config.pruned_widths``) and set the attention's
``num_key_value_groups`` (query heads per KV head). ``head_dim`` and ``hidden_size`` never change.
Inside ``from_pretrained`` the model is built on the meta device, so the full-width layers
built first cost no memory. Widthwise pruning as in Huang et al., arXiv 2507.20749.
"""
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from .configuration_llava_pruned import LlavaPrunedConfig

# Projection names per language backbone: attention (q, k, v, o), MLP (gate or None, up, down).
ATTENTION_NAMES = {"phi": ("q_proj", "k_proj", "v_proj", "dense")}
MLP_NAMES = {"phi": (None, "fc1", "fc2")}
DEFAULT_ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def resized_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised linear of the new shape, same bias presence, dtype and device as ``old``."""
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def set_layer_widths(layer: nn.Module, model_type: str, head_dim: int, heads: int, kv_heads: int,
                     intermediate: int) -> None:
    """Give one decoder layer ``heads`` query heads, ``kv_heads`` KV heads and ``intermediate`` neurons."""
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    q, k, v, o = ATTENTION_NAMES.get(model_type, DEFAULT_ATTENTION_NAMES)
    gate, up, down = MLP_NAMES.get(model_type, DEFAULT_MLP_NAMES)
    attn, mlp = layer.self_attn, layer.mlp
    hidden = getattr(attn, q).in_features
    for name, n in ((q, heads), (k, kv_heads), (v, kv_heads)):
        old = getattr(attn, name)
        if old.out_features != n * head_dim:
            setattr(attn, name, resized_linear(old, hidden, n * head_dim))
    if getattr(attn, o).in_features != heads * head_dim:
        setattr(attn, o, resized_linear(getattr(attn, o), heads * head_dim, hidden))
    attn.num_key_value_groups = heads // kv_heads  # read by repeat_kv / SDPA's GQA path
    for name in (gate, up):
        if name and getattr(mlp, name).out_features != intermediate:
            setattr(mlp, name, resized_linear(getattr(mlp, name), hidden, intermediate))
    if getattr(mlp, down).in_features != intermediate:
        setattr(mlp, down, resized_linear(getattr(mlp, down), intermediate, hidden))


def apply_pruned_widths(model: nn.Module, text_config) -> None:
    """Resize every decoder layer of ``model`` to ``text_config.pruned_widths`` (no-op without it)."""
    widths = getattr(text_config, "pruned_widths", None)
    if not widths:
        return
    layers = model.model.language_model.layers
    n = len(layers)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if len(widths[key]) != n:
            raise ValueError(f"pruned_widths[{key!r}] has {len(widths[key])} entries for {n} decoder layers")
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    for i, layer in enumerate(layers):
        set_layer_widths(layer, text_config.model_type, head_dim, widths["num_attention_heads"][i],
                         widths["num_key_value_heads"][i], widths["intermediate_size"][i])


class LlavaPrunedForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` with per-layer widths from ``text_config.pruned_widths``."""

    config_class = LlavaPrunedConfig

    def __init__(self, config: LlavaPrunedConfig):
        super().__init__(config)
        with torch.no_grad():
            apply_pruned_widths(self, config.text_config)


LlavaPrunedForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
