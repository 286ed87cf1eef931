"""What every command module shares: the bad-input error and the output helper."""
from __future__ import annotations

import argparse
import json
from typing import Any


class UsageError(ValueError):
    """Bad input from the command line."""


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, indent=1, default=str) if getattr(args, "json", False) else text)


def add_data_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """``--data`` and its companions, the same on every command that reads data."""
    p.add_argument("--data", help=f"{what}: 'shapes' (the reference model's built-in set; its default), a LLaVA-format "
                                  ".json/.jsonl file, or a Hugging Face dataset folder / parquet file")
    p.add_argument("--image-root", help="folder the records' image paths are relative to (default: the file's folder)")
    p.add_argument("--columns", help="dataset column names when they differ, e.g. question=prompt,answer=label")
    p.add_argument("--split", help="split of a dataset folder (or of shapes: train, val, test)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted) instead of stopping at the first")


def data_source(args: argparse.Namespace) -> dict | str:
    """The data source the arguments name; ``shapes`` only for the reference model (never silently)."""
    if not args.data:
        if args.model == "reference":
            return {"path": "shapes", "split": args.split} if args.split else "shapes"
        raise UsageError(f"--data is required for model {args.model}: its own data (a LLaVA .json/.jsonl file or a "
                         "datasets folder); shapes are only the reference model's data")
    columns = {}
    for pair in filter(None, (args.columns or "").split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--columns {args.columns!r}: expected key=column pairs such as question=prompt,answer=label")
        columns[key.strip()] = value.strip()
    value: dict = {"path": args.data}
    if args.image_root:
        value["image_root"] = args.image_root
    if columns:
        value["columns"] = columns
    if args.split:
        value["split"] = args.split
    return value
