"""What the runs of a sweep share, computed once: the original model's importance scores and its
measured accuracy.

Every run of a sweep loads the same original and needs the same two expensive things from it.
The importance scores already live in ``cache/importance/`` (``compression.methods.importance.
cached_importance``, keyed by model fingerprint and calibration selection). The original's
accuracy lives in ``cache/originals/``, keyed by model fingerprint, the evaluation selection's
fingerprint (its source's content and the records picked), the metric, the generation length, the
prompt format, dtype and device. Both are computed under a file lock, so when several workers start
together one computes and the others wait, then read its result.

Latency is not shared: each run times the original and the compressed model interleaved in one
process (``compression.measure.evaluate.latency``), since a ratio is only fair between models
timed side by side.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from compression.data.sources import Selection
from compression.measure import evaluate
from compression.methods import importance
from compression.models import LoadedModel
from compression.paths import cache_dir

Say = Callable[[str], None]


@contextmanager
def computed_once(name: str) -> Iterator[None]:
    """An exclusive lock on ``cache/locks/<name>.lock`` across processes (released on exit or death)."""
    path = cache_dir() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def importance_scores(loaded: LoadedModel, kind: str, method: str, calibration: Selection | None,
                      say: Say | None = None) -> pd.DataFrame:
    """``importance.cached_importance``, computed by the first caller only; says which it was."""
    path = importance.importance_path(loaded, kind, method, calibration if method != "magnitude" else None)
    computed = False
    if not path.is_file():
        with computed_once(path.stem):
            computed = not path.is_file()
            frame = importance.cached_importance(loaded, kind, method, calibration)
    else:
        frame = importance.cached_importance(loaded, kind, method, calibration)
    if say is not None:
        size = f"{len(calibration)} samples" if calibration is not None else "no data"
        say(f"importance {kind} ({method}, {size}): "
            + ("computed and cached" if computed else f"read from the cache ({path.name})"))
    return frame


def original_accuracy_path(loaded: LoadedModel, selection: Selection, metric: str, max_new_tokens: int) -> Path:
    parameter = next(loaded.model.parameters())
    dtype = str(parameter.dtype).removeprefix("torch.")
    prompt = hashlib.sha1(str(getattr(loaded.prompt, "name", "")).encode()).hexdigest()[:8]
    return (cache_dir() / "originals" / f"{loaded.fingerprint}-{selection.fingerprint()}-{len(selection)}r-{metric}-"
            f"{max_new_tokens}t-{prompt}-{dtype}-{parameter.device.type}.json")


def original_accuracy(loaded: LoadedModel, selection: Selection, metric: str = "auto", max_new_tokens: int = 16,
                      say: Say | None = None, split: bool = False) -> tuple[evaluate.AccuracyResult, bool]:
    """The unmodified model's accuracy on ``selection`` and whether this call computed it (else: cached).

    Only for a model loaded from a folder and not changed since (its fingerprint names its files);
    a model built in memory has no fingerprint and is always measured. ``split``: under ``accelerate launch``
    every process answers its share (``evaluate.accuracy(split=True)``); rank 0 decides whether the cache has
    it, so that all ranks measure together or none does, and rank 0 writes it.
    """
    from compression.methods import distributed

    def measure() -> evaluate.AccuracyResult:
        return evaluate.accuracy(loaded, selection.records, metric, max_new_tokens=max_new_tokens, split=split)

    if not loaded.fingerprint:
        return measure(), True
    path = original_accuracy_path(loaded, selection, metric, max_new_tokens)
    computed = False
    if split and distributed.launched_world_size() > 1:
        if not distributed.broadcast_object(path.is_file()):
            result = measure()
            if distributed.launched_rank() == 0:
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(dataclasses.asdict(result)))
                os.replace(tmp, path)
            distributed.gather_objects(None)  # every rank waits until rank 0 has written it
            computed = True
    elif not path.is_file():
        with computed_once(path.stem):
            if not path.is_file():
                result = measure()
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(dataclasses.asdict(result)))
                os.replace(tmp, path)
                computed = True
    stored = json.loads(path.read_text())
    if say is not None:
        say(f"original accuracy on {stored['n']} records: "
            + ("measured and cached" if computed else f"read from the cache ({path.name})"))
    return evaluate.AccuracyResult(**stored), computed
