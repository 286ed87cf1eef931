"""Measurements the pages show, stored in the runtime store so they survive restarts.

A measurement is keyed by the model's fingerprint (content identity) and the data selection's
fingerprint (the data file and the records chosen), so a result is reused only for the same weights
and the same records. Files are written to a temp path and
renamed (nothing half-written is ever visible). No streamlit here.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from compression.data.sources import Selection
from compression.measure import evaluate
from compression.models import LoadedModel
from compression.paths import cache_dir


LATENCY_REPEATS = 9  # medians over this many timed runs after the warm-up (compression.measure.evaluate's default)
LATENCY_WARMUP = 2


def _path(loaded: LoadedModel, selection: Selection, kernels: str = "eager") -> Path:
    suffix = "" if kernels == "eager" else f"-{kernels}"
    return cache_dir() / "ui" / "evals" / f"{loaded.fingerprint}-{selection.fingerprint()}{suffix}.json"


def cached_evaluation(loaded: LoadedModel, selection: Selection, kernels: str = "eager") -> dict | None:
    """A stored evaluation of this exact model on these exact records, timed on ``kernels``, or None."""
    path = _path(loaded, selection, kernels)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def measure(loaded: LoadedModel, selection: Selection, kernels: str = "eager") -> dict:
    """Accuracy on the selection, sizes and latency (on ``kernels``) through ``compression.measure.evaluate``;
    stored."""
    report = evaluate.evaluate(loaded, selection, measure_latency=False).to_dict()
    timing = evaluate.latency({"model": loaded.model}, evaluate.latency_inputs(loaded, selection.records[0]),
                              repeats=LATENCY_REPEATS, warmup=LATENCY_WARMUP, kernels=kernels)["model"]
    report.update(prefill_ms=timing["prefill_ms"], decode_tokens_per_s=timing["decode_tokens_per_s"], kernels=kernels,
                  latency_repeats=LATENCY_REPEATS, model=loaded.name, fingerprint=loaded.fingerprint,
                  measured_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    path = _path(loaded, selection, kernels)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=1)
    os.replace(f.name, path)
    return report
