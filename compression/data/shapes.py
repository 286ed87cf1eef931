"""ShapesVQA: a procedural image-question-answer set, and the LLaVA conversation JSON format.

A scene is a 64x64 RGB image split into four quadrants; 1-4 of them hold one shape
(circle / square / triangle, six colours) drawn at a jittered position and size on a mid-grey
background. Mid-grey matters: after the processor's (x - 0.5) / 0.5 normalisation the
background is ~0, so image tokens of different scenes are not all the same vector
(see shared/NOTES-reference-model.md).

Splits are disjoint by *layout* (which shape and colour sits in which quadrant): a layout's
hash decides its split, so no test scene's layout is ever seen in training.

Every question has a one-word answer; seven question types:
``color, shape, count, count_color, count_shape, exists, position``.

Everything is deterministic given ``(split, index, seed)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "count_color", "count_shape", "exists", "position")
Split = Literal["train", "val", "test"]
SPLIT_SIZES = {"train": 40_000, "val": 1_000, "test": 2_000}
_SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
BACKGROUND = 128


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    quadrant: int  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right

    @property
    def position(self) -> str:
        return POSITIONS[self.quadrant]


@dataclass
class Sample:
    """One image-question-answer triple. ``image`` is a PIL RGB image."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    id: str
    scene: tuple[Shape, ...] = field(default_factory=tuple)


def layout_key(scene: Iterable[Shape]) -> str:
    return "|".join(f"{s.quadrant}:{s.color}:{s.shape}" for s in sorted(scene, key=lambda s: s.quadrant))


def layout_split(scene: Iterable[Shape]) -> Split:
    bucket = int(hashlib.sha1(layout_key(scene).encode()).hexdigest(), 16) % 10
    return next(name for name, r in _SPLIT_BUCKETS.items() if bucket in r)


def render(scene: Iterable[Shape], rng: np.random.Generator) -> Image.Image:
    """Draw the scene with jittered centres and sizes, plus faint background noise."""
    noise = rng.integers(-6, 7, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    pixels = np.clip(BACKGROUND + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    half = IMAGE_SIZE // 2
    for s in scene:
        radius = int(rng.integers(7, 12))
        slack = half // 2 - radius - 1
        cx = (s.quadrant % 2) * half + half // 2 + int(rng.integers(-slack, slack + 1))
        cy = (s.quadrant // 2) * half + half // 2 + int(rng.integers(-slack, slack + 1))
        fill = COLORS[s.color]
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "square":
            inset = round(radius * 0.15)  # equal area to the circle, roughly
            draw.rectangle((box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset), fill=fill)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    return image


def _random_scene(rng: np.random.Generator, max_shapes: int) -> tuple[Shape, ...]:
    count = int(rng.integers(1, max_shapes + 1))
    quadrants = sorted(rng.choice(4, size=count, replace=False).tolist())
    return tuple(Shape(SHAPES[rng.integers(3)], list(COLORS)[rng.integers(len(COLORS))], q) for q in quadrants)


def _ask(scene: tuple[Shape, ...], qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """A question of ``qtype`` about the scene with its answer, or None when none is unambiguous."""
    shapes = [s.shape for s in scene]
    colors = list(COLORS)
    if qtype == "color":
        unique = [s for s in scene if shapes.count(s.shape) == 1]
        if not unique:
            return None
        s = unique[rng.integers(len(unique))]
        return f"what color is the {s.shape} ?", s.color
    if qtype == "shape":
        s = scene[rng.integers(len(scene))]
        return f"what shape is at the {s.position} ?", s.shape
    if qtype == "count":
        return "how many shapes are there ?", NUMBERS[len(scene)]
    if qtype == "count_color":
        # half the time a colour present in the scene, so "zero" is not the easy answer
        color = scene[rng.integers(len(scene))].color if rng.random() < 0.5 else colors[rng.integers(len(colors))]
        return f"how many {color} shapes are there ?", NUMBERS[sum(s.color == color for s in scene)]
    if qtype == "count_shape":
        shape = SHAPES[rng.integers(3)]
        return f"how many {PLURALS[shape]} are there ?", NUMBERS[shapes.count(shape)]
    if qtype == "exists":
        if rng.random() < 0.5:
            s = scene[rng.integers(len(scene))]
            return f"is there a {s.color} {s.shape} ?", "yes"
        present = {(s.color, s.shape) for s in scene}
        absent = [(c, sh) for c in colors for sh in SHAPES if (c, sh) not in present]
        color, shape = absent[rng.integers(len(absent))]
        return f"is there a {color} {shape} ?", "no"
    if qtype == "position":
        pairs = [(s.color, s.shape) for s in scene]
        unique = [s for s in scene if pairs.count((s.color, s.shape)) == 1]
        if not unique:
            return None
        s = unique[rng.integers(len(unique))]
        return f"where is the {s.color} {s.shape} ?", s.position
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def generate(split: Split, index: int, seed: int = 0, max_shapes: int = 4) -> Sample:
    """Sample ``index`` of ``split``: the same arguments always give the same sample."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split {split!r} is not one of {tuple(_SPLIT_IDS)}")
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, max_shapes])
    while True:
        scene = _random_scene(rng, max_shapes)
        if layout_split(scene) == split:
            break
    while True:
        qtype = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
        qa = _ask(scene, qtype, rng)
        if qa is not None:
            break
    return Sample(render(scene, rng), qa[0], qa[1], qtype, f"{split}-{seed}-{index}", scene)


def load_split(split: Split, n: int | None = None, seed: int = 0, start: int = 0) -> list[Sample]:
    n = SPLIT_SIZES[split] - start if n is None else n
    return [generate(split, i, seed) for i in range(start, start + n)]


def fraction(samples: list[Sample], frac: float, seed: int = 0) -> list[Sample]:
    """A seeded random subset holding ``frac`` of the samples (at least one)."""
    if not 0 < frac <= 1:
        raise ValueError(f"data fraction {frac} must be in (0, 1]")
    k = max(1, round(len(samples) * frac))
    order = np.random.default_rng(seed).permutation(len(samples))[:k]
    return [samples[i] for i in sorted(order)]


# --------------------------------------------------------------------------- LLaVA conversation JSON

def export_llava_json(samples: list[Sample], folder: str | Path) -> Path:
    """Write ``folder/images/*.png`` and ``folder/data.json`` (LLaVA conversation format)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for s in samples:
        rel = f"images/{s.id}.png"
        s.image.save(folder / rel)
        records.append({
            "id": s.id,
            "image": rel,
            "type": s.qtype,
            "conversations": [
                {"from": "human", "value": f"<image>\n{s.question}"},
                {"from": "gpt", "value": s.answer},
            ],
        })
    out = folder / "data.json"
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        json.dump(records, f, indent=1)
    os.replace(f.name, out)
    return out


def prompt(question: str) -> str:
    """The LLaVA-1.5 prompt the reference model was trained with (``compression.models.reference``); every
    other step prompts through ``compression.models.prompting``, whose fallback is this same format."""
    return f"USER: <image>\n{question.strip()} ASSISTANT:"
