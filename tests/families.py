"""Tiny random models of every supported family, saved as Hugging Face folders, for fast offline tests.

``BUILDERS[name](folder)`` writes a folder that ``compression.models.load`` and plain transformers read:
the family's real structure (vision tower type, projector or merger, per-head norms, explicit head_dim,
layer_types, visual-token placement, extra forward inputs), a byte-level BPE tokenizer with the family's
special tokens, and its chat template (from the released checkpoints as reproduced in
/work/notes/families-research.md §4; Qwen3-VL, LLaVA-NeXT and Mistral 3 abridged there), at tiny
widths: 3 decoder layers, hidden 64, 4 heads x head_dim 16 with 2 KV heads, MLP 128; a 2-layer, 32-wide
vision tower; 32-64 px images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from compression.models import families
from compression.models.families.processors import build_processor, save_processor
from tests.tiny import LLAVA_HF_CHAT_TEMPLATE, WORDS

LAYERS = 3
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CORPUS = " ".join(WORDS) + " what colour is the square? red blue green is there a cat? no yes"


def family_tokenizer(specials: list[str], bos: str | None, eos: str, pad: str, unk: str | None = "<unk>",
                     extra: dict[str, str] | None = None, adds_bos: bool = True):
    """A byte-level BPE (GPT-2 style) trained on a few sentences, with the family's special tokens; it
    prepends ``bos`` when the family's real tokenizer does (``adds_bos``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = list(dict.fromkeys([t for t in (unk, bos, eos, pad) if t] + specials))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=names, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS, " ".join(specials)] * 20, trainer)
    if bos and adds_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {k: v for k, v in dict(bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk).items() if v}
    return PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=extra or {}, model_max_length=4096,
                                   padding_side="left", **kwargs)


def _ids(tok, **names: str) -> dict[str, int]:
    return {k: tok.convert_tokens_to_ids(v) for k, v in names.items()}


def _save(folder: Path, family_type: str, config, processor, seed: int) -> Path:
    family = families.family_for(family_type)
    torch.manual_seed(seed)
    model = family.transformers_class("model")(config).eval()
    model.save_pretrained(folder)
    save_processor(processor, folder)
    return folder


def _text(tok, model_type: str, bos: str | None, eos: str, pad: str, **extra) -> dict:
    ids = {"bos_token_id": tok.convert_tokens_to_ids(bos) if bos else None, "eos_token_id": tok.convert_tokens_to_ids(eos),
           "pad_token_id": tok.convert_tokens_to_ids(pad)}
    return dict(model_type=model_type, vocab_size=len(tok), **TEXT, **ids, **extra)


# ------------------------------------------------------------------------------------------ LLaVA family

def save_llava(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessorPil, LlavaConfig

    tok = family_tokenizer(["<image>"], "<s>", "</s>", "<pad>", extra={"image_token": "<image>"})
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = build_processor(families.family_for("llava"), ip, tok, LLAVA_HF_CHAT_TEMPLATE, patch_size=8,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, **VISION),
        text_config=_text(tok, "llama", "<s>", "</s>", "<pad>"), image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=False)
    return _save(folder, "llava", config, processor, seed)


# llava-hf/llava-v1.6-mistral-7b-hf style ([INST] format), reconstructed (research §3.2)
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] "
    "+ '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% endif %}{% endfor %}")


def save_llava_next(folder: Path, seed: int = 0) -> Path:
    from transformers import LlavaNextConfig, LlavaNextImageProcessorPil

    pinpoints = [[32, 64], [64, 32], [64, 64]]
    tok = family_tokenizer(["<image>"], "<s>", "</s>", "<pad>", extra={"image_token": "<image>"})
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints)
    processor = build_processor(families.family_for("llava_next"), ip, tok, LLAVA_NEXT_TEMPLATE, patch_size=8,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=32, patch_size=8, **VISION),
        text_config=_text(tok, "mistral", "<s>", "</s>", "<pad>"), image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=False)
    return _save(folder, "llava_next", config, processor, seed)


# llava-hf/llava-onevision-qwen2-*-ov-hf (transformers' convert_llava_onevision_weights_to_hf.py)
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def save_llava_onevision(folder: Path, seed: int = 0) -> Path:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessorPil

    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    tok = family_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"], None, "<|im_end|>", "<|endoftext|>",
                           unk=None, extra={"image_token": "<image>", "video_token": "<video>"})
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = build_processor(families.family_for("llava_onevision"), ip, tok, ONEVISION_TEMPLATE, num_image_tokens=16,
                                vision_feature_select_strategy="full")
    ids = _ids(tok, image="<image>", video="<video>")
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8, **VISION),
        text_config=_text(tok, "qwen2", None, "<|im_end|>", "<|endoftext|>"), image_token_index=ids["image"],
        video_token_index=ids["video"], image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)
    return _save(folder, "llava_onevision", config, processor, seed)


# ------------------------------------------------------------------------------------------ Gemma

