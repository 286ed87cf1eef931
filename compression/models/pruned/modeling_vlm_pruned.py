"""Vision-language models whose decoder layers each have their own attention and MLP widths (structurally
pruned), for every family but LLaVA (``modeling_llava_pruned``).

Self-contained (imports only torch and transformers): ``compression.methods.prune.save_pruned`` ships this
file in the model folder with an ``auto_map``, so it loads with
``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`` and no project import.

How: build the family's ordinary model from the config, then give each decoder layer (found at
``text_config.pruned_widths["layers"]``) linears of its own width and set its attention's
``num_key_value_groups``. ``head_dim``, ``hidden_size`` and per-head q/k norms (weight ``head_dim``, shared
by the heads) never change. Inside ``from_pretrained`` the model is built on the meta device, so the
full-width layers built first cost no memory. Widthwise pruning as in Huang et al., arXiv 2507.20749.
"""
import torch
import transformers
from torch import nn

from .configuration_vlm_pruned import CONFIGS, FAMILIES


def resized_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised linear of the new shape, same bias presence, dtype and device as ``old``."""
    return nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                     dtype=old.weight.dtype)


def set_layer_widths(layer: nn.Module, attention: list, mlp: list, head_dim: int, heads: int, kv_heads: int,
                     intermediate: int) -> None:
    """Give one decoder layer ``heads`` query heads, ``kv_heads`` KV heads and ``intermediate`` neurons."""
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    q, k, v, o = attention
    gate, up, down = mlp
    attn, block = layer.self_attn, layer.mlp
    hidden = getattr(attn, q).in_features
    for name, n in ((q, heads), (k, kv_heads), (v, kv_heads)):
        if getattr(attn, name).out_features != n * head_dim:
            setattr(attn, name, resized_linear(getattr(attn, name), hidden, n * head_dim))
    if getattr(attn, o).in_features != heads * head_dim:
        setattr(attn, o, resized_linear(getattr(attn, o), heads * head_dim, hidden))
    attn.num_key_value_groups = heads // kv_heads  # read by repeat_kv / SDPA's GQA path
    for name in (gate, up):
        if name and getattr(block, name).out_features != intermediate:
            setattr(block, name, resized_linear(getattr(block, name), hidden, intermediate))
    if getattr(block, down).in_features != intermediate:
        setattr(block, down, resized_linear(getattr(block, down), intermediate, hidden))


def apply_pruned_widths(model: nn.Module, text_config) -> None:
    """Resize every decoder layer of ``model`` to ``text_config.pruned_widths`` (no-op without it)."""
    widths = getattr(text_config, "pruned_widths", None)
    if not widths:
        return
    layers = model.get_submodule(widths["layers"])
    n = len(layers)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if len(widths[key]) != n:
            raise ValueError(f"pruned_widths[{key!r}] has {len(widths[key])} entries for {n} decoder layers")
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    for i, layer in enumerate(layers):
        set_layer_widths(layer, widths["attention"], widths["mlp"], head_dim, widths["num_attention_heads"][i],
                         widths["num_key_value_heads"][i], widths["intermediate_size"][i])


def _pruned_class(name: str, base: type, config_class: type) -> type:
    def __init__(self, config):
        base.__init__(self, config)
        with torch.no_grad():
            apply_pruned_widths(self, config.get_text_config())

    return type(name, (base,), {"config_class": config_class, "__init__": __init__, "__module__": __name__})


MODELS = {}
for _model_type, (_config, _model) in FAMILIES.items():
    _name = _model.replace("ForConditionalGeneration", "PrunedForConditionalGeneration")
    MODELS[_model_type] = _pruned_class(_name, getattr(transformers, _model), CONFIGS[_model_type])
    globals()[_name] = MODELS[_model_type]
    MODELS[_model_type].register_for_auto_class("AutoModelForImageTextToText")
