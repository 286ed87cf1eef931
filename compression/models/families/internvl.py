"""InternVL, the native transformers class (``InternVLForConditionalGeneration``; Chen et al., "InternVL",
arXiv 2312.14238; InternVL3, arXiv 2504.10479; transformers ``models/internvl``): InternViT -> pixel
shuffle (``downsample_ratio`` 0.5) -> LayerNorm + 2-layer MLP projector -> a Qwen2 / Qwen3 / Llama decoder.

Visual tokens vary per image: ``image_seq_length`` (256) per 448-px tile, an image being cropped into
1..``max_patches`` tiles (+ a thumbnail); every one is an ``<IMG_CONTEXT>`` (``image_token_id``) token
between ``<img>`` / ``</img>``. No extra forward arguments. A Phi-3 decoder (Mini-InternVL-Chat-4B-V1-5's
shapes) has fused projections: layer pruning only. Its stock processor has a video processor
(torchvision): the image-only one of ``families.processors`` is used here.
"""
from compression.models.families.base import Family, Geometry


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def geometry(config) -> Geometry:
    vision = config.vision_config
    size, patch = _side(vision.image_size), _side(vision.patch_size)
    patches = (size // patch) ** 2 + 1  # InternViT prepends a CLS token
    return Geometry(size, patch, patches, config.image_seq_length, False, vision.num_hidden_layers, vision.hidden_size,
                    "per tile: an image is cropped into 1..max_patches tiles plus a thumbnail")


FAMILY = Family(
    name="InternVL", model_type="internvl", model_class="InternVLForConditionalGeneration",
    config_class="InternVLConfig", processor_class="InternVLProcessor", image_processor_class="GotOcr2ImageProcessorPil",
    text_types=("qwen2", "qwen3", "llama", "phi3"), vision_types=("internvl_vision",), geometry=geometry,
    image_token_field="image_token_id", video_processor=True)
