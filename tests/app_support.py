"""Shared pieces of the dashboard's AppTests (``tests/test_app_*.py``): the app path, a tiny model
folder, and a finished run made by the real pipeline on that tiny model (no recovery, 4 test
questions, latency timed once) so Results / Compare / Export have something true to show."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
TIMEOUT = 240  # generous: the suite shares 2 busy cores; these tests assert behaviour, not speed
# One intra-op thread: on two cores shared with other processes, two spinning threads per process
# made the tiny models' forward passes ~10x slower.
torch.set_num_threads(1)


def app(source: str, page: str | None = None, data: str | dict | None = "shapes", **state) -> AppTest:
    """The app with ``source`` and ``data`` chosen (the tiny models speak the shapes vocabulary), run once,
    switched to ``pages/<page>.py`` and run again."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_source"] = source
    at.session_state["data_source"] = data
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    if page is not None:
        at.switch_page(f"pages/{page}.py").run()
    return at


def tiny_folder(root: Path) -> str:
    return str(save_tiny(root / "tiny-model", "llama", "clip", layers=8))


def make_run(cache: Path, original: str, name: str, keep_ratio: float = 1.0) -> Path:
    """``cache/runs/<name>``: the tiny model layer-pruned by ``compression.runs.pipeline.run_recipe``."""
    import pytest

    from compression.measure import evaluate
    from compression.runs import pipeline
    from compression.runs.recipe import Recipe

    recipe = Recipe.from_dict({"name": name, "model": original, "prune": {"method": "layer", "ratio": 0.3},
                               "visual_tokens": {"keep_ratio": keep_ratio, "scorer": "attention"},
                               "data": {"calibration": "shapes", "eval": {"source": "shapes", "samples": 4}}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESSION_CACHE", str(cache))
        patch.setattr(evaluate, "latency", functools.partial(evaluate.latency, repeats=1, warmup=0, decode_tokens=2))
        pipeline.run_recipe(recipe, cache / "runs" / name)
    return cache / "runs" / name
