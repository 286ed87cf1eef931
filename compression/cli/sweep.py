"""CLI: ``sweep SPEC`` runs a grid of recipes as one group of background jobs and prints its front.

    python -m compression sweep SPEC [--yes] [--detach] [--json] [--save-study DIR]
    python -m compression sweep list | show ID | resume ID | cancel ID

``sweep SPEC`` says how many runs and about how long, queues them (``compression.runs.sweep``
on the one job runner, ``compression.runs.jobs``), follows them to the end and prints each run
and the front; ``--detach`` returns once queued. Interrupting the wait leaves the jobs running:
``sweep show ID`` follows up, ``sweep cancel ID`` stops every queued and running job of the
sweep, ``sweep resume ID`` re-queues its failed and cancelled ones and follows them again.
``--json`` prints ``{"id", "runs": [{"name", "recipe", "metrics"}], "front": [names], ...}``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from compression.cli.common import UsageError, emit

ACTIONS = ("list", "show", "resume", "cancel")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_line(row: dict) -> str:
    size = f"{row['size_bytes'] / 1e6:.2f} MB"
    prefill = f"{row['prefill_ms']:.1f} ms" if row.get("prefill_ms") else "-"
    return f"{row['name']:<56} {row['accuracy']:6.1%} {size:>9} {prefill:>9}  {row['recipe']}"


def _table(result: dict) -> str:
    from compression.runs import sweep

    rows = sweep.points(result["runs"])
    on_front = set(result["fronts"]["size"])
    lines = [f"sweep {result['id']}: {result['finished']}/{result['total']} finished, "
             f"{result['counts']['succeeded']} succeeded",
             f"  {'run':<56} {'acc':>6} {'size':>9} {'prefill':>9}  recipe"]
    lines += [("* " if r["name"] in on_front else "  ") + _run_line(r) for r in rows]
    lines.append("* on the accuracy-vs-size Pareto front (measured)")
    lines += [f"  {j['name']}: {j['state']}: {j['error']}" for j in result["jobs"] if j["state"] in ("failed", "cancelled")]
    return "\n".join(lines)


def _follow(sweep_id: str) -> dict:
    """Wait for every job of the sweep to finish, one line on stderr as each one does."""
    from compression.runs import jobs, sweep

    reported: set[str] = set()
    started = time.time()
    try:
        while True:
            rows = sorted(jobs.list_jobs(sweep=sweep_id), key=lambda j: (j["created"], j["id"]))
            for j in rows:
                if j["state"] in jobs.FINISHED and j["id"] not in reported:
                    reported.add(j["id"])
                    tail = f": {j['error']}" if j["error"] else ""
                    _say(f"[{len(reported)}/{len(rows)}] {j['id']} {j['state']}{tail} "
                         f"({time.time() - started:.0f} s since launch)")
            if len(reported) == len(rows):
                return sweep.results(sweep_id)
            time.sleep(1.0)
    except KeyboardInterrupt:
        _say(f"stopped following; sweep {sweep_id} keeps running. `python -m compression sweep show {sweep_id}` "
             f"follows up, `python -m compression sweep cancel {sweep_id}` stops it")
        raise


def _emit_result(args, result: dict) -> int:
    emit(args, result, _table(result))
    failed = result["total"] - result["counts"]["succeeded"]
    if result["done"] and failed:
        _say(f"{failed} of {result['total']} runs did not succeed; `python -m compression sweep resume {result['id']}` "
             "runs them again")
        return 1
    return 0


def _cmd_sweep(args) -> int:
    from compression.runs import jobs, studies, sweep

    target = args.spec
    if target in ACTIONS:
        if target == "list":
            rows = jobs.list_sweeps()
            emit(args, {"sweeps": rows}, "\n".join(
                f"{s['id']:<44} {s['finished']}/{s['total']} finished, {s['counts']['succeeded']} succeeded"
                for s in rows) or "no sweeps")
            return 0
        if not args.id:
            raise UsageError(f"sweep {target} needs a sweep id (see `python -m compression sweep list`)")
        if target == "cancel":
            jobs.cancel_sweep(args.id)
            return _emit_result(args, sweep.results(args.id))
        if target == "resume":
            requeued = sum(j["state"] in ("queued", "running") for j in jobs.resume_sweep(args.id))
            _say(f"sweep {args.id}: {requeued} runs queued again")
            if args.detach:
                return _emit_result(args, sweep.results(args.id))
            return _emit_result(args, _follow(args.id))
        return _emit_result(args, sweep.results(args.id))

    if args.id:
        raise UsageError(f"sweep {target}: unexpected second argument {args.id!r}; expected "
                         f"`sweep SPEC` or `sweep {'|'.join(ACTIONS)} ID`")
    spec = sweep.SweepSpec.from_yaml(Path(target))
    points = spec.points()
    sweep.check_count(spec.name, len(points), args.yes)
    sweep.check_budgets(points)
    _say(f"sweep {spec.name}: {sweep.estimate(points)}")
    started = time.time()
    sweep_id = sweep.launch(spec, yes=args.yes)
    _say(f"queued as sweep {sweep_id}")
    if args.detach:
        emit(args, {"id": sweep_id, "runs": [p.run_name for p in points]}, sweep_id)
        return 0
    result = _follow(sweep_id)
    wall = time.time() - started
    _say(f"sweep {sweep_id} finished in {wall:.0f} s")
    if args.save_study:
        if result["counts"]["succeeded"] != result["total"]:
            _say(f"not saving the study: {result['total'] - result['counts']['succeeded']} runs did not succeed")
        else:
            command = " ".join(["python -m compression sweep", target, *(["--yes"] if args.yes else []),
                                "--save-study", args.save_study])
            folder = studies.save(Path(args.save_study), result, command, wall)
            _say(f"study written to {folder / 'study.json'}")
    return _emit_result(args, result)


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of recipes as one group of jobs and print its Pareto front; "
                                     "or: sweep list | show ID | resume ID | cancel ID")
    p.add_argument("spec", help="sweep spec YAML (base recipe + axes), or one of: " + ", ".join(ACTIONS))
    p.add_argument("id", nargs="?", help="sweep id (show, resume, cancel)")
    p.add_argument("--yes", action="store_true", help="launch a grid of more than 200 runs")
    p.add_argument("--detach", action="store_true", help="return once queued instead of following the runs")
    p.add_argument("--save-study", metavar="DIR", help="when every run succeeded, write DIR/study.json and "
                                                       "DIR/sweep.yaml (a shipped study)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_sweep)
