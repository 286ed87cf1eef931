"""One image-conversation record, whatever the source: the shape every step (calibration, recovery,
evaluation, token maps, Compare) consumes.

A record holds its conversation in the chat-message format that ``processor.apply_chat_template``
takes (``{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}``), so a
record is prompted with the *model's* own template, never a fixed string. Images are decoded PIL
images, in the order of the ``{"type": "image"}`` parts. This module knows nothing of models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"  # how the LLaVA conversation format marks where an image goes


class DataError(ValueError):
    """Data that cannot be used; the message is one line naming the source, the record index and why."""


@dataclass
class Record:
    """One record. ``messages`` alternate user / assistant (an optional system message first).

    ``choices`` (multiple choice) and ``type`` (for per-type breakdowns) are optional fields of the
    source. ``index`` is the record's position in its source, used in every message about it.
    """

    index: int
    id: str
    messages: list[dict[str, Any]]
    images: list[Image.Image] = field(default_factory=list, repr=False)
    choices: list[str] | None = None
    type: str | None = None

    @property
    def assistant_turns(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)

    @property
    def answer(self) -> str:
        """The last assistant turn: what evaluation scores a generation against."""
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                return message_text(m)
        return ""

    @property
    def question(self) -> str:
        """The text of the last user turn before the answer (what a side-by-side view shows)."""
        return message_text(self.prompt_messages[-1]) if self.prompt_messages else ""

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """Every message before the last assistant turn: the prompt evaluation generates from."""
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), default=len(self.messages))
        return self.messages[:last]


def message_text(message: dict[str, Any]) -> str:
    """The text parts of one chat message, joined."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return " ".join(part["text"] for part in content if part.get("type") == "text").strip()


def image_count(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if not isinstance(m["content"], str)
               for part in m["content"] if part.get("type") == "image")


def parts_from_text(text: str) -> list[dict[str, Any]]:
    """LLaVA-format text (``"<image>\\nWhat is ...?"``) as chat content parts, image placement kept."""
    parts: list[dict[str, Any]] = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
        piece = piece.strip()
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def single_turn(question: str, answer: str | None = None, image_first: bool = True,
                images: int = 1) -> list[dict[str, Any]]:
    """Messages for one question about ``images`` images (placed before or after the text), and its answer."""
    image_parts = [{"type": "image"} for _ in range(images)]
    text = [{"type": "text", "text": question.strip()}]
    messages = [{"role": "user", "content": image_parts + text if image_first else text + image_parts}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]})
    return messages


def record_from(index: int, question: str, answer: str | None, image: Image.Image | None = None,
                choices: list[str] | None = None, type: str | None = None, id: str | None = None) -> Record:
    """A one-question record (the form ShapesVQA, tabular datasets and a typed question take)."""
    images = [image] if image is not None else []
    return Record(index=index, id=str(id if id is not None else index),
                  messages=single_turn(question, answer, images=len(images)), images=images,
                  choices=choices, type=type)
