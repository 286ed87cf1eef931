"""CLI: ``run RECIPE``, ``jobs list|submit|cancel|resume|show``, ``export RUN --to DIR`` (and the internal ``worker``).

``run`` executes the pipeline in this process with a progress bar; ``jobs submit`` queues the
same recipe as a background job. Both go through ``compression.runs.pipeline.run_recipe``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from compression.cli.common import (UsageError, add_data_arguments, add_hardware_arguments, add_kernels_argument,
                                    data_source, emit)


def _recipe(path: str):
    from compression.runs.recipe import Recipe

    return Recipe.from_yaml(Path(path))


# ------------------------------------------------------------------------------------------- run

class _Bar:
    """One progress line on stderr: stage, a bar over recovery steps, loss."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None
        self.stage = None

    def __call__(self, stage: str, step: int, total: int, loss: float | None) -> None:
        if not self.enabled:
            if stage != self.stage:
                print(f"[{stage}]", file=sys.stderr, flush=True)
                self.stage = stage
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total or None, desc=stage, file=sys.stderr, leave=stage == "recover",
                            dynamic_ncols=True)
        if total and self.bar is not None:
            self.bar.total = total
            self.bar.n = step
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cmd_run(args) -> int:
    from compression.runs import pipeline
    from compression.paths import cache_dir

    recipe = _recipe(args.recipe)
    overrides = {k: v for k, v in (("device", args.device), ("dtype", args.dtype),
                                   ("kernels", getattr(args, "kernels", None))) if v}
    if overrides:  # a recipe written on a GPU machine runs here with --device cpu
        from compression.runs.recipe import HardwareSpec

        recipe.hardware = HardwareSpec(**{**recipe.hardware.model_dump(), **overrides})
    out = Path(args.out) if args.out else cache_dir() / "runs" / f"{recipe.name or Path(args.recipe).stem}-" \
                                                                  f"{time.strftime('%Y%m%d-%H%M%S')}"
    bar = _Bar(not args.json)
    try:
        metrics = pipeline.run_recipe(recipe, out, progress=bar, overwrite=args.overwrite)
    finally:
        bar.close()
    if not metrics:
        return 0  # under `accelerate launch`, a process other than rank 0: rank 0 reports and writes the run
    o, c = metrics["original"], metrics["compressed"]
    emit(args, {"path": str(out), "metrics": metrics},
         f"run folder {out}\n"
         f"accuracy {o['accuracy']:.1%} -> {c['accuracy']:.1%} ({metrics['kept']['accuracy'] or 0:.1%} kept); "
         f"params {o['params_total']:,} -> {c['params_total']:,}; "
         f"prefill {o['prefill_ms']:.1f} -> {c['prefill_ms']:.1f} ms")
    return 0


# ------------------------------------------------------------------------------------------- jobs

def _job_line(j: dict) -> str:
    progress = f"{j['step']}/{j['total']}" if j["total"] else "-"
    loss = f"{j['loss']:.4f}" if j["loss"] is not None else "-"
    eta = f"{j['eta_s']:.0f}s" if j["eta_s"] else "-"
    return f"{j['id']:<40} {j['state']:<10} {j['stage'] or '-':<9} {progress:>9} loss {loss:<8} eta {eta:<6}" + \
        (f" {j['error']}" if j["error"] else "")


def _cmd_jobs(args) -> int:
    from compression.runs import jobs

    if args.action == "list":
        rows = jobs.list_jobs()
        emit(args, {"jobs": rows}, "\n".join(_job_line(j) for j in rows) or "no jobs")
        return 0
    if args.action == "submit":
        if not args.target:
            raise UsageError("jobs submit needs a recipe file: python -m compression jobs submit RECIPE.yaml")
        job_id = jobs.submit(_recipe(args.target), name=args.name)
        emit(args, {"id": job_id, **jobs.get(job_id)}, job_id)
        return 0
    if not args.target:
        raise UsageError(f"jobs {args.action} needs a job id (see `python -m compression jobs list`)")
    if args.action == "cancel":
        job = jobs.cancel(args.target)
    elif args.action == "resume":
        job = jobs.resume(args.target)
    else:
        job = jobs.get(args.target)
    text = _job_line(job)
    if args.action == "show":
        text += "\n" + jobs.log_tail(args.target, args.lines)
        job = {**job, "log_tail": jobs.log_tail(args.target, args.lines)}
    emit(args, job, text)
    return 0


