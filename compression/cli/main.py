"""``python -m compression <subcommand>``: the pipeline headless (contract in shared/DESIGN.md).

Each subcommand lives in a small ``register(subparsers)`` function; bad input prints one line
on stderr and exits with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from compression.cli.common import UsageError, emit
from compression.data import shapes as data


def _load(source: str, **kwargs):
    from compression.models import load

    return load(source, **kwargs)


# ------------------------------------------------------------------------------------------ eval / ask / models

def _cmd_eval(args) -> int:
    from compression.measure.evaluate import evaluate

    if args.samples < 1:
        raise UsageError(f"--samples {args.samples} must be at least 1")
    loaded = _load(args.model)
    if not loaded.has_weights:
        raise UsageError(f"model {args.model} is config-only (no weights); eval needs weights — use `plan` for what-if")
    report = evaluate(loaded, data.load_split("test", args.samples), measure_latency=not args.no_latency).to_dict()
    per_type = ", ".join(f"{k} {v:.1%}" for k, v in report["per_type"].items())
    lat = (f"prefill {report['prefill_ms']:.1f} ms, decode {report['decode_tokens_per_s']:.0f} tok/s"
           if report["prefill_ms"] is not None else "latency not measured")
    emit(args, report, f"accuracy {report['accuracy']:.1%} on {report['samples']} test questions ({per_type})\n"
                       f"params {report['params_total']:,} (language {report['params_language']:,}), "
                       f"{report['size_bytes'] / 1e6:.1f} MB, {lat}")
    return 0


def _cmd_ask(args) -> int:
    from compression.measure.evaluate import ask

    if not args.question.strip():
        raise UsageError("--question is empty; expected a question about the image")
    image = data.load_image(args.image)
    loaded = _load(args.model)
    if not loaded.has_weights:
        raise UsageError(f"model {args.model} is config-only (no weights); it cannot answer")
    answer, ms = ask(loaded, image, args.question)
    emit(args, {"answer": answer, "latency_ms": ms}, answer)
    return 0


def _cmd_models(args) -> int:
    from compression.models import available_models

    rows = available_models()
    emit(args, {"models": rows}, "\n".join(f"{r['name']:<28} {r['kind']:<10} {r['path']}" for r in rows))
    return 0


def _register_core(sub) -> None:
    p = sub.add_parser("eval", help="accuracy on the held-out split, size and latency")
    p.add_argument("--model", required=True)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--no-latency", action="store_true")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("ask", help="one answer to a question about an image")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.set_defaults(func=_cmd_ask)
    p = sub.add_parser("models", help="models available without typing a path")
    p.set_defaults(func=_cmd_models)


def _registrars() -> list[Callable]:
    from compression.cli import runs as cli_jobs
    from compression.cli import prune as cli_prune

    return [_register_core, cli_prune.register, cli_jobs.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m compression", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _registrars():
        register(sub)
    for p in sub.choices.values():
        if not any(a.dest == "json" for a in p._actions):
            p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    from compression.data.shapes import DataFormatError
    from compression.models import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (UsageError, ModelLoadError, DataFormatError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
