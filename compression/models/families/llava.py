"""LLaVA (``LlavaForConditionalGeneration``; Liu et al., "Improved Baselines with Visual Instruction Tuning",
arXiv 2310.03744; transformers ``models/llava``): CLIP or SigLIP tower -> 2-layer MLP projector -> decoder.

Visual tokens are fixed: one per patch, ``(image_size / patch_size)^2`` (576 for LLaVA-1.5 at 336 px);
CLIP's CLS token is dropped under ``vision_feature_select_strategy="default"``. Each ``<image>`` in the
text is expanded by the processor to that many ``image_token_index`` tokens. Non-uniformly pruned LLaVA
folders are ``model_type: "llava_pruned"`` (``compression.models.pruned``).
"""
from compression.models.families.base import Family, Geometry


def geometry(config) -> Geometry:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + int(vision.model_type == "clip_vision_model")
    drop_first = getattr(config, "vision_feature_select_strategy", "default") == "default"
    return Geometry(vision.image_size, vision.patch_size, patches, patches - int(drop_first), True,
                    vision.num_hidden_layers, vision.hidden_size)


FAMILY = Family(
    name="LLaVA", model_type="llava", model_class="LlavaForConditionalGeneration", config_class="LlavaConfig",
    processor_class="LlavaProcessor", image_processor_class="CLIPImageProcessorPil",
    text_types=("llama", "mistral", "qwen2", "phi", "gemma"), vision_types=("clip_vision_model", "siglip_vision_model"),
    geometry=geometry)
