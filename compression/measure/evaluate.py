"""One evaluation path: accuracy, sizes and latency, for the UI, the CLI, jobs and tests.

- accuracy: greedy ``generate`` answers to the records of a data selection, prompted with the model's own
  chat template (``compression.models.prompting``), scored by ``compression.data.scoring`` with the metric
  the data calls for (normalised exact match, multiple choice, yes/no), overall and per record type;
- size: parameters by part (vision / projector / language) and bytes of the stored tensors;
- latency: prefill ms for one image + question (logits of the last position only, as ``generate``),
  and decode tokens/s with the KV cache, medians (or minima) over repeats after warm-up. Several
  models are timed *interleaved* in one process (A, B, A, B, …; optionally order-rotated) so
  that their ratio is not skewed by the machine's drift.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from PIL import Image
from torch import nn

from compression.data import scoring
from compression.data.records import Record
from compression.data.sources import Selection
from compression.models import LoadedModel, parameter_counts, tensor_bytes
from compression.models.prompting import PromptFormat, question_inputs, record_generation_inputs

normalize_answer = scoring.normalize_answer  # the answer normalisation every page and test compares with
MAX_NEW_TOKENS = 16  # short-answer tasks (lmms-eval's VQA-style default); answers stop at the end-of-turn token


@dataclass
class AccuracyResult:
    accuracy: float
    per_type: dict[str, float]
    n: int
    metric: str = "exact_match"
    details: dict[str, float] = field(default_factory=dict)
    predictions: list[str] = field(repr=False, default_factory=list)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its parameters' device, or for a model placed by Accelerate
    (``hf_device_map``, some parts offloaded to the CPU or disk) the first device it computes on."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        first = next((w for w in placed.values() if str(w) not in ("cpu", "disk")), "cpu")
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first if first != "disk" else "cpu")
    return next(model.parameters()).device


def _to_model(inputs, model: nn.Module) -> dict[str, torch.Tensor]:
    device, dtype = input_device(model), next(model.parameters()).dtype
    return {k: (v.to(device, dtype=dtype) if k == "pixel_values" and v.is_floating_point() else v.to(device))
            for k, v in dict(inputs).items()}


@torch.no_grad()
def generate(model: nn.Module, fmt: PromptFormat, inputs, max_new_tokens: int = MAX_NEW_TOKENS,
             generate_fn: Callable | None = None) -> list[str]:
    """Greedy answers to prepared generation inputs. ``generate_fn(model, inputs, max_new_tokens) -> new
    token ids`` replaces the plain ``model.generate`` (visual-token pruning passes its own)."""
    inputs = _to_model(inputs, model)
    if generate_fn is None:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
    else:
        new = generate_fn(model, inputs, max_new_tokens)
    return [a.strip() for a in fmt.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def answer_questions(loaded: LoadedModel, images: list[Image.Image], questions: list[str],
                     max_new_tokens: int = MAX_NEW_TOKENS, generate_fn: Callable | None = None) -> list[str]:
    """Answers to typed questions about images (``ask``, Compare), one image per question."""
    return generate(loaded.model, loaded.prompt, question_inputs(loaded.prompt, images, questions),
                    max_new_tokens, generate_fn)


def accuracy(loaded: LoadedModel, records: Sequence[Record], metric: scoring.Metric = "auto", batch_size: int = 16,
             max_new_tokens: int = MAX_NEW_TOKENS, generate_fn: Callable | None = None,
             model: nn.Module | None = None, split: bool = False) -> AccuracyResult:
    """Score ``loaded`` (or ``model``, e.g. a pruned copy sharing its processor) on ``records``.

    ``split``: under ``accelerate launch`` with N processes, each answers every N-th record (rank ``r``:
    records ``r, r + N, ...``), the answers are gathered and every process scores all of them (the same result
    as one process: greedy decoding, the same batches' padding aside). Run directly, the same as without."""
    from compression.methods import distributed

    model = model if model is not None else loaded.model
    chosen = scoring.choose_metric(records, metric)
    rank, world = distributed.process_group() if split else (0, 1)
    mine = list(records)[rank::world]
    predictions: list[str] = []
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        messages = [scoring.prompt_messages(r, chosen) for r in chunk]
        inputs = record_generation_inputs(loaded.prompt, chunk, messages)
        predictions += generate(model, loaded.prompt, inputs, max_new_tokens, generate_fn)
    if world > 1:
        shares = distributed.gather_objects(predictions)
        predictions = [shares[i % world][i // world] for i in range(len(records))]
    result = scoring.score(records, predictions, chosen)
    return AccuracyResult(result.accuracy, result.per_type, result.n, result.metric, result.details, predictions)


def size_bytes(model: nn.Module, path: Path | None = None) -> int:
    """Bytes of the weight files in ``path`` when given, else of the tensors in memory."""
    if path is not None and path.is_dir():
        files = list(path.glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files)
    return tensor_bytes(model)


class _Clock:
    """Wall time on the CPU; CUDA events on a GPU (recorded on the stream, read after a synchronize), so a
    GPU's asynchronous launches are timed by when the kernels ran, not when Python queued them."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds_since(self, start) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        return time.perf_counter() - start


@torch.no_grad()
def _time_one(model: nn.Module, inputs: dict[str, torch.Tensor], decode_tokens: int) -> tuple[float, float | None]:
    clock = _Clock(input_device(model))
    # logits for the last position only, as generate computes them: a [tokens, vocab] projection
    # of the whole prompt is work no prefill does, and pruning cannot shrink it
    start = clock.start()
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    prefill = clock.seconds_since(start)
    if decode_tokens == 0:
        return prefill * 1000, None
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    mask = inputs.get("attention_mask")
    position = inputs["position_ids"][:, -1:] if "position_ids" in inputs else None
    start = clock.start()
    for _ in range(decode_tokens):
        step = {"input_ids": token, "past_key_values": past, "use_cache": True}
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            step["attention_mask"] = mask
        if position is not None:  # a pruned sequence with gaps: continue from its last position
            position = position + 1
            step["position_ids"] = position
        out = model(**step)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    decode = clock.seconds_since(start)
    return prefill * 1000, decode_tokens / decode


def latency_inputs(loaded: LoadedModel, record: Record) -> dict[str, torch.Tensor]:
    """Batch-1 generation inputs for one record's prompt: what latency is measured on."""
    return dict(record_generation_inputs(loaded.prompt, [record], [record.prompt_messages]))


def latency(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor] | None, repeats: int = 9, warmup: int = 2,
            decode_tokens: int = 16,
            inputs_fn: Callable[[nn.Module, dict], dict] | None = None,
            inputs_by_name: dict[str, dict[str, torch.Tensor]] | None = None,
            statistic: Literal["median", "min"] = "median", rotate: bool = False,
            kernels: str = "eager") -> dict[str, dict[str, float]]:
    """Prefill ms and decode tokens/s for each model, measured interleaved, batch 1.

    ``inputs`` are one prompt's processor inputs (``latency_inputs``). ``inputs_fn(model, inputs) -> model
    kwargs`` lets a caller change what is fed (e.g. pruned visual tokens as ``inputs_embeds``).
    ``inputs_by_name``: model kwargs per name, fed as they are (the language model alone from precomputed
    ``inputs_embeds``, a visual-token-pruned sequence; several names may share one model); ``inputs`` may
    then be None. ``statistic``: ``"median"`` of the repeats, or ``"min"`` (fastest prefill, fastest
    decode: the least-disturbed run on a shared machine). ``rotate``: round ``r`` starts at the ``r``-th
    model (A B C, B C A, C A B, ...), so no model always runs first or right after the same neighbour.
    ``decode_tokens=0`` times the prefill only (``decode_tokens_per_s`` is then None).
    ``kernels``: ``"eager"`` (PyTorch's own linears) or ``"onednn"`` (CPU linears on oneDNN-packed weights for
    the duration of the timing, ``compression.models.kernels``: what a CPU deployment would run; the packed
    copies are extra memory, checked against the free memory first). Every model is timed on the same kernels.
    """
    from compression.models import kernels as kernel_choice

    kernel_choice.check_name(kernels)
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic {statistic!r} is not 'median' or 'min'")
    if repeats < 1 or warmup < 0 or decode_tokens < 0:
        raise ValueError(f"repeats {repeats} must be >= 1, warmup {warmup} and decode_tokens {decode_tokens} >= 0")
    inputs_by_name = inputs_by_name or {}
    if inputs is None and any(name not in inputs_by_name for name in models):
        raise ValueError("latency needs inputs for every model: pass inputs, or inputs_by_name for each name")
    names = list(models)
    timings: dict[str, list[tuple[float, float | None]]] = {name: [] for name in models}
    with kernel_choice.packed(models.values(), kernels):
        for r in range(warmup + repeats):
            order = names[r % len(names):] + names[:r % len(names)] if rotate else names
            for name in order:
                model = models[name]
                if name in inputs_by_name:
                    fed = dict(inputs_by_name[name])
                else:
                    fed = inputs_fn(model, dict(inputs)) if inputs_fn else dict(inputs)
                measured = _time_one(model, _to_model(fed, model), decode_tokens)
                if r >= warmup:
                    timings[name].append(measured)
    pick_low = statistics.median if statistic == "median" else min
    pick_high = statistics.median if statistic == "median" else max
    return {name: {"prefill_ms": pick_low(t[0] for t in ts),
                   "decode_tokens_per_s": pick_high(t[1] for t in ts) if decode_tokens else None,
                   "prefill_ms_all": [t[0] for t in ts], "repeats": repeats, "statistic": statistic,
                   "kernels": kernels}
            for name, ts in timings.items()}


@dataclass
class EvalReport:
    accuracy: float
    per_type: dict[str, float]
    samples: int
    metric: str
    data: str                  # what it was measured on: "200 records of test.json"
    prompt: str                # which prompt format: the model's chat template or the fallback
    params_total: int
    params_vision: int
    params_projector: int
    params_language: int
    size_bytes: int
    prefill_ms: float | None
    decode_tokens_per_s: float | None
    details: dict[str, float] = field(default_factory=dict)
    kernels: str | None = None  # what the latency ran on (``latency(kernels=)``); None when not measured

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(loaded: LoadedModel, selection: Selection, metric: scoring.Metric = "auto",
             measure_latency: bool = True, batch_size: int = 16,
             max_new_tokens: int = MAX_NEW_TOKENS, kernels: str = "eager") -> EvalReport:
    """Accuracy on a data selection, sizes and latency (on the selection's first record, on ``kernels``:
    see :func:`latency`) of one model."""
    acc = accuracy(loaded, selection.records, metric, batch_size, max_new_tokens)
    counts = parameter_counts(loaded.model, loaded.anatomy)
    lat = latency({"model": loaded.model}, latency_inputs(loaded, selection.records[0]),
                  kernels=kernels)["model"] if measure_latency else {}
    return EvalReport(
        accuracy=acc.accuracy, per_type=acc.per_type, samples=acc.n, metric=acc.metric, data=selection.describe(),
        prompt=loaded.prompt.name, params_total=counts["total"], params_vision=counts["vision"],
        params_projector=counts["projector"], params_language=counts["language"],
        size_bytes=size_bytes(loaded.model, loaded.path), prefill_ms=lat.get("prefill_ms"),
        decode_tokens_per_s=lat.get("decode_tokens_per_s"), details=acc.details, kernels=lat.get("kernels"))


def ask(loaded: LoadedModel, image: Image.Image, question: str,
        max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, float]:
    """One answer and its wall time in ms."""
    start = time.perf_counter()
    answer = answer_questions(loaded, [image], [question], max_new_tokens)[0]
    return answer, (time.perf_counter() - start) * 1000
