"""Gemma 3 (``Gemma3ForConditionalGeneration``; Gemma Team, "Gemma 3 Technical Report", arXiv 2503.19786;
transformers ``models/gemma3``): SigLIP tower -> avg-pool + RMSNorm + linear projector -> Gemma 3 decoder.

Visual tokens are fixed: ``mm_tokens_per_image`` (256) per image (pan-and-scan, off by default, adds that
many per crop). The chat template writes ``<start_of_image>``; the processor expands it to
``<start_of_image>`` + ``mm_tokens_per_image`` x ``<image_soft_token>`` + ``<end_of_image>``, and returns
``token_type_ids`` (1 on the soft tokens), with which the model attends bidirectionally inside an image.
The decoder has per-head ``q_norm`` / ``k_norm`` (weight ``head_dim``), an explicit ``head_dim`` (256 in
the released models), 5 sliding-window layers to 1 global (``layer_types``) and ties ``lm_head`` to the
embeddings.
"""
from compression.models.families.base import Family, Geometry


def geometry(config) -> Geometry:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return Geometry(vision.image_size, vision.patch_size, patches, config.mm_tokens_per_image, True,
                    vision.num_hidden_layers, vision.hidden_size,
                    "per image; pan-and-scan crops (off by default) add as many each")


FAMILY = Family(
    name="Gemma 3", model_type="gemma3", model_class="Gemma3ForConditionalGeneration", config_class="Gemma3Config",
    processor_class="Gemma3Processor", image_processor_class="Gemma3ImageProcessorPil",
    text_types=("gemma3_text",), vision_types=("siglip_vision_model",), geometry=geometry,
    forward_kwargs=("token_type_ids",), token_types="image")
