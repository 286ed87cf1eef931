"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``; Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and
world knowledge", 2024; transformers ``models/llava_next``): LLaVA with any-resolution tiling.

Visual tokens vary per image: a base tile at ``image_size`` plus the grid of tiles of the best
``image_grid_pinpoints`` resolution, unpadded to the image's aspect ratio, with one learned
``image_newline`` per feature row (``model.image_newline``, trained with the projector). The forward pass
needs ``image_sizes`` (original height, width). Every visual token is an ``image_token_index`` token.
"""
from compression.models.families.base import Family, Geometry


def geometry(config) -> Geometry:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + int(vision.model_type == "clip_vision_model")
    drop_first = getattr(config, "vision_feature_select_strategy", "default") == "default"
    return Geometry(vision.image_size, vision.patch_size, patches, patches - int(drop_first), False,
                    vision.num_hidden_layers, vision.hidden_size,
                    "base tile only: any-res adds the best pinpoint grid's tiles and one newline per row")


FAMILY = Family(
    name="LLaVA-NeXT", model_type="llava_next", model_class="LlavaNextForConditionalGeneration",
    config_class="LlavaNextConfig", processor_class="LlavaNextProcessor", image_processor_class="LlavaNextImageProcessorPil",
    text_types=("llama", "mistral", "qwen2"), vision_types=("clip_vision_model", "siglip_vision_model"),
    geometry=geometry, projectors=("model.multi_modal_projector", "model.image_newline"),
    forward_kwargs=("image_sizes",))
