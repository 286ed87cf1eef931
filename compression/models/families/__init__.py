"""One description per vision-language model family, registered by ``model_type``.

Every module outside this package asks the description (through the ``Anatomy`` it builds, or
``family_for``) where a model's parts are and how its visual tokens are placed; none asks which
architecture it has. A family module is small: a ``Family`` (``base.py``) and the one or two functions
its fields cannot express. Language models are described once, in ``text.py``; processors are built,
loaded and saved in one place, ``processors.py``.

Supported: LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, PaliGemma,
InternVL (native class), Idefics3, SmolVLM, Mistral 3. Anything else gets one line: "unsupported
architecture X; supported: ...".
"""
from __future__ import annotations

from typing import Any

from compression.models.anatomy import Anatomy, ModelLoadError
from compression.models.families import (gemma3, idefics3, internvl, llava, llava_next, llava_onevision, mistral3,
                                         paligemma, processors, qwen_vl)  # noqa: F401 - processors: families.processors
from compression.models.families.base import Family, Geometry, TextStack, build_anatomy
from compression.models.families.text import TEXT_STACKS, text_stack

FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


for _family in (llava.FAMILY, llava_next.FAMILY, llava_onevision.FAMILY, qwen_vl.QWEN2_VL, qwen_vl.QWEN2_5_VL,
                qwen_vl.QWEN3_VL, gemma3.FAMILY, paligemma.FAMILY, internvl.FAMILY, idefics3.IDEFICS3, idefics3.SMOLVLM,
                mistral3.FAMILY):
    register(_family)


def supported() -> str:
    """``LLaVA (llava), ...``: the families, for messages."""
    seen = {id(f): f for f in FAMILIES.values()}
    return ", ".join(f"{f.name} ({f.model_type!r})" for f in seen.values())


def family_for(config_or_model_type: Any) -> Family:
    """The family of a config (or a ``model_type`` string); ModelLoadError in one line when unsupported."""
    model_type = (config_or_model_type if isinstance(config_or_model_type, str)
                  else getattr(config_or_model_type, "model_type", None))
    if model_type not in FAMILIES:
        raise ModelLoadError(f"unsupported architecture {model_type!r}; supported: {supported()}")
    return FAMILIES[model_type]


def anatomy_from_config(config) -> Anatomy:
    """The anatomy of a supported model's config, as its family describes it."""
    family = family_for(config)
    stack = text_stack(config.text_config.model_type, family.name, family.text_types)
    return build_anatomy(family, config, stack)


__all__ = ["FAMILIES", "Family", "Geometry", "TextStack", "TEXT_STACKS", "anatomy_from_config", "family_for",
           "register", "supported"]
