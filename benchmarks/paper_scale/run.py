"""The paper's experiments at the paper's scale: LLaVA-1.5-7B, LLaVA-1.5's instruction mix, one GPU machine.

    # here (no GPU, no weights): validate and plan every run on the shipped 7B config, print the estimates
    .venv/bin/python benchmarks/paper_scale/run.py check
    # on the GPU machine (paths are arguments or the environment variables named in --help):
    .venv/bin/python benchmarks/paper_scale/run.py grid --model /data/llava-1.5-7b-hf \
        --train-json /data/llava/llava_v1_5_mix665k.json --image-folder /data/llava \
        --eval-data /data/scienceqa/test.json --eval-image-folder /data/scienceqa
    .venv/bin/python benchmarks/paper_scale/run.py qapruner --model /data/llava-1.5-7b-hf \
        --eval-data /data/scienceqa/test.json --eval-image-folder /data/scienceqa

``grid``: the main grid of Huang et al. (arXiv 2507.20749), layerwise and widthwise pruning of 15 / 30 / 45 % of
the language model, without recovery and with SFT + hidden-state L2 distillation on 5 % of the mix
(``grid.yaml``, a sweep spec run by ``python -m compression sweep``, the studio's one job runner); writes
``paper_grid.md`` / ``.csv`` (accuracy kept, as ``benchmarks/results/recovery.md``). ``qapruner``: the QAPruner
study (arXiv 2604.02816), 12.5 % of visual tokens under simulated W4A4, semantic vs hybrid scoring, through
``benchmarks/bench_tokens.py`` (its ``tokens.md`` / CSVs). ``check``: the same recipes validated and planned on
a config (no weights), with a roofline estimate of the GPU time (``compression.measure.whatif``; an estimate,
not a measurement). Output goes to ``--out`` (default ``benchmarks/results/paper_scale``).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

SPEC = HERE / "grid.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "paper_scale"
MIX_RECORDS = 665_298          # llava_v1_5_mix665k.json (LLaVA-1.5 paper, Table 7: 665K)
# Assumptions of the estimate, named where they are used: tokens per training record (576 visual + the
# conversation's text, LLaVA-1.5's mix averages a few hundred text tokens), the fraction of peak a training
# step reaches (MFU), and the answer length scored in evaluation.
TOKENS_PER_RECORD = 900
TRAINING_MFU = 0.4
EVAL_NEW_TOKENS = 8
PARAMETERS = {  # name: (environment variable, help)
    "model": ("PAPER_MODEL", "llava-1.5-7b-hf folder (or a hub id in the local cache)"),
    "train_json": ("PAPER_TRAIN_JSON", "llava_v1_5_mix665k.json"),
    "image_folder": ("PAPER_IMAGE_FOLDER", "folder the mix's image paths are relative to (coco/, gqa/, ...)"),
    "eval_data": ("PAPER_EVAL_DATA", "held-out records to score: a LLaVA-format .json/.jsonl or a datasets folder"),
    "eval_image_folder": ("PAPER_EVAL_IMAGE_FOLDER", "folder the evaluation records' image paths are relative to"),
}


def render(spec_path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """The sweep spec with its ``$NAMES`` filled in; an ``image_root`` left empty is dropped (the data file's
    own folder is then the image root)."""
    raw = yaml.safe_load(spec_path.read_text())

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: fill(v) for k, v in node.items()}
            return {k: v for k, v in out.items() if not (k == "image_root" and v in (None, ""))}
        if isinstance(node, list):
            return [fill(v) for v in node]
        if isinstance(node, str) and node.startswith("$"):
            name = node[1:].lower()
            if name not in values:
                raise SystemExit(f"error: {spec_path.name} names ${node[1:]}, which run.py does not fill")
            return values[name]
        return node

    return fill(copy.deepcopy(raw))


def spec_for(args: argparse.Namespace, need_data: bool = True):
    from compression.runs.sweep import SweepSpec

    values = {"eval_samples": args.eval_samples}
    for name, (env, _) in PARAMETERS.items():
        value = getattr(args, name, None) or os.environ.get(env)
        if value is None and need_data and name not in ("eval_image_folder", "image_folder"):
            raise SystemExit(f"error: --{name.replace('_', '-')} (or ${env}) is required: {PARAMETERS[name][1]}")
        values[name] = value
    return SweepSpec.from_dict(render(SPEC, values), SPEC.name)


# ------------------------------------------------------------------------------------------ check (no GPU)

def estimate(points, hardware: str, eval_samples: int) -> list[dict[str, Any]]:
    """Per point: the plan on the config and a roofline GPU-time estimate (what-if; not a measurement)."""
    from compression.methods import prune
    from compression.measure.whatif import HARDWARE, what_if
    from compression.models import load

    profile = HARDWARE[hardware]
    rows, models = [], {}
    for p in points:
        r = p.recipe
        if r.model not in models:
            models[r.model] = load(r.model)
        source = models[r.model]
        plan = prune.make_plan(source, r.prune.method, ratio=r.prune.ratio, layer_range=r.prune.layer_range)
        before, after = what_if(source, None, hardware), what_if(source, plan, hardware)
        records = round(MIX_RECORDS * r.data.train.fraction) if r.recovery.mode != "none" else 0
        tokens = records * TOKENS_PER_RECORD * r.recovery.epochs
        # student forward + backward (6 N T) and the frozen teacher's forward (2 N T), bf16 at an assumed MFU
        flops = 6 * after["params_total"] * tokens + (2 * before["params_total"] * tokens
                                                      if r.recovery.distillation != "none" else 0)
        train_s = flops / (profile.peak_flops * TRAINING_MFU)
        per_answer = lambda w: w["prefill_ms"] / 1e3 + EVAL_NEW_TOKENS * w["decode_ms_per_token"] / 1e3  # noqa: E731
        eval_s = eval_samples * per_answer(after)
        # memory of full finetuning with AdamW under bf16 mixed precision (shared/DESIGN.md's facts): weights 2,
        # gradients 2, two fp32 states 8, fp32 master 4 bytes per trained parameter; the teacher's bf16 weights
        trained = after["params_total"] - after["params_vision"]
        memory = (16 * trained + 2 * after["params_vision"] + 2 * before["params_total"]
                  if r.recovery.mode == "full" else 2 * after["params_total"])
        rows.append({"run": p.run_name, "method": r.prune.method, "ratio": r.prune.ratio,
                     "achieved": plan.ratio_achieved, "recovery": "SFT + hidden KD" if r.recovery.mode != "none"
                     else "none", "params_after": after["params_total"], "bf16_gb": after["bytes"]["bf16"] / 1e9,
                     "prefill_ms": after["prefill_ms"], "train_records": records, "train_h": train_s / 3600,
                     "eval_h": eval_s / 3600, "memory_gb": memory / 1e9})
    return rows


def cmd_check(args: argparse.Namespace) -> int:
    from compression.runs import sweep

    for name in ("model", "train_json", "eval_data"):  # config-only: placeholders stand in for absent data
        if not (getattr(args, name, None) or os.environ.get(PARAMETERS[name][0])):
            setattr(args, name, "config:llava-1.5-7b" if name == "model" else f"/absent/{name}.json")
    spec = spec_for(args)
    points = spec.points()
    sweep.check_budgets(points)
    rows = estimate(points, args.hardware, args.eval_samples)
    lines = [f"{len(points)} runs of {SPEC.name} validate and plan on {args.model} "
             f"(what-if on {args.hardware}; estimates, not measurements):",
             f"  {'run':<44} {'achieved':>8} {'params':>7} {'bf16':>7} {'prefill':>8} {'train':>7} {'eval':>6} "
             f"{'memory':>7}"]
    for r in rows:
        lines.append(f"  {r['run']:<44} {r['achieved']:>8.1%} {r['params_after'] / 1e9:>6.2f}B {r['bf16_gb']:>5.1f}GB "
                     f"{r['prefill_ms']:>6.1f}ms {r['train_h']:>6.2f}h {r['eval_h']:>5.2f}h {r['memory_gb']:>5.0f}GB")
    total = sum(r["train_h"] + r["eval_h"] for r in rows)
    lines.append(f"total about {total:.1f} GPU-hours on one {args.hardware} (training at {TRAINING_MFU:.0%} MFU, "
                 f"{TOKENS_PER_RECORD} tokens a record; evaluation {args.eval_samples} records x {EVAL_NEW_TOKENS} "
                 "new tokens, batch 1; loading, pruning and scoring not counted)")
    print("\n".join(lines))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


# ------------------------------------------------------------------------------------------ grid / qapruner (GPU)

def write_tables(result: dict[str, Any], out: Path, command: str) -> Path:
    """``paper_grid.md`` / ``.csv`` from the sweep's JSON: accuracy kept per method x budget x recovery."""
    rows = []
    for run in result["runs"]:
        m, recipe = run["metrics"], run["recipe"]
        rows.append({"run": run["name"], "method": recipe["prune"]["method"], "ratio": recipe["prune"]["ratio"],
                     "achieved": m["plan"]["ratio_achieved"], "recovery": recipe["recovery"]["mode"],
                     "original_accuracy": m["original"]["accuracy"], "accuracy": m["compressed"]["accuracy"],
                     "kept": m["kept"]["accuracy"], "size_bytes": m["compressed"]["size_bytes"],
                     "recover_s": m["timings"].get("recover_s"), "total_s": m["timings"].get("total_s")})
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "paper_grid.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "paper_grid.csv")
    first = result["runs"][0]["metrics"]
    lines = ["# Structural pruning + recovery at paper scale (measured)", "",
             f"Command: `{command}`. Original accuracy {first['original']['accuracy']:.1%} on {first['eval_data']}. "
             "Recovery: SFT + hidden-state L2 KD, one epoch on a seeded 5 % of the training mix. "
             "Cells: accuracy kept vs the original (%).", "",
             "| method | budget | none | SFT + hidden KD | recovery wall (s) |", "| --- | --- | --- | --- | --- |"]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["ratio"], r["achieved"]), {})[r["recovery"]] = r
    for (method, ratio, achieved), by in cells.items():
        kept = [f"{100 * by[k]['kept']:.1f}" if k in by else "-" for k in ("none", "full")]
        wall = f"{by['full']['recover_s']:.0f}" if "full" in by and by["full"]["recover_s"] else "-"
        lines.append(f"| {method} | {ratio:.0%} (achieved {achieved:.1%}) | {kept[0]} | {kept[1]} | {wall} |")
    lines += ["", "Paper (IJCV, LLaVA-1.5-7B, average % kept over 9 benchmarks): SFT + L2 KD layer 15 % 98.10, "
              "layer 30 % 96.38, width 45 % 83.99; no recovery width 15 % 90.87, width 30 % 79.88, layer 15 % 72.22, "
              "layer 30 % 69.18. The records scored here are not the paper's nine benchmarks."]
    tmp = out / "paper_grid.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "paper_grid.md")
    return out / "paper_grid.md"


