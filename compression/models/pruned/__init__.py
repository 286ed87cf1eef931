"""The classes of non-uniformly pruned LLaVA folders (``model_type: "llava_pruned"``).

They live in ``configuration_llava_pruned`` / ``modeling_llava_pruned`` (self-contained files that
``save_pretrained`` copies into the folder, with an ``auto_map``); ``compression.models`` loads
such folders through these names without ``trust_remote_code``.
"""
from compression.models.pruned.configuration_llava_pruned import LlavaPrunedConfig
from compression.models.pruned.modeling_llava_pruned import LlavaPrunedForConditionalGeneration, apply_pruned_widths, set_layer_widths

__all__ = ["LlavaPrunedConfig", "LlavaPrunedForConditionalGeneration", "apply_pruned_widths", "set_layer_widths"]


def _register() -> None:
    # So that Auto* classes resolve "llava_pruned" in this process without remote code (AutoTokenizer
    # reads config.json, and would otherwise ask whether to trust the folder's code).
    from transformers import AutoConfig, AutoModelForImageTextToText

    AutoConfig.register("llava_pruned", LlavaPrunedConfig, exist_ok=True)
    AutoModelForImageTextToText.register(LlavaPrunedConfig, LlavaPrunedForConditionalGeneration, exist_ok=True)


_register()


def pruned_classes(family) -> tuple[type, type]:
    """``(config class, model class)`` of a family's non-uniformly pruned folders."""
    if family.pruned_model_type != "llava_pruned":
        raise ValueError(f"{family.name} has no pruned-model class; expected LLaVA")
    return LlavaPrunedConfig, LlavaPrunedForConditionalGeneration
