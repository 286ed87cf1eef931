"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (Wang et al., arXiv 2409.12191; Bai et al., arXiv 2502.13923; Qwen3-VL,
2025; transformers ``models/qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``): a native-resolution ViT whose
``merger`` (2x2 patch merge + MLP) lives *inside* the vision tower (``model.visual.merger``).

Visual tokens vary per image: ``t * h * w / spatial_merge_size^2`` for a grid of ``(t, h, w)`` patches
(``image_grid_thw``), every one an ``<|image_pad|>`` (``image_token_id``) token between
``<|vision_start|>`` / ``<|vision_end|>``. Positions are 3-D (M-RoPE: temporal, height, width), computed by
``model.model.get_rope_index`` from ``mm_token_type_ids`` (1 on visual tokens, which the forward pass
requires with ``image_grid_thw``). Qwen3-VL adds DeepStack: features of inner vision layers, through
``model.visual.deepstack_merger_list``, added to the visual positions' hidden states after decoder layers
``0..k-1``. Qwen3-VL's decoder has per-head ``q_norm`` / ``k_norm``; Qwen2-VL / 2.5-VL's attention derives
``head_dim`` from the head count (``families.text``). Their stock processors have video processors
(torchvision): the image-only ones of ``families.processors`` are used here.
"""
from compression.models.families.base import Family, Geometry

NOMINAL_IMAGE = 448  # the size the token counts are quoted for: the count varies with the image


def geometry(config) -> Geometry:
    vision = config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    patches = (NOMINAL_IMAGE // patch) ** 2
    width = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL: embed_dim; later: hidden_size
    return Geometry(NOMINAL_IMAGE, patch, patches, patches // merge ** 2, False, vision.depth, width,
                    f"for a {NOMINAL_IMAGE}x{NOMINAL_IMAGE} image: (H/{patch})*(W/{patch})/{merge * merge} per image")


# The merger trains with the projector, so teacher and student share only the tower before it (the patch embedding
# and the blocks; the rotary embedding has no weights). Qwen3-VL adds a learned position embedding.
_BEFORE_MERGER = ("model.visual.patch_embed", "model.visual.blocks")

_COMMON = dict(vision_tower="model.visual", image_token_field="image_token_id", geometry=geometry,
               forward_kwargs=("image_grid_thw", "mm_token_type_ids"), positions="mrope", video_processor=True,
               image_processor_class="Qwen2VLImageProcessorPil")

QWEN2_VL = Family(
    name="Qwen2-VL", model_type="qwen2_vl", model_class="Qwen2VLForConditionalGeneration", config_class="Qwen2VLConfig",
    processor_class="Qwen2VLProcessor", text_types=("qwen2_vl_text",), vision_types=("qwen2_vl_vision",),
    projectors=("model.visual.merger",), frozen_vision=_BEFORE_MERGER, **_COMMON)

QWEN2_5_VL = Family(
    name="Qwen2.5-VL", model_type="qwen2_5_vl", model_class="Qwen2_5_VLForConditionalGeneration",
    config_class="Qwen2_5_VLConfig", processor_class="Qwen2_5_VLProcessor", text_types=("qwen2_5_vl_text",),
    vision_types=("qwen2_5_vl_vision",), projectors=("model.visual.merger",), frozen_vision=_BEFORE_MERGER,
    **_COMMON)

QWEN3_VL = Family(
    name="Qwen3-VL", model_type="qwen3_vl", model_class="Qwen3VLForConditionalGeneration", config_class="Qwen3VLConfig",
    processor_class="Qwen3VLProcessor", text_types=("qwen3_vl_text",), vision_types=("qwen3_vl_vision",),
    projectors=("model.visual.merger", "model.visual.deepstack_merger_list"), deepstack=True,
    frozen_vision=("model.visual.patch_embed", "model.visual.pos_embed", "model.visual.blocks"), **_COMMON)
