"""Models bigger than memory: peak resident memory of sequential analysis and streaming surgery on LLaVA-1.5-7B.

    .venv/bin/python -u benchmarks/bench_memory.py                        # 32 layers, bf16 on disk (~14 GB), 8 samples
    .venv/bin/python -u benchmarks/bench_memory.py --layers 4 --tag quick # a short run (~3 GB)

Writes a LLaVA-1.5-7B-shaped folder (``benchmarks/scale_model.py``: Vicuna-7B decoder with ``--layers`` layers,
CLIP ViT-L/14-336, 2-layer projector; random weights, bf16, ~2 GB shards) under ``--workdir``, then runs each
stage in its own process through the command line, so its peak (``VmHWM`` of that process,
``compression.measure.peaks``: memory-mapped file pages it touched count) is its own:

- ``runtime``: a process that only imports torch, transformers and the studio (the floor of every stage);
- ``analyze``: ``python -m compression analyze --kind layers --sequential`` on 8 ShapesVQA calibration samples,
  computing in fp32 (the CPU default): block influence, and activation + magnitude scores for every head and
  MLP neuron, in one sweep (``compression.methods.sequential``), stored in the importance cache;
- ``prune layer`` / ``prune width``: ``python -m compression prune --streaming`` at 30 % of the language model
  (layers by block influence; width by activation scores, ``--servable`` so every layer has one width and plain
  transformers loads it), reading the cached scores (``compression.methods.streaming``);
- ``export``: ``python -m compression export`` of the layer-pruned folder, its own reload check included: the
  run's model, then the export in a fresh process with plain transformers, one after the other, each offloaded
  (``device_map="auto"``, ``max_memory``: the budget ``runs.export.check_budget`` gives, 5 % of the free memory,
  the rest read from the shards one module at a time), 8 greedy tokens and their logits compared; the stage's
  peak is the sum over its process tree (sampled every 50 ms) or its own peak, the larger;
- ``taylor`` (not in the default stages): ``analyze --kind heads --method taylor``, sequential (forward and
  backward one decoder layer at a time) against the whole model's lean path, each with its own cache; the scores
  of both kinds compared;
- ``reload``: each pruned folder with plain ``LlavaForConditionalGeneration.from_pretrained`` (bf16), one
  forward pass of a short text prompt (an image's 576 tokens through 7B in bf16 take many minutes on a CPU
  without AVX-512), finite logits, and a few tensors compared with the source's (kept rows of a kept layer).
  A check, not a measured stage.

Beside every measured peak: the memory plan's prediction (``compression.measure.memory``, from the config and
the calibration batch shapes) and the stage's budget, 25 % of the weight bytes. Writes
``benchmarks/results/memory.md`` and ``memory.csv`` (``--tag`` adds a suffix); prints the summary. The model
folder and the pruned folders are deleted at the end (``--keep`` keeps them).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BUDGET = 0.25  # of the weight bytes, per stage


def _peak() -> int:
    """This process's own peak (``VmHWM``: ``ru_maxrss`` would carry the parent's peak across fork + exec)."""
    from compression.measure.peaks import peak_rss_bytes

    return peak_rss_bytes()


# ------------------------------------------------------------------------------------------------ children

def child(stage: str, payload: dict) -> dict:
    """Run in a fresh process: one stage, its wall time and peak RSS."""
    t0 = time.perf_counter()
    if stage == "runtime":
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import compression.models  # noqa: F401
        from compression.methods import importance  # noqa: F401
        return {"seconds": time.perf_counter() - t0, "peak": _peak()}
    if stage == "write":
        from benchmarks.scale_model import write_scale_model

        write_scale_model(payload["out"], payload["layers"], "bf16")
        return {"seconds": time.perf_counter() - t0, "peak": _peak()}
    if stage == "cli":
        import contextlib
        import io

        from compression.cli.main import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(payload["argv"])
        return {"seconds": time.perf_counter() - t0, "peak": _peak(), "rc": rc, "output": out.getvalue()[-4000:]}
    if stage == "reload":
        return _reload(payload, t0)
    raise ValueError(f"unknown stage {stage}")


def _reload(payload: dict, t0: float) -> dict:
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    out = Path(payload["out"])
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16).eval()
    loaded_s = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("USER: what colour is the square ? ASSISTANT:", return_tensors="pt")
    with torch.inference_mode():
        logits = model(**ids).logits
    plan = json.loads((out / "pruning_plan.json").read_text())
    # a kept layer's q rows / MLP rows in the pruned folder are the source's kept rows
    source = Path(payload["source"])
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    kept = [i for i in range(payload["layers"]) if i not in set(plan["layers_removed"])]
    j = len(kept) // 2
    i = kept[j]
    checks = {}
    sd = {n: p for n, p in model.named_parameters()}
    for part, name in (("q", "self_attn.q_proj.weight"), ("up", "mlp.up_proj.weight"), ("down", "mlp.down_proj.weight")):
        key = f"language_model.model.layers.{i}.{name}"
        with safe_open(source / index[key], "pt") as f:
            original = f.get_tensor(key)
        mine = sd[f"model.language_model.layers.{j}.{name}"].detach()
        if plan["method"] == "width" and str(i) in plan["neurons_kept"] and part != "q":
            idx = torch.tensor(plan["neurons_kept"][str(i)])
            original = original.index_select(0 if part == "up" else 1, idx)
        if plan["method"] == "width" and str(i) in plan["heads_kept"] and part == "q":
            hd = 128
            rows = torch.tensor([h * hd + d for h in plan["heads_kept"][str(i)] for d in range(hd)])
            original = original.index_select(0, rows)
        checks[part] = bool(torch.equal(original, mine))
    return {"seconds": time.perf_counter() - t0, "load_seconds": loaded_s, "peak": _peak(),
            "finite": bool(torch.isfinite(logits).all()), "logits_shape": list(logits.shape), "tensors_equal": checks,
            "layers": model.config.text_config.num_hidden_layers,
            "heads": model.config.text_config.num_attention_heads,
            "intermediate": model.config.text_config.intermediate_size}


def run_child(stage: str, payload: dict, env: dict) -> dict:
    """One stage in a fresh process. ``peak`` is the larger of the process's own peak RSS and the sum of the RSS
    of it and every process it starts (the export check's fresh interpreter), sampled every 50 ms."""
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", stage, "--payload", json.dumps(payload)],
                                stdout=out, stderr=err, text=True, env=env)
        root, tree = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = max(tree, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
            except psutil.Error:  # a process ended between listing and reading
                pass
            time.sleep(0.05)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_peak"] = tree
    if "peak" in result:
        result["self_peak"] = result["peak"]
        result["peak"] = max(result["peak"], tree)
    return result


# ------------------------------------------------------------------------------------------------ predictions

def predictions(folder: Path, samples: int, runtime: int) -> dict:
    import torch

    from compression.measure import memory
    from compression.methods import sequential
    from compression.methods.importance import calibration_batches, calibration_selection
    from compression.methods.streaming import SHARD_BYTES
    from compression.models.loader import _read_config, load_processor, model_from_config
    from compression.models import anatomy_from_config
    from compression.models.prompting import prompt_format

    config = _read_config(folder / "config.json")
    anatomy = anatomy_from_config(config)
    sizes = memory.model_sizes(model_from_config(config), anatomy)
    processor = load_processor(folder)
    selection = calibration_selection("shapes", samples)
    batches = calibration_batches(prompt_format(processor, config), selection.records, sequential.BATCH_SIZE)
    tokens = max(b["input_ids"].shape[1] for b in batches)
    batch = max(b["input_ids"].shape[0] for b in batches)
    phases = memory.sequential_analysis_plans(sizes, torch.float32, samples, tokens, batch, runtime)
    layer = memory.streaming_prune_plan(sizes, torch.bfloat16, SHARD_BYTES, "layer", runtime)
    width = memory.streaming_prune_plan(sizes, torch.bfloat16, SHARD_BYTES, "width", runtime)
    taylor_phases = memory.sequential_analysis_plans(sizes, torch.float32, samples, tokens, batch, runtime, taylor=True)
    return {"analyze": max(phases, key=lambda p: p.peak), "phases": phases, "prune layer": layer,
            "prune width": width, "tokens": tokens, "sizes": sizes,
            "taylor sequential": max(taylor_phases, key=lambda p: p.peak), "taylor_phases": taylor_phases,
            # the whole model's stage peaks at the larger of its load (bf16 on disk cast to fp32) and its Taylor pass
            "taylor whole": max(memory.whole_load_plan(sizes, torch.float32, torch.bfloat16, runtime),
                                memory.whole_taylor_plan(sizes, torch.float32, samples, tokens, runtime),
                                key=lambda p: p.peak),
            "taylor_whole_phases": [memory.whole_load_plan(sizes, torch.float32, torch.bfloat16, runtime),
                                    memory.whole_taylor_plan(sizes, torch.float32, samples, tokens, runtime)]}


def export_stage(source: Path, dest: Path) -> tuple[str, list[str], object]:
    """``export`` of a pruned folder (``prune --streaming``'s output), with its own reload check at the memory
    budget ``runs.export.check_budget`` gives on this machine now, and the memory plan's prediction for it."""
    import torch

    from compression.data.records import single_turn
    from compression.measure import memory
    from compression.models import anatomy_from_config
    from compression.models.loader import _read_config, load_processor, model_from_config
    from compression.models.prompting import prompt_format
    from compression.runs.export import CHECK_QUESTION, check_budget, check_image

    budget = check_budget(memory.weight_bytes(source), memory.available_bytes("cpu"))
    config = _read_config(source / "config.json")
    sizes = memory.model_sizes(model_from_config(config), anatomy_from_config(config))
    fmt = prompt_format(load_processor(source), config)
    text = fmt.render(single_turn(CHECK_QUESTION), add_generation_prompt=True)
    tokens = fmt.processor(images=[check_image()], text=[text], return_tensors="pt")["input_ids"].shape[1]
    if budget is None:
        plan, memory_arg = memory.whole_load_plan(sizes, torch.bfloat16, torch.bfloat16), "whole"
    else:
        plan, memory_arg = memory.offloaded_check_plan(sizes, torch.bfloat16, budget, tokens), f"{budget / 1e6:.0f}MB"
    name = (f"export {source.name} (reload check: plain transformers, "
            + ("whole)" if budget is None else f"offloaded, {budget / 1e9:.2f} GB of weights in memory)"))
    return name, ["export", str(source), "--to", str(dest), "--no-zip", "--json", "--check-memory", memory_arg], plan


# ------------------------------------------------------------------------------------------------ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--tag", default="")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--folder", help="an existing scale_model.py folder to measure (not written, not deleted)")
    parser.add_argument("--stages", default="analyze,prune,export,reload",
                        help="comma-separated: analyze, prune, export, reload, taylor (Taylor heads + neurons, "
                             "sequential against the whole model's lean path, scores compared)")
    parser.add_argument("--export-source", help="the pruned folder the export stage exports (default: the prune "
                                                "stage's layer30)")
    parser.add_argument("--prune-scorers", default="block_influence,activation",
                        help="layer,width scorers for the prune stages (none: no analysis, lowest indices / deepest "
                             "layers; default: the analyze stage's cached scores)")
    parser.add_argument("--repredict", action="store_true",
                        help="recompute the predictions of a written memory.csv / .md with the current memory plans "
                             "(needs --folder for the config; measured figures are kept as they are)")
    parser.add_argument("--combine", help="tags of runs to gather into memory.csv / memory.md, e.g. analyze4,prune; "
                                          "peaks are set against --weights-gb (the full model's weight bytes)")
    parser.add_argument("--weights-gb", type=float, help="with --combine: the full model's weights (GB)")
    parser.add_argument("--child")
    parser.add_argument("--payload")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.payload))))
        return 0
    if args.repredict:
        return repredict(args)
    if args.combine:
        return combine(args)

    work = Path(args.workdir) / f"bench-memory-{os.getpid()}"
    work.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COMPRESSION_CACHE=str(work / "cache"),
               PYTHONPATH=str(REPO))
    folder = work / "llava-1.5-7b-bf16"
    rows, reloads = [], {}
    command = "benchmarks/bench_memory.py " + " ".join(a for a in sys.argv[1:])
    try:
        runtime = run_child("runtime", {}, env)
        print(f"runtime: {runtime['peak'] / 1e9:.2f} GB", flush=True)
        if args.folder:  # written before (by this script or scale_model.py): reused, and kept
            folder = Path(args.folder)
            written = None
        else:
            written = run_child("write", {"out": str(folder), "layers": args.layers}, env)
        from compression.models.shards import Checkpoint

        weights = Checkpoint(folder).nbytes
        if written is not None:
            print(f"wrote {folder} ({weights / 1e9:.2f} GB) in {written['seconds']:.0f} s, peak "
                  f"{written['peak'] / 1e9:.2f} GB", flush=True)
            rows.append(("write the folder (scale_model.py)", written, None))
        predicted = predictions(folder, args.samples, runtime["peak"])
        common = ["--model", str(folder), "--data", "shapes", "--samples", str(args.samples)]
        wanted = set(args.stages.split(","))
        layer_scorer, width_scorer = args.prune_scorers.split(",")
        stages = [
            ("analyze, sequential (BI + activation + magnitude)", ["analyze", "--kind", "layers", "--sequential",
                                                                    "--json", *common], predicted["analyze"]),
            ("prune layer 30 %, streaming", ["prune", "--method", "layer", "--ratio", "0.3", "--streaming",
                                            "--scorer", layer_scorer, "--out", str(work / "layer30"), "--json",
                                            *common], predicted["prune layer"]),
            ("prune width 30 %, streaming", ["prune", "--method", "width", "--ratio", "0.3", "--servable",
                                            "--scorer", width_scorer, "--streaming", "--out", str(work / "width30"),
                                            "--json", *common], predicted["prune width"]),
        ]
        def measure_stage(name: str, argv: list[str], plan, stage_env: dict) -> None:
            result = run_child("cli", {"argv": argv}, stage_env)
            if result["rc"] != 0:
                raise RuntimeError(f"{name}: exit {result['rc']}: {result['output'][-500:]}")
            rows.append((name, result, plan))
            print(f"{name}: {result['seconds']:.0f} s, peak {result['peak'] / 1e9:.2f} GB "
                  f"({result['peak'] / weights:.1%} of the weights), predicted {plan.peak / 1e9:.2f} GB", flush=True)
            _write(args, command, weights, runtime, rows, reloads, predicted, quiet=True)  # what is measured so far

        stages = [st for st in stages if st[1][0] in wanted]
        for name, argv, plan in stages:
            if argv[0] == "prune":
                name += f" (scorer {argv[argv.index('--scorer') + 1]})"
            measure_stage(name, argv, plan, env)
        if "taylor" in wanted:
            # the sequential sweep scores heads and neurons from one backward; the whole model's run scores heads
            taylor_stages = [("taylor heads + neurons, sequential", ["--sequential"], predicted["taylor sequential"]),
                             ("taylor heads, whole model (lean)", [], predicted["taylor whole"])]
            for i, (name, extra, plan) in enumerate(taylor_stages):
                # separate caches: both paths store their scores under the same names
                measure_stage(name, ["analyze", "--kind", "heads", "--method", "taylor", *extra, "--json", *common],
                              plan, dict(env, COMPRESSION_CACHE=str(work / f"cache-taylor-{i}")))
            predicted["taylor_compare"] = _compare_taylor(work / "cache-taylor-0", work / "cache-taylor-1")
            print(f"taylor, sequential vs whole: {predicted['taylor_compare']}", flush=True)
        if "export" in wanted:
            source = Path(args.export_source) if args.export_source else work / "layer30"
            name, argv, plan = export_stage(source, work / "export-layer30")
            measure_stage(name, argv, plan, env)
            predicted["export_plan"] = plan
            predicted["export_check"] = json.loads((work / "export-layer30" / "export_check.json").read_text())
            print(f"export check: {predicted['export_check']}", flush=True)
        for out in ("layer30", "width30", "export-layer30") if "reload" in wanted else ():
            if not (work / out).is_dir():
                continue
            reloads[out] = run_child("reload", {"out": str(work / out), "source": str(folder),
                                                "layers": args.layers}, env)
            print(f"reload {out}: {reloads[out]}", flush=True)
        _write(args, command, weights, runtime, rows, reloads, predicted)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _compare_taylor(sequential_cache: Path, whole_cache: Path) -> dict:
    """Max relative difference of the two paths' Taylor scores, per kind (the cached CSVs)."""
    import pandas as pd

    out = {}
    for kind in ("heads", "neurons"):
        files = [next((c / "importance").glob(f"*-{kind}-taylor.csv"), None) for c in (sequential_cache, whole_cache)]
        if None in files:
            out[kind] = "not scored"
            continue
        a, b = (pd.read_csv(f)["score"] for f in files)
        out[kind] = float(((a - b).abs() / b.abs().clip(lower=1e-12)).max())
    return out