def _cmd_worker(args) -> int:
    from compression.runs import jobs

    return jobs.run_worker(args.job)


# ------------------------------------------------------------------------------------------- export

def _cmd_export(args) -> int:
    from compression.runs import export

    path = export.export_run(args.run, args.to, overwrite=args.overwrite, make_zip=not args.no_zip,
                             check_budget_bytes=_check_memory(args.check_memory))
    zipped = export.zip_path_for(path)
    check_file = path / "export_check.json"
    check = json.loads(check_file.read_text()) if check_file.is_file() else None
    emit(args, {"path": str(path), "zip": str(zipped) if zipped else None, "bytes": export.folder_bytes(path),
                "check": check},
         f"exported to {path}" + (f" (zip: {zipped})" if zipped else ""))
    return 0


def _check_memory(text: str) -> int | None | str:
    """``--check-memory``: auto, whole, or a size such as 2GB / 512MB (bytes for the export check's weights)."""
    import re

    value = text.strip().lower()
    if value in ("auto", "whole"):
        return "auto" if value == "auto" else None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gb|gib|mb|mib)", value)
    if not m:
        raise UsageError(f"--check-memory {text!r}: expected auto, whole, or a size such as 2GB or 512MB")
    unit = {"gb": 1e9, "gib": 1024 ** 3, "mb": 1e6, "mib": 1024 ** 2}[m.group(2)]
    return int(float(m.group(1)) * unit)


def _cmd_lmms_task(args) -> int:
    import re

    from compression.data.sources import open_source, select
    from compression.runs.lmms_task import write_task

    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", args.name):
        raise UsageError(f"--name {args.name!r}: expected a task name of letters, digits and '_'")
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples} must be at least 1")
    if not args.data:
        raise UsageError("lmms-task needs --data: 'shapes', a LLaVA-format .json/.jsonl file or a datasets folder")
    selection = select(open_source(data_source(args), "eval"), samples=args.samples, need_images=True,
                       on_error="skip" if args.skip_bad else "refuse")
    out = write_task(selection, args.out, args.name, args.metric, args.max_new_tokens)
    emit(args, {"path": str(out), "task": args.name, "records": len(selection)},
         f"wrote lmms-eval task {args.name!r} ({selection.describe()}) to {out}\n"
         f"run: lmms-eval --model llava_hf --model_args pretrained=<export folder> --tasks {args.name} "
         f"--include_path {out} --batch_size 1")
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="run a recipe headless (prune, recover, evaluate) and write a run folder")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--out", help="run folder to create (default: cache/runs/<name>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    add_hardware_arguments(p)
    add_kernels_argument(p, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("jobs", help="background jobs: list, submit RECIPE, cancel ID, resume ID, show ID")
    p.add_argument("action", choices=("list", "submit", "cancel", "resume", "show"))
    p.add_argument("target", nargs="?", help="recipe file (submit) or job id")
    p.add_argument("--name", help="job name (submit)")
    p.add_argument("--lines", type=int, default=20, help="log lines to show (show)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_jobs)

    p = sub.add_parser("worker", help=argparse.SUPPRESS)  # internal: started by compression.runs.jobs
    p.add_argument("job")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("export", help="export a run as a Hugging Face folder (safetensors) + model card")
    p.add_argument("run", help="run name (cache/runs/NAME) or run folder")
    p.add_argument("--to", required=True, help="export folder, or a bare name for cache/exports/NAME")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    p.add_argument("--no-zip", action="store_true", help="do not write NAME.zip beside the folder")
    p.add_argument("--check-memory", default="auto",
                   help="memory the reload check may keep weights in: auto (whole while the model takes at most a "
                        "quarter of the free memory, else 5%% of it, the rest read from the shards as needed), "
                        "whole, or a size such as 2GB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("lmms-task", help="a local lmms-eval task from your data, scored by the studio's own code")
    add_data_arguments(p, "records of the task")
    p.add_argument("--samples", type=int, default=500, help="the first N records with an image")
    p.add_argument("--metric", default="auto", choices=["auto", "exact_match", "multiple_choice", "yes_no"])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--name", default="studio_task", help="lmms-eval task name")
    p.add_argument("--out", required=True, help="task folder to create")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_lmms_task)
