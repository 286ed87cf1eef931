"""The models a user can pick without typing a path: the shipped reference model, the shipped
configs (what-if only) and finished runs. Paths only, no torch, so the dashboard's model picker
draws before torch and transformers are imported (issue 12)."""
from __future__ import annotations

from pathlib import Path

from compression.paths import cache_dir

REFERENCE_PATH = Path(__file__).resolve().parent.parent / "assets" / "reference"
CONFIGS_PATH = Path(__file__).resolve().parent.parent / "assets" / "configs"


def shipped_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIGS_PATH.glob("*.json"))}


def available_models(cache_root: Path | None = None) -> list[dict[str, str]]:
    """Models the user can pick without typing a path: the reference, shipped configs, finished runs."""
    rows = [{"name": "reference", "kind": "reference", "path": str(REFERENCE_PATH)}]
    rows += [{"name": f"config:{n}", "kind": "config", "path": str(p)} for n, p in shipped_configs().items()]
    runs = (cache_root or cache_dir()) / "runs"
    for run in sorted(runs.glob("*/model")) if runs.is_dir() else []:
        if (run / "config.json").is_file():
            rows.append({"name": f"run:{run.parent.name}", "kind": "local", "path": str(run)})
    return rows
