"""Configuration of a LLaVA model whose decoder layers have their own widths (structurally pruned).

Self-contained (imports only transformers): ``compression.methods.prune.save_pruned`` ships this file in
the model folder, so ``from_pretrained(folder, trust_remote_code=True)`` needs no project import.

The text config keeps the unpruned ``num_attention_heads`` / ``num_key_value_heads`` /
``intermediate_size`` (so transformers' validator, which wants ``hidden_size %
num_attention_heads == 0``, still passes) and adds the real per-layer widths:
``text_config.pruned_widths = {"num_attention_heads": [...], "num_key_value_heads": [...],
"intermediate_size": [...]}`` with ``head_dim`` written out explicitly.
"""
from transformers import LlavaConfig


class LlavaPrunedConfig(LlavaConfig):
    """``LlavaConfig`` with ``model_type = "llava_pruned"``; widths per layer in ``text_config.pruned_widths``."""

    model_type = "llava_pruned"


LlavaPrunedConfig.register_for_auto_class()