def _write(args, command: str, weights: int, runtime: dict, rows: list, reloads: dict, predicted: dict,
           quiet: bool = False) -> None:
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    budget = BUDGET * weights
    table = []
    for name, result, plan in rows:
        table.append({"stage": name, "seconds": round(result["seconds"], 1), "peak_gb": round(result["peak"] / 1e9, 3),
                      "peak_of_weights": round(result["peak"] / weights, 4),
                      "predicted_gb": round(plan.peak / 1e9, 3) if plan else "",
                      "prediction_error": round(plan.peak / result["peak"] - 1, 3) if plan else "",
                      "budget_gb": round(budget / 1e9, 3) if plan else "",
                      "within_budget": (result["peak"] <= budget) if plan else ""})
    with open(results / f"memory{suffix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    sizes = predicted["sizes"]
    lines = [f"# Memory: LLaVA-1.5-7B geometry, {args.layers} decoder layers, bf16 on disk", "",
             f"Command: `.venv/bin/python -u {command}` (CPU: {_cpu_name()}, {os.cpu_count()} cores, shared; "
             f"{_mem_total() / 2**30:.0f} GiB RAM).", "",
             f"Weights: {weights / 1e9:.2f} GB as stored (bf16); budget per stage {BUDGET:.0%} = {budget / 1e9:.2f} GB. "
             f"Runtime floor (torch + transformers + studio imported): {runtime['peak'] / 1e9:.2f} GB. "
             f"Calibration: {args.samples} ShapesVQA samples, one per batch (the longest {predicted['tokens']} tokens); analysis "
             "computes in fp32 (the CPU default), surgery copies bf16 as stored.", "",
             "| stage | time (s) | peak RSS (GB) | of weights | predicted (GB) | prediction / measured - 1 | within 25 % |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in table:
        lines.append(f"| {r['stage']} | {r['seconds']} | {r['peak_gb']:.2f} | {r['peak_of_weights']:.1%} | "
                     + (f"{r['predicted_gb']:.2f} | {r['prediction_error']:+.1%} | {'yes' if r['within_budget'] else 'NO'} |"
                        if r["predicted_gb"] != "" else "| | |"))
    lines += ["", "Predicted terms (``compression.measure.memory``; GB):", ""]
    taylor = ([predicted["taylor_phases"][-1], *predicted["taylor_whole_phases"]]
              if any(r[0].startswith("taylor") for r in rows) else [])
    for plan in predicted["phases"] + [predicted["prune layer"], predicted["prune width"]] + taylor + (
            [predicted["export_plan"]] if "export_plan" in predicted else []):
        lines.append(f"- {plan.stage}: " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in plan.terms.items())
                     + f"; total {plan.peak / 1e9:.2f}")
    if "export_check" in predicted:
        c = predicted["export_check"]
        budget_text = "whole" if c["budget_bytes"] is None else f"{c['budget_bytes'] / 1e9:.2f} GB"
        lines += ["", f"Export check (``export_check.json``): {c['dtype']}, weights in memory per side {budget_text}; the "
                  f"run's model {c['run_seconds']:.0f} s, then the export reloaded with plain transformers in a fresh "
                  f"process (placed on {', '.join(c['reload_where'])}) {c['reload_seconds']:.0f} s, peak "
                  f"{c['reload_peak_rss'] / 1e9:.2f} GB; {c['new_tokens']} greedy tokens, max logit difference "
                  f"{c['max_logit_difference']:.1e}."]
    if "taylor_compare" in predicted:
        lines += ["", "Taylor, sequential against the whole model's lean path, max relative difference of the scores: "
                  + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in predicted["taylor_compare"].items())]
    lines += ["", f"Model sizes: parts (vision, projector, embeddings, norm) {sizes.parts:,} params, one decoder layer "
              f"{sizes.layer:,}, LM head {sizes.lm_head:,}.", "",
              "Reload with plain `LlavaForConditionalGeneration.from_pretrained` (bf16) and one text-only forward "
              "(a check, not a measured stage):", ""]
    for name, r in reloads.items():
        lines.append(f"- {name}: {r['layers']} layers, {r['heads']} heads, intermediate {r['intermediate']}; loaded in "
                     f"{r['load_seconds']:.0f} s, forward logits {r['logits_shape']} finite: {r['finite']}; tensors equal "
                     f"to the source's kept rows: {r['tensors_equal']}; peak {r['peak'] / 1e9:.2f} GB")
    (results / f"memory{suffix}.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


def combine(args) -> int:
    """memory.csv / memory.md from tagged runs: every measured stage, its peak against the full model's weights."""
    results = REPO / "benchmarks" / "results"
    weights = args.weights_gb * 1e9
    rows, sources = [], []
    for tag in args.combine.split(","):
        md = (results / f"memory_{tag}.md").read_text().splitlines()
        layers = int(md[0].split("geometry, ")[1].split(" decoder")[0])
        sources.append(f"- `{tag}` ({layers} decoder layers): {md[2].removeprefix('Command: ')} -> "
                       f"`benchmarks/results/memory_{tag}.md`")
        with open(results / f"memory_{tag}.csv") as f:
            for r in csv.DictReader(f):
                if r["predicted_gb"] == "":
                    continue
                peak = float(r["peak_gb"]) * 1e9
                rows.append({"stage": r["stage"], "layers_measured": layers, "seconds": r["seconds"],
                             "peak_gb": r["peak_gb"], "peak_of_full_weights": round(peak / weights, 4),
                             "predicted_gb": r["predicted_gb"], "prediction_error": r["prediction_error"],
                             "within_budget": peak <= BUDGET * weights})
    with open(results / "memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Memory: models bigger than memory, LLaVA-1.5-7B geometry (32 layers, bf16 on disk)", "",
             f"Command: `.venv/bin/python benchmarks/bench_memory.py --combine {args.combine} --weights-gb "
             f"{args.weights_gb}`, gathering:", "", *sources, "",
             f"Peaks against the full model's weights, {args.weights_gb:.2f} GB (budget {BUDGET:.0%} = "
             f"{BUDGET * weights / 1e9:.2f} GB). The sequential analysis holds one decoder layer at a time, so its "
             "peak does not depend on the number of layers (capture: the parts outside the layers in fp32 and one "
             "sample's vision-tower activations; sweep: one layer, the hidden states); its time grows with them.", "",
             "| stage | layers measured | time (s) | peak RSS (GB) | of the 32-layer weights | predicted (GB) | "
             "prediction / measured - 1 | within 25 % |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['layers_measured']} | {r['seconds']} | {float(r['peak_gb']):.2f} | "
                     f"{r['peak_of_full_weights']:.1%} | {float(r['predicted_gb']):.2f} | "
                     f"{float(r['prediction_error']):+.1%} | {'yes' if r['within_budget'] else 'NO'} |")
    (results / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def repredict(args) -> int:
    """Rewrite the predicted columns (and the terms list) of memory{suffix}.csv / .md with the current plans."""
    results = REPO / "benchmarks" / "results"
    suffix = f"_{args.tag}" if args.tag else ""
    with open(results / f"memory{suffix}.csv") as f:
        table = list(csv.DictReader(f))
    md = (results / f"memory{suffix}.md").read_text().splitlines()
    runtime = float(next(line for line in md if "Runtime floor" in line).split("studio imported): ")[1].split(" GB")[0])
    predicted = predictions(Path(args.folder), args.samples, int(runtime * 1e9))
    out = []
    for r in table:
        key = next((k for k in ("analyze", "prune layer", "prune width") if r["stage"].startswith(k)), None)
        if r["stage"].startswith("taylor"):
            key = "taylor sequential" if "sequential" in r["stage"] else "taylor whole"
        if key is not None:
            plan = predicted[key]
            peak = float(r["peak_gb"]) * 1e9
            r["predicted_gb"], r["prediction_error"] = round(plan.peak / 1e9, 3), round(plan.peak / peak - 1, 3)
        out.append(r)
    with open(results / f"memory{suffix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    rows = {r["stage"]: r for r in out}
    lines, skip = [], False
    for line in md:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 5 and cells[1] in rows and rows[cells[1]]["predicted_gb"] not in ("", None):
            r = rows[cells[1]]
            cells[5], cells[6] = f"{float(r['predicted_gb']):.2f}", f"{float(r['prediction_error']):+.1%}"
            line = "| " + " | ".join(cells[1:-1]) + " |"
        if line.startswith("Predicted terms"):
            skip = True
            lines += ["Predicted terms (``compression.measure.memory``; GB; recomputed with `bench_memory.py "
                      "--repredict` after the run, measured figures unchanged):", ""]
            taylor = ([predicted["taylor_phases"][-1], *predicted["taylor_whole_phases"]]
                      if any(r["stage"].startswith("taylor") for r in out) else [])
            for plan in predicted["phases"] + [predicted["prune layer"], predicted["prune width"]] + taylor + (
            [predicted["export_plan"]] if "export_plan" in predicted else []):
                lines.append(f"- {plan.stage}: " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in plan.terms.items())
                             + f"; total {plan.peak / 1e9:.2f}")
            lines.append("")
            continue
        if skip:
            if line.startswith("Model sizes"):
                skip = False
            else:
                continue
        lines.append(line)
    (results / f"memory{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _cpu_name() -> str:
    """The CPU's model name and whether it multiplies bf16 natively (AVX512-BF16 / AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    native = "amx_bf16" in info or "avx512_bf16" in info
    return f"{name}, {'native' if native else 'no native'} bf16"


def _mem_total() -> int:
    import psutil

    return psutil.virtual_memory().total


if __name__ == "__main__":
    raise SystemExit(main())
