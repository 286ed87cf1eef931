"""What every command module shares: the bad-input error, the output helper, the data and hardware options."""
from __future__ import annotations

import argparse
import json
from typing import Any


class UsageError(ValueError):
    """Bad input from the command line."""


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """The command's result: JSON with ``--json``, else text; both say the hardware a model ran on, when one
    was loaded (``load_model``)."""
    label = getattr(args, "hardware_label", None)
    if label:
        payload = {**payload, "hardware": payload.get("hardware", label)}
        text = f"{text}\n(hardware: {label})"
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


def add_hardware_arguments(p: argparse.ArgumentParser) -> None:
    """``--device`` / ``--dtype``, the same on every command that loads a model (``compression.hardware``)."""
    p.add_argument("--device", help="auto (default: the first GPU where one is visible, else the CPU), cpu, cuda, "
                                    "cuda:N or mps; overrides a recipe's hardware.device")
    p.add_argument("--dtype", help="auto (default: bf16 on a GPU that has it, else fp32), bf16, fp16 or fp32; "
                                   "overrides a recipe's hardware.dtype")


def add_kernels_argument(p: argparse.ArgumentParser, default: str | None = "eager") -> None:
    """``--kernels``, on the commands that time models (``compression.models.kernels``)."""
    p.add_argument("--kernels", default=default, choices=["eager", "onednn"],
                   help="what latency is timed on: eager (PyTorch's own linears) or onednn (CPU linears on "
                        "pre-packed weights, faster on short sequences; needs one more copy of the weights)"
                        + ("; overrides a recipe's hardware.kernels" if default is None else ""))


def hardware(args: argparse.Namespace, device: str = "auto", dtype: str = "auto"):
    """The resolved device and precision (the flags over the given defaults). Raises ``HardwareError`` (one
    line; exit 2) for what is not there."""
    from compression.hardware import resolve

    return resolve(getattr(args, "device", None) or device, getattr(args, "dtype", None) or dtype)


def load_model(args: argparse.Namespace, source: str | None = None):
    """``compression.models.load`` of ``--model`` (or ``source``) on the chosen device, in the chosen precision."""
    from compression.models import load

    chosen = hardware(args)
    loaded = load(source or args.model, device=chosen.device, dtype=chosen.dtype)
    args.hardware_label = chosen.label  # emit() reports it with the result
    return loaded
