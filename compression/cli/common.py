"""What every command module shares: the bad-input error and the output helper."""
from __future__ import annotations

import argparse
import json
from typing import Any


class UsageError(ValueError):
    """Bad input from the command line."""


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, indent=1, default=str) if getattr(args, "json", False) else text)
