"""Side-by-side answers for the Compare page: the original and a compressed run answer the same
image and question, timed interleaved (A, B, A, B …, medians after a warm-up) so that the ratio
of their latencies is not skewed by the machine's drift (as ``compression.measure.evaluate.latency``).
A run that prunes visual tokens answers through ``compression.methods.tokens.make_generate_fn``. No streamlit."""
from __future__ import annotations

import statistics
import time
from typing import Callable

from PIL import Image

from compression.measure import evaluate
from compression.models import LoadedModel


def generate_fn_for(recipe: dict) -> Callable | None:
    """The run's visual-token pruning at inference, or None when it keeps every token."""
    spec = recipe.get("visual_tokens") or {}
    if spec.get("keep_ratio", 1.0) >= 1.0:
        return None
    from compression.methods import tokens

    return tokens.make_generate_fn(spec["keep_ratio"], spec.get("scorer", "attention"), spec.get("alpha", 0.7),
                                   seed=(recipe.get("recovery") or {}).get("seed", 0))


def answer_both(models: dict[str, tuple[LoadedModel, Callable | None]], image: Image.Image, question: str,
                repeats: int = 3) -> dict[str, dict]:
    """``{name: {"answer", "latency_ms"}}``: one warm-up each, then ``repeats`` interleaved timed answers."""
    if not question.strip():
        raise ValueError("question is empty; expected a question about the image")
    times: dict[str, list[float]] = {name: [] for name in models}
    answers: dict[str, str] = {}
    for r in range(repeats + 1):
        for name, (loaded, generate_fn) in models.items():
            start = time.perf_counter()
            answers[name] = evaluate.answer_questions(loaded, [image], [question], generate_fn=generate_fn)[0]
            if r > 0:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: {"answer": answers[name], "latency_ms": statistics.median(times[name]), "repeats": repeats}
            for name in models}


def score_grid(scores: dict, recipe: dict) -> tuple[list[list[float]], str]:
    """The grid of ``tokens.analyze_tokens`` that the run's visual-token scorer ranks by, and its name."""
    spec = recipe.get("visual_tokens") or {}
    scorer, alpha = spec.get("scorer", "attention"), spec.get("alpha", 0.7)
    if scorer == "quantization":
        return scores["quant_score"], "quantization score S^Q"
    if scorer == "similarity":
        import torch

        from compression.methods import tokens

        sem = torch.tensor(scores["semantic_similarity"])
        fused = tokens.hybrid_score(sem.flatten()[None], torch.tensor(scores["quant_score"]).flatten()[None], alpha)
        return fused[0].reshape(sem.shape).tolist(), f"hybrid score (similarity, α {alpha})"
    return scores["hybrid"], f"hybrid score (attention, α {alpha})"
