"""Mistral 3 (``Mistral3ForConditionalGeneration``; Mistral Small 3.1, 2025; transformers ``models/mistral3``):
Pixtral vision encoder -> RMSNorm + patch merger + 2-layer MLP projector -> Mistral decoder.

Visual tokens vary with the image's size: ``(H / patch / merge) * (W / patch / merge)`` ``[IMG]`` tokens
(``image_token_index``), each row closed by ``[IMG_BREAK]`` and the last by ``[IMG_END]`` (those get no
features). The forward pass takes ``image_sizes``. The decoder's ``head_dim`` is explicit (128 with hidden
5120 and 32 heads). ``PixtralProcessor`` imports torchvision; ``families.processors`` aliases the PIL
image processor in its place.
"""
from compression.models.families.base import Family, Geometry


def geometry(config) -> Geometry:
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    merged = side // config.spatial_merge_size
    return Geometry(vision.image_size, vision.patch_size, side * side, merged * merged, False,
                    vision.num_hidden_layers, vision.hidden_size,
                    f"for a {vision.image_size}-px square image, the largest: (H/{vision.patch_size * config.spatial_merge_size})"
                    f"*(W/{vision.patch_size * config.spatial_merge_size}), plus one [IMG_BREAK] per row")


FAMILY = Family(
    name="Mistral 3", model_type="mistral3", model_class="Mistral3ForConditionalGeneration",
    config_class="Mistral3Config", processor_class="PixtralProcessor", image_processor_class="PixtralImageProcessorPil",
    text_types=("mistral", "llama"), vision_types=("pixtral",), geometry=geometry, forward_kwargs=("image_sizes",))