# google/gemma-3-*-it (transformers tests/models/gemma3/test_processing_gemma3.py)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- set first_user_prefix = messages[0]['content'][0]"
    "['text'] + '\n\n' -%}\n    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = "
    "\"\" -%}\n    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if "
    "(message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles must "
    "alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == 'assistant') "
    "-%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = message['role'] -%}\n    "
    "{%- endif -%}\n    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n    {%- if "
    "message['content'] is string -%}\n        {{ message['content'] | trim }}\n    {%- elif message['content'] is "
    "iterable -%}\n        {%- for item in message['content'] -%}\n            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n            {%- elif item['type'] == 'text' -%}\n                "
    "{{ item['text'] | trim }}\n            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n        "
    "{{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")


def save_gemma3(folder: Path, seed: int = 0) -> Path:
    from transformers import Gemma3Config, Gemma3ImageProcessorPil

    tok = family_tokenizer(["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                            "<image_soft_token>"], "<bos>", "<eos>", "<pad>",
                           extra={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                  "eoi_token": "<end_of_image>"})
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = build_processor(families.family_for("gemma3"), ip, tok, GEMMA3_TEMPLATE, image_seq_length=4)
    ids = _ids(tok, image="<image_soft_token>", boi="<start_of_image>", eoi="<end_of_image>")
    text = _text(tok, "gemma3_text", "<bos>", "<end_of_turn>", "<pad>", query_pre_attn_scalar=16, sliding_window=8,
                 layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    text["tie_word_embeddings"] = True  # as released
    config = Gemma3Config(
        text_config=text, vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8,
                                             vision_use_head=False, **VISION),
        mm_tokens_per_image=4, image_token_index=ids["image"], boi_token_index=ids["boi"], eoi_token_index=ids["eoi"])
    return _save(folder, "gemma3", config, processor, seed)


def save_paligemma(folder: Path, seed: int = 0) -> Path:
    from transformers import PaliGemmaConfig, SiglipImageProcessorPil

    tok = family_tokenizer(["<image>"], "<bos>", "<eos>", "<pad>", extra={"image_token": "<image>"})
    ip = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    ip.image_seq_length = 16  # PaliGemmaProcessor reads it from the image processor
    processor = build_processor(families.family_for("paligemma"), ip, tok)  # no chat template: PaliGemma has none
    text = _text(tok, "gemma", "<bos>", "<eos>", "<pad>")  # after the processor added <loc....>/<seg...>: len(tok)
    config = PaliGemmaConfig(
        text_config=text, vision_config=dict(model_type="siglip_vision_model", image_size=32, patch_size=8,
                                             projection_dim=64, vision_use_head=False, **VISION),
        image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=64)
    return _save(folder, "paligemma", config, processor, seed)


# ------------------------------------------------------------------------------------------ Idefics3 / SmolVLM

# HuggingFaceM4/Idefics3-8B-Llama3; SmolVLM-Instruct differs only in its first token (transformers tests)
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SMOLVLM_TEMPLATE = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>", 1)
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]


def _save_idefics(folder: Path, family_type: str, seed: int) -> Path:
    import transformers

    bos = "<|begin_of_text|>" if family_type == "idefics3" else "<|im_start|>"
    tok = family_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + ROW_COL,
                           bos, "<end_of_utterance>", "<pad>", extra={"image_token": "<image>"})
    family = families.family_for(family_type)
    ip = getattr(transformers, family.image_processor_class)(size={"longest_edge": 64},
                                                             max_image_size={"longest_edge": 32}, do_image_splitting=True)
    template = IDEFICS3_TEMPLATE if family_type == "idefics3" else SMOLVLM_TEMPLATE
    processor = build_processor(family, ip, tok, template, image_seq_len=4)
    config = family.transformers_class("config")(
        vision_config=dict(image_size=32, patch_size=8, **VISION), text_config=_text(tok, "llama", bos, "<end_of_utterance>",
                                                                                     "<pad>"),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, tie_word_embeddings=False)
    return _save(folder, family_type, config, processor, seed)


def save_idefics3(folder: Path, seed: int = 0) -> Path:
    return _save_idefics(folder, "idefics3", seed)


def save_smolvlm(folder: Path, seed: int = 0) -> Path:
    return _save_idefics(folder, "smolvlm", seed)


# ------------------------------------------------------------------------------------------ Qwen-VL

