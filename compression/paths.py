"""Where the runtime store lives: ``cache/`` at the repository root, or ``$COMPRESSION_CACHE``."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The runtime store (jobs DB, importance results, runs, exports); created on first use."""
    path = Path(os.environ.get("COMPRESSION_CACHE", REPO_ROOT / "cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path
