"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``;
Laurençon et al., "Building and better understanding vision-language models", arXiv 2408.12637; Marafioti
et al., "SmolVLM", arXiv 2504.05299; transformers ``models/idefics3``, ``models/smolvlm``).

Different names from LLaVA: the language model is ``model.text_model``, the tower ``model.vision_model``,
the projector ``model.connector`` (pixel shuffle by ``scale_factor``, then one linear). Visual tokens
vary: ``(image_size / patch_size)^2 / scale_factor^2`` per tile, and an image is split into a grid of tiles
plus a global one; every visual token is an ``<image>`` (``image_token_id``) token, between
``<fake_token_around_image>`` / ``<row_i_col_j>`` / ``<global-img>`` markers. The forward pass takes
``pixel_attention_mask``. SmolVLM's stock processor has a video processor (torchvision): the image-only one
of ``families.processors`` is used here, with a stand-in for the video frame count it reads.
"""
from types import SimpleNamespace

from compression.models.families.base import Family, Geometry


def geometry(config) -> Geometry:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return Geometry(vision.image_size, vision.patch_size, patches, patches // config.scale_factor ** 2, False,
                    vision.num_hidden_layers, vision.hidden_size,
                    "per tile: image splitting gives a grid of tiles plus a global one")


_COMMON = dict(language_model="model.text_model", vision_tower="model.vision_model", projectors=("model.connector",),
               image_token_field="image_token_id", geometry=geometry, forward_kwargs=("pixel_attention_mask",))

IDEFICS3 = Family(
    name="Idefics3", model_type="idefics3", model_class="Idefics3ForConditionalGeneration",
    config_class="Idefics3Config", processor_class="Idefics3Processor", image_processor_class="Idefics3ImageProcessorPil",
    text_types=("llama",), vision_types=("idefics3_vision",), **_COMMON)

SMOLVLM = Family(
    name="SmolVLM", model_type="smolvlm", model_class="SmolVLMForConditionalGeneration", config_class="SmolVLMConfig",
    processor_class="SmolVLMProcessor", image_processor_class="SmolVLMImageProcessorPil", text_types=("llama",),
    vision_types=("smolvlm_vision",), video_processor=True,
    # SmolVLMProcessor.apply_chat_template reads video_processor.num_frames / .fps even for images
    processor_defaults={"video_processor": SimpleNamespace(num_frames=None, fps=None)}, **_COMMON)
