"""The classes of non-uniformly pruned folders (``model_type: "<family>_pruned"``).

LLaVA's live in ``configuration_llava_pruned`` / ``modeling_llava_pruned``, every other family's in
``configuration_vlm_pruned`` / ``modeling_vlm_pruned`` (self-contained files that ``save_pretrained``
copies into the folder, with an ``auto_map``); ``compression.models`` loads such folders through these
names without ``trust_remote_code``.
"""
from compression.models.pruned.configuration_llava_pruned import LlavaPrunedConfig
from compression.models.pruned.modeling_llava_pruned import LlavaPrunedForConditionalGeneration, apply_pruned_widths, set_layer_widths

__all__ = ["LlavaPrunedConfig", "LlavaPrunedForConditionalGeneration", "apply_pruned_widths", "set_layer_widths"]


def _register() -> None:
    # So that Auto* classes resolve "<family>_pruned" in this process without remote code (AutoTokenizer
    # reads config.json, and would otherwise ask whether to trust the folder's code).
    from transformers import AutoConfig, AutoModelForImageTextToText

    from compression.models.pruned.configuration_vlm_pruned import CONFIGS
    from compression.models.pruned.modeling_vlm_pruned import MODELS

    for config, model in [(LlavaPrunedConfig, LlavaPrunedForConditionalGeneration)] + [
            (CONFIGS[t], MODELS[t]) for t in CONFIGS]:
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModelForImageTextToText.register(config, model, exist_ok=True)


_register()


def pruned_classes(family) -> tuple[type, type]:
    """``(config class, model class)`` of a family's non-uniformly pruned folders (``<model_type>_pruned``)."""
    from compression.models.pruned.configuration_vlm_pruned import CONFIGS
    from compression.models.pruned.modeling_vlm_pruned import MODELS

    if family.model_type == "llava":
        return LlavaPrunedConfig, LlavaPrunedForConditionalGeneration
    if family.model_type not in CONFIGS:
        raise ValueError(f"{family.name} has no pruned-model class; expected one of llava, {', '.join(CONFIGS)}")
    return CONFIGS[family.model_type], MODELS[family.model_type]