# Qwen/Qwen2-VL-7B-Instruct (Qwen2.5-VL ships the same), reproduced from the public template (research §3.4)
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
# Qwen/Qwen3-VL-*-Instruct, abridged (tool and thinking branches removed; no default system prompt; research §3.6)
QWEN3_VL_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if message.role == 'user' %}{{- '<|im_start|>' + message.role + "
    "'\n' }}{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>{%- elif 'text' "
    "in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- elif message.role "
    "== 'assistant' %}{{- '<|im_start|>assistant\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}{%- endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]


def _save_qwen(folder: Path, family_type: str, seed: int) -> Path:
    from transformers import Qwen2VLImageProcessorPil

    tok = family_tokenizer(QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>", unk=None,
                           extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                  "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    patch = 16 if family_type == "qwen3_vl" else 14
    pixels = (4 * patch) ** 2  # at most a 4x4 patch grid: 4 visual tokens after the 2x2 merge
    ip = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch, merge_size=2)
    family = families.family_for(family_type)
    template = QWEN3_VL_TEMPLATE if family_type == "qwen3_vl" else QWEN2_VL_TEMPLATE
    processor = build_processor(family, ip, tok, template)
    ids = _ids(tok, image="<|image_pad|>", video="<|video_pad|>", start="<|vision_start|>", end="<|vision_end|>")
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    if family_type == "qwen3_vl":
        rope["mrope_interleaved"] = True
    text = _text(tok, f"{family_type}_text", None, "<|im_end|>", "<|endoftext|>", rope_parameters=rope)
    vision = {"qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
              "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                 window_size=56, fullatt_block_indexes=[1]),
              "qwen3_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               num_position_embeddings=16, deepstack_visual_indexes=[0])}[family_type]
    config = family.transformers_class("config")(
        text_config=text, vision_config=dict(patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, **vision),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"], tie_word_embeddings=False)
    return _save(folder, family_type, config, processor, seed)


def save_qwen2_vl(folder: Path, seed: int = 0) -> Path:
    return _save_qwen(folder, "qwen2_vl", seed)


def save_qwen2_5_vl(folder: Path, seed: int = 0) -> Path:
    return _save_qwen(folder, "qwen2_5_vl", seed)


def save_qwen3_vl(folder: Path, seed: int = 0) -> Path:
    return _save_qwen(folder, "qwen3_vl", seed)


# ------------------------------------------------------------------------------------------ InternVL, Mistral 3

# OpenGVLab/InternVL3-*-hf (transformers' convert_internvl_weights_to_hf.py)
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}{% endif %}")


def save_internvl(folder: Path, seed: int = 0) -> Path:
    from transformers import GotOcr2ImageProcessorPil

    tok = family_tokenizer(["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"], None,
                           "<|im_end|>", "<|endoftext|>", unk=None,
                           extra={"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                                  "end_image_token": "</img>", "video_token": "<video>"})
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4)
    family = families.family_for("internvl")
    processor = build_processor(family, ip, tok, INTERNVL_TEMPLATE, image_seq_length=4)
    config = family.transformers_class("config")(
        vision_config=dict(image_size=[32, 32], patch_size=[8, 8], **VISION),
        text_config=_text(tok, "qwen2", None, "<|im_end|>", "<|endoftext|>"),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    return _save(folder, "internvl", config, processor, seed)


# mistralai/Mistral-Small-3.1-24B-Instruct-2503, abridged (default system prompt shortened, date logic removed)
MISTRAL3_TEMPLATE = (
    "{%- set default_system_message = 'You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI.' %}"
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- if messages[0]['content'] is string %}{%- set "
    "system_message = messages[0]['content'] %}{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}"
    "{%- endif %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set system_message = default_system_message %}"
    "{%- set loop_messages = messages %}{%- endif %}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{%- if message['content'] is string %}"
    "{{- '[INST]' + message['content'] + '[/INST]' }}{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}{%- elif block['type'] in ['image', 'image_url'] %}"
    "{{- '[IMG]' }}{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}"
    "{%- endif %}{%- endfor %}{{- '[/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}{%- if "
    "message['content'] is string %}{{- message['content'] + eos_token }}{%- else %}{{- message['content'][0]['text'] "
    "+ eos_token }}{%- endif %}{%- endif %}{%- endfor %}")


def save_mistral3(folder: Path, seed: int = 0) -> Path:
    from transformers import PixtralImageProcessorPil

    tok = family_tokenizer(["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]",
                            "[IMG_END]"], "<s>", "</s>", "<pad>")
    ip = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size={"height": 8, "width": 8})
    family = families.family_for("mistral3")
    processor = build_processor(family, ip, tok, MISTRAL3_TEMPLATE, patch_size=8, spatial_merge_size=2)
    config = family.transformers_class("config")(
        vision_config=dict(model_type="pixtral", head_dim=16, image_size=32, patch_size=8, **VISION),
        text_config=_text(tok, "mistral", "<s>", "</s>", "<pad>"), image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)
    return _save(folder, "mistral3", config, processor, seed)


BUILDERS: dict[str, Callable[..., Path]] = {
    "llava": save_llava, "llava_next": save_llava_next, "llava_onevision": save_llava_onevision,
    "gemma3": save_gemma3, "paligemma": save_paligemma, "idefics3": save_idefics3, "smolvlm": save_smolvlm,
    "qwen2_vl": save_qwen2_vl, "qwen2_5_vl": save_qwen2_5_vl, "qwen3_vl": save_qwen3_vl, "internvl": save_internvl,
    "mistral3": save_mistral3,
}