def cmd_grid(args: argparse.Namespace) -> int:
    spec = spec_for(args)
    spec.points()  # one-line refusal here, before anything is queued
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rendered = out / "grid.yaml"
    rendered.write_text(spec.to_yaml())
    command = [sys.executable, "-m", "compression", "sweep", str(rendered), "--json"]
    print("running:", " ".join(command), flush=True)
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    (out / "paper_grid.json").write_text(proc.stdout)
    if not proc.stdout.strip():
        print(f"error: the sweep printed nothing (exit {proc.returncode}); see its stderr above", file=sys.stderr)
        return proc.returncode or 1
    table = write_tables(json.loads(proc.stdout), out, "python benchmarks/paper_scale/run.py grid ...")
    print(table.read_text())
    return proc.returncode


def cmd_qapruner(args: argparse.Namespace) -> int:
    model = args.model or os.environ.get(PARAMETERS["model"][0])
    data = args.eval_data or os.environ.get(PARAMETERS["eval_data"][0])
    images = args.eval_image_folder or os.environ.get(PARAMETERS["eval_image_folder"][0])
    if not model or not data:
        raise SystemExit("error: qapruner needs --model and --eval-data (or $PAPER_MODEL and $PAPER_EVAL_DATA)")
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_tokens.py"), "--model", model, "--data", data,
               "--samples", str(args.eval_samples), "--device", args.device, "--dtype", args.dtype,
               "--batch-size", "16", "--max-new-tokens", str(EVAL_NEW_TOKENS), "--out", str(args.out / "qapruner")]
    if images:
        command += ["--image-root", images]
    print("running:", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("check", cmd_check), ("grid", cmd_grid), ("qapruner", cmd_qapruner)):
        p = sub.add_parser(name)
        for param, (env, help_text) in PARAMETERS.items():
            p.add_argument(f"--{param.replace('_', '-')}", dest=param, help=f"{help_text} (default: ${env})")
        p.add_argument("--eval-samples", type=int, default=500, help="records scored, the same for every run")
        p.add_argument("--out", type=Path, default=RESULTS)
        p.set_defaults(func=func)
        if name == "check":
            p.add_argument("--hardware", default="h100", help="what-if profile: h100, a100-80gb, rtx-4090")
            p.add_argument("--json", action="store_true")
        if name == "qapruner":
            p.add_argument("--device", default="cuda")
            p.add_argument("--dtype", default="bf16")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # SweepError, RecipeError, ModelLoadError, a plan the config cannot give: one line
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
