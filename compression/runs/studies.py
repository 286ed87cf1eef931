"""Shipped studies: sweeps of the reference model kept as small data (run metrics and recipes, no
weights) in ``compression/assets/studies/<name>/``, so that a fresh clone has a measured front to
look at before it has run anything:

    sweep.yaml   the spec; re-run it with ``python -m compression sweep compression/assets/studies/<name>/sweep.yaml``
    study.json   what that sweep measured: ``name, command, made, wall_s, machine, spec`` and
                 ``runs: [{name, recipe, metrics, job_wall_s}]`` (``metrics`` as in a run's metrics.json)

``python -m compression sweep SPEC --save-study DIR`` writes both when every run succeeded.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from compression.paths import REPO_ROOT
from compression.runs import sweep

STUDIES_DIR = REPO_ROOT / "compression" / "assets" / "studies"


def shipped(root: Path | None = None) -> list[dict[str, Any]]:
    """Every study under ``root`` (default: the shipped ones), by name, each with its front recomputed."""
    root = root or STUDIES_DIR
    studies = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if (folder / "study.json").is_file():
            studies.append(load(folder))
    return studies


def load(folder: Path) -> dict[str, Any]:
    study = json.loads((folder / "study.json").read_text())
    spec = folder / "sweep.yaml"
    return {**study, **sweep.summarize(study["runs"]), "folder": str(folder),
            "rerun": f"python -m compression sweep {_shown(spec)}" + (" --yes" if len(study["runs"]) > sweep.MAX_RUNS
                                                                        else "")}


def save(folder: Path, result: dict[str, Any], command: str, wall_s: float) -> Path:
    """Write ``study.json`` and ``sweep.yaml`` for a finished sweep (``sweep.results``), each
    written under a temporary name and renamed."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    walls = {j["id"]: j["finished"] - j["started"] for j in sweep.jobs.list_jobs(sweep=result["id"])
             if j.get("started") and j.get("finished")}
    study = {
        "name": result["name"], "command": command, "made": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": round(wall_s, 1),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "spec": result["spec"],
        "runs": [{**run, "job_wall_s": round(walls[run["name"]], 2) if run["name"] in walls else None}
                 for run in result["runs"]],
    }
    for name, text in (("study.json", json.dumps(study, indent=1, default=str) + "\n"), ("sweep.yaml", result["spec"])):
        if name == "sweep.yaml" and (folder / name).is_file() and \
                sweep.SweepSpec.from_yaml(folder / name).to_dict() == sweep.SweepSpec.from_yaml(text).to_dict():
            continue  # the same spec: keep the file as written, comments and all
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, folder / name)
    return folder


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
