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


# ------------------------------------------------------------------------------------------ llava-1.5 geometry
# A llava-hf-style folder with LLaVA-1.5's vision geometry (CLIP at 336 px, patch 14: 577 patches, CLS
# dropped -> 576 visual tokens; vision_feature_layer -2), a byte-level BPE tokenizer and the llava-hf
# chat template, but tiny widths. What a user's `llava-hf/llava-1.5-7b-hf` finetune looks like, minus size.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
WORDS = ("what colour is the square the circle how many objects are in picture is there a cat dog red blue green "
         "yellow one two three four yes no describe image scene left right top bottom it shows of and with "
         "USER ASSISTANT answer question").split()


def byte_level_tokenizer(extra_text: str = "", vocab_size: int = 400):
    """A byte-level BPE tokenizer (GPT-2 style, as Llama-3 / Qwen use) trained on a few sentences, with
    LLaVA's special tokens; a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(WORDS), extra_text, "USER: <image>\nWhat is it? ASSISTANT: a cat"]
    tok.train_from_iterator(corpus * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=2048, padding_side="left")


def save_llava15(folder: Path, layers: int = 2, seed: int = 0, chat_template: str | None = LLAVA_HF_CHAT_TEMPLATE,
                 max_position_embeddings: int = 1024, extra_text: str = "") -> Path:
    """Write a random llava-1.5-geometry folder (see above) that ``models.load`` and plain transformers read."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = byte_level_tokenizer(extra_text)
    vocab = len(tokenizer)
    text = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                       max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(
        "<image>"), image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                         image_mean=[0.48145466, 0.4578275, 0.40821073],
                                         image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_llava_dataset(folder: Path, n: int = 12, seed: int = 0, multi_turn: bool = True, text_only: int = 0,
                        image_dir: str = "images", name: str = "data.json", jsonl: bool = False) -> Path:
    """LLaVA conversation records (``llava_v1_5_mix665k.json`` format) with PNG images under ``folder/image_dir``:
    every third record multi-turn, ``<image>`` at the start or the end of the first human turn, and
    ``text_only`` records without an image at the end. Returns the JSON (or JSONL) path."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 40, 40), "blue": (40, 80, 230), "green": (40, 170, 60)}
    records = []
    for i in range(n):
        colour = list(colours)[int(rng.integers(3))]
        pixels = np.full((48, 64, 3), 128, np.uint8)
        pixels[8:40, 16:48] = colours[colour]
        rel = f"{image_dir}/img-{i}.png"
        Image.fromarray(pixels).save(folder / rel)
        question = "what colour is the square?"
        first = f"<image>\n{question}" if i % 2 == 0 else f"{question}\n<image>"
        conversations = [{"from": "human", "value": first}, {"from": "gpt", "value": colour}]
        if multi_turn and i % 3 == 0:
            conversations += [{"from": "human", "value": "is there a cat?"}, {"from": "gpt", "value": "no"}]
        records.append({"id": f"rec-{i}", "image": rel, "conversations": conversations})
    for j in range(text_only):
        records.append({"id": f"text-{j}", "conversations": [
            {"from": "human", "value": "describe a red square"}, {"from": "gpt", "value": "it is red"}]})
    path = folder / name
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def tiny_loaded(language: str = "llama", vision: str = "clip", seed: int = 0, **config_kwargs):
    """``tiny_llava`` as the ``LoadedModel`` every library function takes (in memory, no folder)."""
    model, processor, anatomy = tiny_llava(language, vision, seed, **config_kwargs)
    return models.LoadedModel(model, processor, anatomy, f"tiny-{language}-{vision}-{seed}", "local", None, True,
                              f"tiny-{language}-{vision}-{seed}-{config_kwargs}")


def shapes_records(split: str = "test", n: int = 8) -> list:
    """The first ``n`` ShapesVQA records of a split, through the one data path."""
    from compression.data.sources import open_source, select

    return select(open_source({"path": "shapes", "split": split}), samples=n).records


def encode(processor, images, questions):
    """Generation inputs for one question per image, in the processor's prompt format (the library's path)."""
    from compression.models.prompting import prompt_format, question_inputs

    return question_inputs(prompt_format(processor), list(images), list(questions))


def generate_answers(model, processor, images, questions, max_new_tokens: int = 16, generate_fn=None):
    """Greedy answers through ``compression.measure.evaluate.generate`` for a bare model and processor."""
    from compression.measure import evaluate
    from compression.models.prompting import prompt_format

    return evaluate.generate(model, prompt_format(processor, model.config), encode(processor, images, questions),
                             max_new_tokens, generate_fn)
