"""One evaluation path: accuracy, sizes and latency, for the UI, the CLI, jobs and tests.

- accuracy: exact match of greedy ``generate`` answers (lower-cased, punctuation stripped),
  overall and per question type;
- size: parameters by part (vision / projector / language) and bytes of the stored tensors;
- latency: prefill ms for one image + question, and decode tokens/s with the KV cache, medians
  over repeats after warm-up. Several models are timed *interleaved* in one process (A, B, A,
  B, …) so that their ratio is not skewed by the machine's drift.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import nn

from compression.data import shapes as data
from compression.models import LoadedModel, parameter_counts, tensor_bytes


def normalize_answer(text: str) -> str:
    return re.sub(r"[^\w\s-]", "", text.lower()).strip()


@dataclass
class AccuracyResult:
    accuracy: float
    per_type: dict[str, float]
    n: int
    predictions: list[str] = field(repr=False, default_factory=list)


def encode(processor, images: list[Image.Image], questions: list[str]) -> dict[str, torch.Tensor]:
    """Processor inputs for a batch of (image, question), left-padded for generation."""
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=[data.prompt(q) for q in questions], return_tensors="pt", padding=True)


@torch.no_grad()
def generate_answers(model: nn.Module, processor, images: list[Image.Image], questions: list[str],
                     max_new_tokens: int = 8, batch_size: int = 32,
                     generate_fn: Callable | None = None) -> list[str]:
    """Greedy answers. ``generate_fn(model, inputs, max_new_tokens) -> new token ids`` replaces the
    plain ``model.generate`` (visual-token pruning passes its own)."""
    answers = []
    device = next(model.parameters()).device
    for i in range(0, len(images), batch_size):
        inputs = encode(processor, images[i:i + batch_size], questions[i:i + batch_size]).to(device)
        if generate_fn is None:
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1]:]
        else:
            new = generate_fn(model, inputs, max_new_tokens)
        answers += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [a.strip() for a in answers]


def accuracy(model: nn.Module, processor, samples: list[data.Sample], batch_size: int = 32,
             max_new_tokens: int = 8, generate_fn: Callable | None = None) -> AccuracyResult:
    predictions = generate_answers(model, processor, [s.image for s in samples], [s.question for s in samples],
                                   max_new_tokens, batch_size, generate_fn)
    hits: dict[str, list[bool]] = {}
    for s, p in zip(samples, predictions):
        hits.setdefault(s.qtype, []).append(normalize_answer(p) == normalize_answer(s.answer))
    every = [h for v in hits.values() for h in v]
    return AccuracyResult(
        accuracy=sum(every) / max(1, len(every)),
        per_type={k: sum(v) / len(v) for k, v in sorted(hits.items())},
        n=len(samples), predictions=predictions)


def size_bytes(model: nn.Module, path: Path | None = None) -> int:
    """Bytes of the weight files in ``path`` when given, else of the tensors in memory."""
    if path is not None and path.is_dir():
        files = list(path.glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files)
    return tensor_bytes(model)


@torch.no_grad()
def _time_one(model: nn.Module, inputs: dict[str, torch.Tensor], decode_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    out = model(**inputs, use_cache=True)
    prefill = time.perf_counter() - start
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    decode = time.perf_counter() - start
    return prefill * 1000, decode_tokens / decode


def latency(models: dict[str, nn.Module], processor, sample: data.Sample | None = None, repeats: int = 9,
            warmup: int = 2, decode_tokens: int = 16,
            inputs_fn: Callable[[nn.Module, dict], dict] | None = None) -> dict[str, dict[str, float]]:
    """Median prefill ms and decode tokens/s for each model, measured interleaved, batch 1.

    ``inputs_fn(model, inputs) -> model kwargs`` lets a caller change what is fed (e.g. pruned
    visual tokens as ``inputs_embeds``); by default the processor's inputs go in unchanged.
    """
    sample = sample or data.generate("test", 0)
    base = encode(processor, [sample.image], [sample.question])
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for r in range(warmup + repeats):
        for name, model in models.items():
            inputs = inputs_fn(model, dict(base)) if inputs_fn else dict(base)
            inputs = {k: v.to(next(model.parameters()).device) for k, v in inputs.items()}
            measured = _time_one(model, inputs, decode_tokens)
            if r >= warmup:
                timings[name].append(measured)
    return {name: {"prefill_ms": statistics.median(t[0] for t in ts),
                   "decode_tokens_per_s": statistics.median(t[1] for t in ts), "repeats": repeats}
            for name, ts in timings.items()}


@dataclass
class EvalReport:
    accuracy: float
    per_type: dict[str, float]
    samples: int
    params_total: int
    params_vision: int
    params_projector: int
    params_language: int
    size_bytes: int
    prefill_ms: float | None
    decode_tokens_per_s: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(loaded: LoadedModel, samples: list[data.Sample] | int = 500, measure_latency: bool = True,
             batch_size: int = 32) -> EvalReport:
    """Accuracy on the held-out test split (or the given samples), sizes and latency of one model."""
    if isinstance(samples, int):
        samples = data.load_split("test", samples)
    acc = accuracy(loaded.model, loaded.processor, samples, batch_size)
    counts = parameter_counts(loaded.model, loaded.anatomy)
    lat = latency({"model": loaded.model}, loaded.processor)["model"] if measure_latency else {}
    return EvalReport(
        accuracy=acc.accuracy, per_type=acc.per_type, samples=acc.n, params_total=counts["total"],
        params_vision=counts["vision"], params_projector=counts["projector"], params_language=counts["language"],
        size_bytes=size_bytes(loaded.model, loaded.path), prefill_ms=lat.get("prefill_ms"),
        decode_tokens_per_s=lat.get("decode_tokens_per_s"))


def ask(loaded: LoadedModel, image: Image.Image, question: str, max_new_tokens: int = 16) -> tuple[str, float]:
    """One answer and its wall time in ms."""
    if not question.strip():
        raise ValueError("question is empty; expected a question about the image")
    start = time.perf_counter()
    answer = generate_answers(loaded.model, loaded.processor, [image], [question], max_new_tokens)[0]
    return answer, (time.perf_counter() - start) * 1000
