"""Prompts from the model: chat messages -> the model's own text format -> processor inputs.

Every step that feeds the model text (calibration, recovery, evaluation, ``ask``, token maps, the export
check) builds it here. When the processor (or its tokenizer) has a chat template, the text is
``processor.apply_chat_template(messages, tokenize=False, ...)``; otherwise the LLaVA-1.5 conversation
format (``USER: <image>\\n... ASSISTANT: ...</s>``, the ``llava_v1`` template of the LLaVA repository
without its system prompt, written as a Jinja template, ``llava15_template``) is the fallback, and
:attr:`PromptFormat.name` says which one was used.

Training labels cover every assistant turn of a conversation, whatever the template: assistant turn ``k``
is the text of ``render(messages[:k + 1])`` beyond ``render(messages[:k], add_generation_prompt=True)`` (the
reply and the template's end-of-turn tokens); the tokens inside those characters (tokenizer offsets) are
supervised, mapped onto the processor's ids, where each image placeholder is expanded to the model's
visual tokens (``_assistant_token_spans``).

User text is checked before it reaches the model: a literal image token typed in the text, and inputs
longer than the model's context (``max_position_embeddings``), each get one line naming the record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from compression.data.records import DataError, Record, image_count

FALLBACK = "LLaVA-1.5 prompt (the model has no chat template)"
# The fallback as a chat template (Jinja), so that one mechanism renders every model and an export of a model
# without a template can ship this one (then any tool, lmms-eval's llava_hf among them, prompts it the same
# way): ``USER: <image>\nq ASSISTANT: a</s>USER: q2 ASSISTANT:``, the llava_v1 format of the LLaVA repository
# without its system sentence; a system message's text comes first.
_LLAVA15_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}"
    "{%- if ns.text and not ns.text.endswith('\n') -%}{%- set ns.text = ns.text + '\n' -%}{%- endif -%}"
    "{%- set ns.text = ns.text + 'IMAGE_TOKEN\n' -%}"
    "{%- else -%}"
    "{%- if ns.text and not ns.text.endswith('\n') -%}{%- set ns.text = ns.text + ' ' -%}{%- endif -%}"
    "{%- set ns.text = ns.text + (part['text'] | trim) -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set text = ns.text | trim -%}"
    "{%- if message['role'] == 'system' -%}{{ text + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + text + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + text + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")


def llava15_template(image_token: str = "<image>") -> str:
    """The LLaVA-1.5 fallback as a Jinja chat template for a processor whose image token is ``image_token``."""
    return _LLAVA15_TEMPLATE.replace("IMAGE_TOKEN", image_token)
PREFIX_LM = "PaliGemma prefix prompt (image, question, newline; the answer as the suffix)"


@dataclass
class PromptFormat:
    """How one model's processor turns chat messages into text: its own chat template, or the fallback."""

    processor: Any
    uses_chat_template: bool
    image_token: str
    max_length: int | None  # the model's context, in tokens (None: unknown)
    template: str = ""      # the Jinja template that renders (the model's, or llava15_template)
    # a prefix-LM without a chat template (PaliGemma): the processor puts the image tokens and <bos> before
    # the prompt and "\n" after it, and the answer goes in as its ``suffix`` (token_type_ids 1: causal)
    prefix_lm: bool = False

    @property
    def name(self) -> str:
        if self.uses_chat_template:
            return "the model's chat template"
        return PREFIX_LM if self.prefix_lm else FALLBACK

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        if self.prefix_lm and not self.uses_chat_template:
            return _prefix_prompt(list(messages), self.image_token, add_generation_prompt,
                                  self.processor.tokenizer.eos_token or "")
        return self.processor.apply_chat_template(list(messages), chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def chat_template_of(processor) -> str | None:
    """The processor's own chat template (or its tokenizer's), None when it has none."""
    return getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                "chat_template", None)


def prompt_format(processor, config=None) -> PromptFormat:
    """The model's prompt format, from its processor (and config, for the context length)."""
    own = chat_template_of(processor)
    token = getattr(processor, "image_token", None) or "<image>"
    limit, prefix_lm = None, False
    if config is not None:
        from compression.models import families

        text = getattr(config, "text_config", config)
        limit = getattr(text, "max_position_embeddings", None)
        if getattr(config, "model_type", None) in families.FAMILIES:
            prefix_lm = families.family_for(config).token_types == "prefix"
    return PromptFormat(processor, bool(own), token, limit, own if isinstance(own, str) else llava15_template(token),
                        prefix_lm and not own)


def _prefix_prompt(messages: list[dict], image_token: str, add_generation_prompt: bool, eos: str) -> str:
    """PaliGemma's format: ``<image>`` per image, then the turns' text joined by newlines; a final assistant
    turn (a whole conversation, not a generation prompt) follows as ``"\n" + answer + eos``."""
    images = sum(1 for m in messages if not isinstance(m["content"], str) for p in m["content"] if p.get("type") == "image")
    texts = []
    for m in messages:
        parts = m["content"] if not isinstance(m["content"], str) else [{"type": "text", "text": m["content"]}]
        texts.append(" ".join(p["text"].strip() for p in parts if p.get("type") == "text"))
    last = messages[-1]["role"] == "assistant" and not add_generation_prompt
    prompt = image_token * images + "\n".join(texts[:-1] if last else texts)
    return prompt + ("\n" + texts[-1] + eos if last else "")


