"""``python -m compression <subcommand>``: the pipeline headless (contract in shared/DESIGN.md).

Each subcommand lives in a small ``register(subparsers)`` function; bad input prints one line
on stderr and exits with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from compression.cli.common import (UsageError, add_data_arguments, add_hardware_arguments, add_kernels_argument,
                                    data_source, emit, load_model)


# ------------------------------------------------------------------------------------------ eval / ask / models

def _cmd_eval(args) -> int:
    from compression.data.sources import open_source, select
    from compression.measure.evaluate import evaluate

    if args.samples < 1:
        raise UsageError(f"--samples {args.samples} must be at least 1")
    source = open_source(data_source(args), "eval")
    selection = select(source, samples=args.samples, need_images=True,
                       on_error="skip" if args.skip_bad else "refuse")
    loaded = load_model(args)
    if not loaded.has_weights:
        raise UsageError(f"model {args.model} is config-only (no weights); eval needs weights — use `plan` for what-if")
    report = evaluate(loaded, selection, metric=args.metric, measure_latency=not args.no_latency,
                      max_new_tokens=args.max_new_tokens, kernels=args.kernels).to_dict()
    per_type = ", ".join(f"{k} {v:.1%}" for k, v in report["per_type"].items())
    details = ", ".join(f"{k} {v:.3f}" for k, v in report["details"].items())
    lat = (f"prefill {report['prefill_ms']:.1f} ms, decode {report['decode_tokens_per_s']:.0f} tok/s "
           f"({report['kernels']} kernels)"
           if report["prefill_ms"] is not None else "latency not measured")
    emit(args, report, f"{report['metric'].replace('_', ' ')} {report['accuracy']:.1%} on {report['data']}"
                       + (f" ({per_type})" if per_type else "") + (f"; {details}" if details else "") + "\n"
                       f"prompted with {report['prompt']}\n"
                       f"params {report['params_total']:,} (language {report['params_language']:,}), "
                       f"{report['size_bytes'] / 1e6:.1f} MB, {lat}")
    return 0


def _cmd_ask(args) -> int:
    from compression.data.images import load_image
    from compression.measure.evaluate import ask

    if args.data is not None or args.record is not None:
        if args.image or args.question:
            raise UsageError("give either --image and --question, or --data and --record, not both")
        from compression.data.sources import open_source

        record = open_source(data_source(args), "eval").record(args.record or 0)
        if not record.images:
            raise UsageError(f"record {record.index} of {args.data} has no image; expected an image-question record")
        image, question, expected = record.images[0], record.question, record.answer
    else:
        if not args.image or args.question is None:
            raise UsageError("ask needs --image PATH and --question TEXT (or --data SOURCE --record N)")
        if not args.question.strip():
            raise UsageError("--question is empty; expected a question about the image")
        image, question, expected = load_image(args.image), args.question, None
    loaded = load_model(args)
    if not loaded.has_weights:
        raise UsageError(f"model {args.model} is config-only (no weights); it cannot answer")
    answer, ms = ask(loaded, image, question)
    emit(args, {"answer": answer, "latency_ms": ms, "question": question, "expected": expected,
                "prompt": loaded.prompt.name},
         answer + (f"\n(expected: {expected})" if expected is not None else "") + f"\n(prompted with {loaded.prompt.name})")
    return 0


def _cmd_models(args) -> int:
    from compression.models import available_models

    rows = available_models()
    emit(args, {"models": rows}, "\n".join(f"{r['name']:<28} {r['kind']:<10} {r['path']}" for r in rows))
    return 0


def _register_core(sub) -> None:
    p = sub.add_parser("eval", help="accuracy on your data (or the reference's test split), size and latency")
    p.add_argument("--model", required=True)
    add_data_arguments(p, "records to score")
    p.add_argument("--samples", type=int, default=500, help="the first N records with an image")
    p.add_argument("--metric", default="auto", choices=["auto", "exact_match", "multiple_choice", "yes_no"],
                   help="auto: multiple choice when records carry choices, yes/no when every answer is, else exact match")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--no-latency", action="store_true")
    add_hardware_arguments(p)
    add_kernels_argument(p)
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("ask", help="one answer to a question about an image")
    p.add_argument("--model", required=True)
    p.add_argument("--image")
    p.add_argument("--question")
    add_data_arguments(p, "take the image and question from a record of this data")
    p.add_argument("--record", type=int, help="record index in --data")
    add_hardware_arguments(p)
    p.set_defaults(func=_cmd_ask)
    p = sub.add_parser("models", help="models available without typing a path")
    p.set_defaults(func=_cmd_models)


def _registrars() -> list[Callable]:
    from compression.cli import convert as cli_convert
    from compression.cli import runs as cli_jobs
    from compression.cli import prune as cli_prune
    from compression.cli import sweep as cli_sweep

    return [_register_core, cli_prune.register, cli_jobs.register, cli_convert.register, cli_sweep.register]


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
    from compression.data.records import DataError
    from compression.models import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr carries our one-line errors and our own progress bar only
    try:
        return args.func(args) or 0
    except (UsageError, ModelLoadError, DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
