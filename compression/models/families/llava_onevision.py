"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``; Li et al., "LLaVA-OneVision: Easy Visual Task
Transfer", arXiv 2408.03326; transformers ``models/llava_onevision``): SigLIP + any-res tiling + Qwen2.

Visual tokens vary per image (``anyres_max_9``: base tile, up to 9 grid tiles, one ``image_newline`` per
row). The forward pass takes ``image_sizes`` and ``batch_num_images``. Its stock processor has a video
processor (torchvision): the image-only one of ``families.processors`` is used here.
"""
from compression.models.families.base import Family, Geometry


def geometry(config) -> Geometry:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + int(vision.model_type == "clip_vision_model")
    drop_first = getattr(config, "vision_feature_select_strategy", "full") == "default"
    return Geometry(vision.image_size, vision.patch_size, patches, patches - int(drop_first), False,
                    vision.num_hidden_layers, vision.hidden_size,
                    "base tile only: any-res adds up to 9 grid tiles and one newline per row")


FAMILY = Family(
    name="LLaVA-OneVision", model_type="llava_onevision", model_class="LlavaOnevisionForConditionalGeneration",
    config_class="LlavaOnevisionConfig", processor_class="LlavaOnevisionProcessor",
    image_processor_class="LlavaOnevisionImageProcessorPil", text_types=("qwen2",),
    vision_types=("siglip_vision_model",), geometry=geometry,
    projectors=("model.multi_modal_projector", "model.image_newline"),
    forward_kwargs=("image_sizes", "batch_num_images"), video_processor=True)