# ----------------------------------------------------------------------------------------------- checks

def check_text(fmt: PromptFormat, text: str, what: str = "the question") -> None:
    """A literal image token typed in user text would be expanded to visual tokens: refuse it."""
    if fmt.image_token and fmt.image_token in text:
        raise DataError(f"{what} contains the image token {fmt.image_token!r}; expected plain text (the image is "
                        "placed by the prompt)")


def _check_records(fmt: PromptFormat, records: Sequence[Record]) -> None:
    for r in records:
        for m in r.messages:
            parts = m["content"] if not isinstance(m["content"], str) else [{"type": "text", "text": m["content"]}]
            for p in parts:
                if p.get("type") == "text":
                    check_text(fmt, p["text"], f"record {r.index} ({r.id})")


def _check_length(fmt: PromptFormat, records: Sequence[Record], lengths: Sequence[int]) -> None:
    if fmt.max_length is None:
        return
    for r, n in zip(records, lengths):
        if n > fmt.max_length:
            raise DataError(f"record {r.index} ({r.id}) is {n} tokens with its image(s); the model accepts at most "
                            f"{fmt.max_length} (max_position_embeddings): shorten the text")


# ----------------------------------------------------------------------------------------------- encoding

def _images_in(messages: Sequence[dict], record: Record) -> list[Image.Image]:
    return record.images[:image_count(list(messages))]


def _adds_bos(tok, texts: list[str]) -> bool:
    """Whether to let the tokenizer add its special tokens: not when the rendered texts already start with
    ``bos`` (templates that write it themselves, e.g. Gemma 3's, Idefics3's), which would double it."""
    bos = getattr(tok, "bos_token", None)
    return not (bos and texts and all(t.startswith(bos) for t in texts))


