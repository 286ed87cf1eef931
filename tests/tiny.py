"""Tiny random LLaVA models of every supported backbone, for fast offline tests.

``tiny_llava("qwen2", "siglip", num_key_value_heads=2)`` gives a random
``LlavaForConditionalGeneration`` (3 decoder layers, hidden 64, 4 heads x head_dim 16) with a
working processor (the reference model's word-level tokenizer, 32x32 images, patch 16).
"""
from __future__ import annotations

from pathlib import Path

import torch

from compression import models
from compression.models import reference

LANGUAGES = ("llama", "mistral", "qwen2", "phi", "gemma")
VISIONS = ("clip", "siglip")
IMAGE_SIZE = 32
PATCH = 16


def tiny_config(language: str = "llama", vision: str = "clip", num_key_value_heads: int = 2,
                num_attention_heads: int = 4, layers: int = 3, hidden_size: int = 64,
                intermediate_size: int = 96):
    from transformers import CLIPVisionConfig, LlavaConfig, SiglipVisionConfig
    from transformers import AutoConfig

    vocab = reference.vocabulary()
    head_dim = hidden_size // num_attention_heads
    text = dict(model_type=language, vocab_size=len(vocab), hidden_size=hidden_size,
                intermediate_size=intermediate_size, num_hidden_layers=layers,
                num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
                max_position_embeddings=64, bos_token_id=vocab.index("<s>"), eos_token_id=vocab.index("</s>"),
                pad_token_id=vocab.index("<pad>"), tie_word_embeddings=False)
    if language == "phi":
        text.update(partial_rotary_factor=0.5, layer_norm_eps=1e-5)
    if language == "gemma":
        text.update(hidden_activation="gelu_pytorch_tanh")
    text_config = AutoConfig.for_model(**text)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH)
    if vision == "clip":
        vision_config, strategy = CLIPVisionConfig(projection_dim=32, **common), "default"
    else:
        vision_config, strategy = SiglipVisionConfig(vision_use_head=False, **common), "full"
    tokens = (IMAGE_SIZE // PATCH) ** 2
    return LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=vocab.index("<image>"),
                       image_seq_length=tokens, vision_feature_layer=-1, vision_feature_select_strategy=strategy,
                       tie_word_embeddings=False)


def tiny_processor(vision: str = "clip"):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    strategy = "default" if vision == "clip" else "full"
    return LlavaProcessor(image_processor=image_processor, tokenizer=reference.build_tokenizer(), patch_size=PATCH,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=int(vision == "clip"))


def tiny_llava(language: str = "llama", vision: str = "clip", seed: int = 0, **config_kwargs):
    """``(model, processor, anatomy)`` of a random tiny LLaVA, in eval mode, float32."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config(language, vision, **config_kwargs)
    model = LlavaForConditionalGeneration(config).eval()
    return model, tiny_processor(vision), models.anatomy_from_config(config)


def save_tiny(folder: Path, language: str = "llama", vision: str = "clip", **kwargs) -> Path:
    """Write a tiny model folder that ``models.load`` reads like any Hugging Face folder."""
    model, processor, _ = tiny_llava(language, vision, **kwargs)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
