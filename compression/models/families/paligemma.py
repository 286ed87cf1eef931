"""PaliGemma (``PaliGemmaForConditionalGeneration``; Beyer et al., "PaliGemma: A versatile 3B VLM for transfer",
arXiv 2407.07726; transformers ``models/paligemma``): SigLIP tower -> one linear -> Gemma / Gemma 2 decoder.

Visual tokens are fixed: one per patch, ``(image_size / patch_size)^2`` (256 at 224 px). PaliGemma is a
prefix-LM, not a chat model: the processor prepends the image tokens and ``<bos>`` to the prompt and
appends ``"\\n"``; ``token_type_ids`` is 0 on that prefix (attended bidirectionally) and 1 on the answer
(causal). It ships no chat template; ``compression.models.prompting`` renders its prompt format.
"""
from compression.models.families.base import Family, Geometry


def geometry(config) -> Geometry:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return Geometry(vision.image_size, vision.patch_size, patches, patches, True, vision.num_hidden_layers,
                    vision.hidden_size)


FAMILY = Family(
    name="PaliGemma", model_type="paligemma", model_class="PaliGemmaForConditionalGeneration",
    config_class="PaliGemmaConfig", processor_class="PaliGemmaProcessor", image_processor_class="SiglipImageProcessorPil",
    text_types=("gemma", "gemma2"), vision_types=("siglip_vision_model",), geometry=geometry,
    forward_kwargs=("token_type_ids",), token_types="prefix")