def _call(processor, texts: list[str], images: list[list[Image.Image]], padding_side: str,
          suffix: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The processor on a batch: ``images`` holds each text's images (processors such as Gemma 3's and
    Idefics3's need them nested per text)."""
    tok = processor.tokenizer
    previous = tok.padding_side
    tok.padding_side = padding_side
    try:
        kwargs = {"images": images} if any(images) else {}
        if suffix is not None:
            kwargs["suffix"] = suffix
        return processor(text=texts, return_tensors="pt", padding=True, add_special_tokens=_adds_bos(tok, texts),
                         **kwargs)
    finally:
        tok.padding_side = previous


def _token_count(processor, text: str, images: list[Image.Image]) -> int:
    return int(_call(processor, [text], [images], "right")["input_ids"].shape[1])


def generation_inputs(fmt: PromptFormat, batch: Sequence[tuple[list[dict], list[Image.Image]]]):
    """Left-padded processor inputs for generation from ``(messages, images)`` pairs (the prompt only)."""
    texts = [fmt.render(messages, add_generation_prompt=True) for messages, _ in batch]
    images = [list(ims) for _, ims in batch]
    inputs = _call(fmt.processor, texts, images, "left")
    if fmt.max_length is not None and inputs["input_ids"].shape[1] > fmt.max_length:
        lengths = inputs["attention_mask"].sum(1).tolist()
        worst = max(range(len(lengths)), key=lambda i: lengths[i])
        raise DataError(f"a prompt is {lengths[worst]} tokens with its image(s) (batch item {worst}); the model "
                        f"accepts at most {fmt.max_length} (max_position_embeddings): shorten the question")
    return inputs


def question_inputs(fmt: PromptFormat, images: list[Image.Image], questions: list[str]):
    """Generation inputs for one question per image (``ask``, Compare, token maps, latency)."""
    from compression.data.records import single_turn

    for q in questions:
        if not q.strip():
            raise DataError("the question is empty; expected a question about the image")
        check_text(fmt, q)
    return generation_inputs(fmt, [(single_turn(q), [im]) for q, im in zip(questions, images)])


def record_generation_inputs(fmt: PromptFormat, records: Sequence[Record], messages: Sequence[list[dict]]):
    """Generation inputs for records whose prompts are ``messages`` (e.g. with choices rendered)."""
    _check_records(fmt, records)
    return generation_inputs(fmt, [(m, _images_in(m, r)) for r, m in zip(records, messages)])


def training_inputs(fmt: PromptFormat, records: Sequence[Record]) -> dict[str, torch.Tensor]:
    """Teacher-forcing inputs, right-padded, with ``labels`` on every assistant turn (-100 elsewhere).

    Shapes: ``input_ids``, ``attention_mask``, ``labels`` `[B, T]`, plus the processor's image inputs
    (``pixel_values`` and whatever the family needs) for the images of the batch, in order.
    """
    _check_records(fmt, records)
    images = [list(r.images) for r in records]
    if fmt.prefix_lm:
        return _prefix_training_inputs(fmt, records, images)
    texts = [fmt.render(r.messages) for r in records]
    inputs = dict(_call(fmt.processor, texts, images, "right"))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    _check_length(fmt, records, mask.sum(1).tolist())
    labels = torch.full_like(ids, -100)
    for row, (r, text) in enumerate(zip(records, texts)):
        length = int(mask[row].sum())
        for start, end in _assistant_token_spans(fmt, r, text, ids[row, :length].tolist()):
            labels[row, start:end] = ids[row, start:end]
    inputs["labels"] = labels
    return inputs


def _prefix_training_inputs(fmt: PromptFormat, records: Sequence[Record], images: list[list[Image.Image]]):
    """A prefix-LM's teacher-forcing inputs: everything up to the last assistant turn is the prefix, that
    turn the suffix; the processor labels the suffix and sets ``token_type_ids`` (1 on it: causal there)."""
    prefixes, suffixes = [], []
    for r in records:
        last = max(k for k, m in enumerate(r.messages) if m["role"] == "assistant")
        prefixes.append(fmt.render(r.messages[:last], add_generation_prompt=True))
        content = r.messages[last]["content"]
        suffixes.append(content if isinstance(content, str) else " ".join(
            p["text"].strip() for p in content if p.get("type") == "text"))
    inputs = dict(_call(fmt.processor, prefixes, images, "right", suffix=suffixes))
    _check_length(fmt, records, inputs["attention_mask"].sum(1).tolist())
    inputs["labels"] = torch.as_tensor(inputs["labels"]).masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def _assistant_char_spans(fmt: PromptFormat, record: Record, text: str) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns in the rendered conversation, from prefix renders; None when a
    prefix render is not a prefix of the whole text (then token counts decide)."""
    spans = []
    for k, m in enumerate(record.messages):
        if m["role"] != "assistant":
            continue
        before = fmt.render(record.messages[:k], add_generation_prompt=True)
        through = fmt.render(record.messages[:k + 1])
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            return None
        spans.append((len(before), len(through)))
    return spans


def _assistant_token_spans(fmt: PromptFormat, record: Record, text: str, expanded: list[int]) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the assistant turns in the processor's (image-expanded) ids.

    The text is tokenized once more without image expansion, with character offsets; a token is supervised
    when it lies inside an assistant turn's characters, or when its part inside the turn is more than
    whitespace (a byte-level BPE merges a turn's trailing space into the next word: that token belongs to
    the next turn). The unexpanded tokens are then walked against the expanded ids, an image token standing
    for its run of visual tokens. Without offsets (slow tokenizers) or prefix renders, token counts of the
    prefixes decide.
    """
    chars = _assistant_char_spans(fmt, record, text)
    tok = fmt.processor.tokenizer
    if chars is not None and getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=_adds_bos(tok, [text]))
        unexpanded, offsets = enc["input_ids"], enc["offset_mapping"]
        positions = _align(unexpanded, expanded, _image_token_ids(fmt))
        if positions is not None:
            spans = []
            for lo, hi in chars:
                chosen = [positions[i] for i, (a, b) in enumerate(offsets)
                          if b > a and lo <= a < hi and (b <= hi or text[a:hi].strip())]
                if chosen:
                    spans.append((min(chosen), max(chosen) + 1))
            return spans
    spans = []
    for k, m in enumerate(record.messages):
        if m["role"] != "assistant":
            continue
        prefix = record.messages[:k]
        start = _token_count(fmt.processor, fmt.render(prefix, add_generation_prompt=True), _images_in(prefix, record))
        end = _token_count(fmt.processor, fmt.render(record.messages[:k + 1]),
                           _images_in(record.messages[:k + 1], record))
        spans.append((start, min(end, len(expanded))))
    return spans


def _image_token_ids(fmt: PromptFormat) -> set[int]:
    tok = fmt.processor.tokenizer
    ids = {getattr(fmt.processor, "image_token_id", None)}
    ids.add(tok.convert_tokens_to_ids(fmt.image_token) if fmt.image_token else None)
    return {i for i in ids if isinstance(i, int) and i != tok.unk_token_id}


def _align(unexpanded: list[int], expanded: list[int], image_ids: set[int]) -> list[int] | None:
    """Position in ``expanded`` of each token of ``unexpanded`` (an image token matches its whole run)."""
    positions, j = [], 0
    for token in unexpanded:
        if j >= len(expanded) or expanded[j] != token:
            return None
        positions.append(j)
        j += 1
        if token in image_ids:
            while j < len(expanded) and expanded[j] == token:
                j += 1
    return positions if j == len(expanded) else None


def supervised_tokens(inputs: dict[str, torch.Tensor]) -> int:
    """How many tokens a training batch supervises (labels other than -100)."""
    return int((inputs["labels"] != -100).sum())
