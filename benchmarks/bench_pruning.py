"""Layerwise vs widthwise pruning of the reference model without recovery (measured).

    .venv/bin/python benchmarks/bench_pruning.py                         # reference model, 500 ShapesVQA test questions
    .venv/bin/python benchmarks/bench_pruning.py --samples 20 --calibration 8 --repeats 1 --out /tmp/bench  # smoke run
    .venv/bin/python -u benchmarks/bench_pruning.py --threads 1 --repeats 5    # on a shared, busy machine
    .venv/bin/python benchmarks/bench_pruning.py --model MODEL --data my_eval.json   # your model on your own data

For each fraction of language-model parameters (10/20/30/40/50 %):

- layerwise: remove the layers with the lowest block influence (32 calibration samples);
- widthwise: Taylor-scored heads and neurons, the paper's layer range (first 3 and the last layer
  left whole); where that range cannot give the budget, every layer instead (``width-all``);

then zero-shot accuracy on held-out records (``--data``, default ``shapes``: the reference model's ShapesVQA,
its test split for accuracy and its train split for calibration; ``compression.measure.evaluate.accuracy``) and
prefill latency of every pruned model interleaved with the original in one process, on the first
evaluation record (``compression.measure.evaluate.latency``), against the ideal speedup (FLOP ratio from
``compression.measure.whatif``). Peak memory of the Taylor pass is measured in a fresh process
(``resource.getrusage`` max RSS) and extrapolated to LLaVA-1.5-7B.

Writes pruning.csv, pruning.png and pruning.md into ``--out`` (default benchmarks/results); prints the summary.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression.data.records import DataError  # noqa: E402
from compression.data.sources import open_source, select
from compression.measure import evaluate
from compression.methods import importance
from compression import models
from compression.methods import prune

RESULTS = Path(__file__).resolve().parent / "results"
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(model_source: str, data: str, samples: int) -> dict:
    """Runs in a fresh process: resident memory before and peak during one Taylor pass per kind."""
    loaded = models.load(model_source)
    calibration = importance.calibration_selection(data, samples)
    batches = importance.calibration_batches(loaded.prompt, calibration.records)
    out = {"model_bytes": models.tensor_bytes(loaded.model)}
    for kind in ("heads", "neurons"):
        before = _rss_bytes()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        importance.unit_importance(loaded, batches, kind, "taylor")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        groups = importance.coupled_groups(loaded.model, loaded.anatomy, kind)
        scored = sum(p.numel() * p.element_size() for p in importance._scored_parameters(groups))
        out[kind] = {"rss_before": before, "peak_rss": max(peak, peak_before), "peak_increase": max(0, peak - before),
                     "scored_grad_bytes": scored, "seconds": time.perf_counter() - start}
    out["rss_after"] = _rss_bytes()
    return out


def estimate_7b_memory(tokens: int = 650, batch: int = 1) -> dict:
    """Taylor pass on LLaVA-1.5-7B in bf16: weights + gradients of the scored weights + one mini-batch of
    activations kept for backward (Korthikanti et al. 2022: ``T b h (34 + 5 a T / h)`` bytes per layer)."""
    loaded = models.load("config:llava-1.5-7b")
    a = loaded.anatomy
    weights = 2 * models.parameter_counts(loaded.model, a)["total"]
    heads = a.num_layers * a.hidden_size * a.head_dim * (2 * a.num_attention_heads + 2 * a.num_key_value_heads)
    neurons = a.num_layers * 3 * a.hidden_size * a.intermediate_size
    per_layer = tokens * batch * a.hidden_size * (34 + 5 * a.num_attention_heads * tokens / a.hidden_size)
    activations = a.num_layers * per_layer
    return {"weights": weights, "grads_heads": 2 * heads, "grads_neurons": 2 * neurons, "activations": activations,
            "tokens": tokens, "batch": batch,
            "total_heads": weights + 2 * heads + activations, "total_neurons": weights + 2 * neurons + activations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference")
    parser.add_argument("--data", default="shapes",
                        help="records for accuracy and calibration: 'shapes' (the reference model's ShapesVQA), a "
                             "LLaVA-format .json/.jsonl file or a Hugging Face dataset folder / parquet file")
    parser.add_argument("--samples", type=int, default=500, help="test questions for accuracy")
    parser.add_argument("--calibration", type=int, default=32, help="calibration samples for importance")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where CSV / PNG / MD go")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.model, args.data, args.calibration)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    try:
        test = select(open_source(args.data, "eval"), samples=args.samples, need_images=True)
        calibration = importance.calibration_selection(args.data, args.calibration)
    except DataError as e:
        parser.error(str(e))
    records = test.records
    loaded = models.load(args.model)
    base = evaluate.accuracy(loaded, records)
    print(f"original: accuracy {base.accuracy:.1%} on {test.describe()}")

    start = time.perf_counter()
    scores = {"layer": importance.cached_importance(loaded, "layers", "block_influence", calibration),
              "width": {k: importance.cached_importance(loaded, k, "taylor", calibration)
                        for k in ("heads", "neurons")}}
    scoring_s = time.perf_counter() - start
    print("block influence per layer:", [round(s, 4) for s in scores["layer"]["score"]])

    rows, pruned_models = [], {"original": loaded.model}
    ideal_flops = prune.what_if(loaded, None, hardware="cpu")["prefill_flops"]["total"]
    n = loaded.anatomy.num_layers
    series = [("layer", None), ("width", None), ("width-all", (0, n))]
    for name, layer_range in series:
        method = "layer" if name == "layer" else "width"
        for ratio in RATIOS:
            if name == "width-all" and any(r["series"] == "width" and r["ratio_requested"] == ratio
                                           and not r["infeasible"] for r in rows):
                continue  # every-layer width only where the paper's range cannot give the budget
            try:
                plan = prune.make_plan(loaded, method, ratio=ratio, scores=scores[method], layer_range=layer_range)
            except ValueError as e:
                print(f"{name} {ratio:.0%}: infeasible: {e}")
                rows.append({"series": name, "ratio_requested": ratio, "infeasible": str(e)})
                continue
            model = copy.deepcopy(loaded.model)
            model, anatomy = prune.apply_plan(model, loaded.anatomy, plan)
            acc = evaluate.accuracy(loaded, records, model=model)
            estimate = prune.what_if(loaded, plan, hardware="cpu")
            key = f"{name} {ratio:.0%}"
            pruned_models[key] = model
            rows.append({"series": name, "ratio_requested": ratio, "ratio_achieved": plan.ratio_achieved,
                         "params_after": plan.params_after, "accuracy": acc.accuracy,
                         "kept": acc.accuracy / base.accuracy if base.accuracy else float("nan"), "per_type": json.dumps(acc.per_type),
                         "ideal_speedup": ideal_flops / estimate["prefill_flops"]["total"],
                         "estimated_cpu_prefill_ms": estimate["prefill_ms"], "key": key,
                         "layers_removed": plan.layers_removed,
                         "widths": json.dumps(plan.widths_after), "infeasible": ""})
            print(f"{key}: achieved {plan.ratio_achieved:.1%}, accuracy {acc.accuracy:.1%} "
                  f"({acc.accuracy / max(base.accuracy, 1e-9):.1%} of the original)")

    print(f"timing {len(pruned_models)} models interleaved ({args.repeats} repeats)...")
    timings = evaluate.latency(pruned_models, evaluate.latency_inputs(loaded, records[0]), repeats=args.repeats)
    original_ms = timings["original"]["prefill_ms"]
    for row in rows:
        if row.get("key") in timings:
            t = timings[row["key"]]
            row.update(prefill_ms=t["prefill_ms"], decode_tokens_per_s=t["decode_tokens_per_s"],
                       speedup=original_ms / t["prefill_ms"])
            row["speedup_vs_ideal"] = row["speedup"] / row["ideal_speedup"]

    probe = subprocess.run([sys.executable, __file__, "--memory-probe", "--model", args.model, "--data", args.data,
                            "--calibration", str(args.calibration)], capture_output=True, text=True, timeout=900)
    memory = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else {"error": probe.stderr[-500:]}
    est = estimate_7b_memory()

    fields = ["series", "ratio_requested", "ratio_achieved", "params_after", "accuracy", "kept", "prefill_ms",
              "speedup", "ideal_speedup", "speedup_vs_ideal", "estimated_cpu_prefill_ms", "decode_tokens_per_s",
              "layers_removed", "widths", "per_type", "infeasible"]
    tmp_csv = args.out / "pruning.csv.tmp"
    with open(tmp_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerow({"series": "original", "ratio_requested": 0, "ratio_achieved": 0, "accuracy": base.accuracy,
                         "kept": 1.0, "prefill_ms": original_ms, "speedup": 1.0, "ideal_speedup": 1.0,
                         "per_type": json.dumps(base.per_type),
                         "params_after": models.parameter_counts(loaded.model, loaded.anatomy)["total"]})
        writer.writerows(rows)
    os.replace(tmp_csv, args.out / "pruning.csv")
    _chart(rows, base.accuracy, args.out)
    _report(args, rows, base, test, original_ms, timings, memory, est, scoring_s, scores["layer"])


def _chart(rows: list[dict], base: float, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, marker in (("layer", "o"), ("width", "s"), ("width-all", "^")):
        pts = [r for r in rows if r["series"] == name and not r["infeasible"]]
        if not pts:
            continue
        ax1.plot([r["ratio_achieved"] * 100 for r in pts], [r["accuracy"] * 100 for r in pts], marker=marker,
                 label=name)
        ax2.plot([r["ratio_achieved"] * 100 for r in pts], [r["speedup"] for r in pts], marker=marker,
                 label=f"{name} measured")
        ax2.plot([r["ratio_achieved"] * 100 for r in pts], [r["ideal_speedup"] for r in pts], marker=marker,
                 linestyle=":", alpha=0.6, label=f"{name} ideal (FLOPs)")
    ax1.axhline(base * 100, color="grey", linestyle="--", label="original")
    ax1.set(xlabel="language-model parameters removed (%)", ylabel="accuracy (%)",
            title="Zero-shot accuracy, no recovery (measured)")
    ax2.set(xlabel="language-model parameters removed (%)", ylabel="prefill speedup (x)",
            title="CPU prefill speedup vs ideal (measured)")
    ax1.legend(), ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pruning.png", dpi=110)


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f} MB"


def _report(args, rows, base, test, original_ms, timings, memory, est, scoring_s, bi) -> None:
    ok = [r for r in rows if not r["infeasible"]]
    lines = [
        "# Pruning without recovery: layerwise vs widthwise (measured)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_pruning.py --model {args.model}"
        + (f" --data {args.data}" if args.data != "shapes" else "") + f" --samples {args.samples} "
        f"--repeats {args.repeats}" + (f" --threads {args.threads}" if args.threads else "") + "`  ",
        f"Model: `{args.model}`; accuracy ({base.metric}) on {test.describe()}; importance on {args.calibration} "
        f"calibration samples (block influence; Taylor for heads and neurons; {scoring_s:.1f} s, cached). Latency: batch 1, "
        f"one image + question, medians of {args.repeats} interleaved repeats on this CPU "
        f"({torch.get_num_threads()} threads); original prefill {original_ms:.2f} ms.",
        "",
        f"Original accuracy: **{base.accuracy:.1%}**. Block influence per layer: "
        + ", ".join(f"{int(r.layer)}: {r.score:.4f}" for r in bi.itertuples()),
        "",
        "| series | asked | achieved | accuracy | kept | prefill ms | speedup | ideal | speedup / ideal | removed / widths |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["infeasible"]:
            lines.append(f"| {r['series']} | {r['ratio_requested']:.0%} | infeasible | | | | | | | {r['infeasible']} |")
            continue
        what = (f"layers {r['layers_removed']}" if r["series"] == "layer"
                else "heads " + str(json.loads(r["widths"])["num_attention_heads"])
                + ", neurons " + str(json.loads(r["widths"])["intermediate_size"]))
        lines.append(f"| {r['series']} | {r['ratio_requested']:.0%} | {r['ratio_achieved']:.1%} | {r['accuracy']:.1%} "
                     f"| {r['kept']:.1%} | {r['prefill_ms']:.2f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x "
                     f"| {r['speedup_vs_ideal']:.2f} | {what} |")
    lines += ["", "## Width vs layer without recovery", ""]
    for ratio in RATIOS:
        layer = next((r for r in ok if r["series"] == "layer" and r["ratio_requested"] == ratio), None)
        width = next((r for r in ok if r["series"] == "width" and r["ratio_requested"] == ratio), None) or \
            next((r for r in ok if r["series"] == "width-all" and r["ratio_requested"] == ratio), None)
        if layer and width:
            better = "width" if width["accuracy"] > layer["accuracy"] else ("layer" if layer["accuracy"] >
                                                                            width["accuracy"] else "tie")
            lines.append(f"- {ratio:.0%}: layer {layer['accuracy']:.1%} (achieved {layer['ratio_achieved']:.1%}) vs "
                         f"{width['series']} {width['accuracy']:.1%} (achieved {width['ratio_achieved']:.1%}): "
                         f"**{better}**")
    lines += ["", "Paper (LLaVA-1.5-7B, 15 %, no recovery): width keeps 90.9 % vs layer 72.2 %.", ""]
    at30 = [r for r in ok if abs(r["ratio_requested"] - 0.3) < 1e-9]
    lines += ["## Latency against the ideal", "",
              "Ideal speedup = prefill FLOPs of the original / of the pruned model (vision tower + projector + "
              "language model, from `compression.measure.whatif`). Goal: >= 0.9 x ideal at 30 %.", ""]
    for r in at30:
        verdict = "meets" if r["speedup_vs_ideal"] >= 0.9 else "misses"
        lines.append(f"- {r['series']} 30 %: {r['speedup']:.2f}x measured vs {r['ideal_speedup']:.2f}x ideal = "
                     f"{r['speedup_vs_ideal']:.2f} of ideal ({verdict} the goal); roofline estimate "
                     f"{r['estimated_cpu_prefill_ms']:.2f} ms vs {r['prefill_ms']:.2f} ms measured")
    lines += ["", "## Memory of the Taylor pass", ""]
    if "error" in memory:
        lines.append(f"Memory probe failed: {memory['error']}")
    else:
        lines.append(f"Measured in a fresh process (max RSS, `resource.getrusage`), {args.calibration} samples in "
                     f"mini-batches of {importance.BATCH_SIZE}; model tensors {_mb(memory['model_bytes'])} (fp32).")
        lines.append("")
        lines.append("| kind | RSS before | peak RSS | peak increase | gradients of scored weights | time |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for kind in ("heads", "neurons"):
            m = memory[kind]
            lines.append(f"| {kind} | {_mb(m['rss_before'])} | {_mb(m['peak_rss'])} | {_mb(m['peak_increase'])} "
                         f"| {_mb(m['scored_grad_bytes'])} | {m['seconds']:.1f} s |")
    lines += ["", "Estimate for LLaVA-1.5-7B (bf16 weights and gradients, one sequence of "
              f"{est['tokens']} tokens per mini-batch, no activation checkpointing; an estimate, not a measurement):",
              "", f"- weights {est['weights'] / 1e9:.1f} GB; gradients of attention weights (heads) "
              f"{est['grads_heads'] / 1e9:.1f} GB, of MLP weights (neurons) {est['grads_neurons'] / 1e9:.1f} GB; "
              f"activations kept for backward {est['activations'] / 1e9:.1f} GB",
              f"- peak: heads pass ~{est['total_heads'] / 1e9:.0f} GB, neurons pass ~{est['total_neurons'] / 1e9:.0f} GB "
              "(fits one 40 GB / 80 GB GPU; with gradients of every weight it would be "
              f"~{(est['weights'] * 2 + est['activations']) / 1e9:.0f} GB)"]
    (args.out / "pruning.md.tmp").write_text("\n".join(lines) + "\n")
    os.replace(args.out / "pruning.md.tmp", args.out / "pruning.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
