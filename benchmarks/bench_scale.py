"""Real scale on CPU: LLaVA-1.5-7B layer shapes with N decoder layers, measured with the studio's own code paths.

    .venv/bin/python -u benchmarks/bench_scale.py                                    # N = 2, 4, 8, fp32
    .venv/bin/python -u benchmarks/bench_scale.py --layers 2 --dtypes fp32 --quick   # one short run
    .venv/bin/python -u benchmarks/bench_scale.py --layers 2 --dtypes bf16           # bf16 (slow without AVX512-BF16)

For each N and dtype a model with LLaVA-1.5-7B's real dimensions (``benchmarks/scale_model.py``:
Llama 4096 hidden, 32 x 128 heads, 11008 intermediate, vocabulary 32064; CLIP ViT-L/14-336, 576
visual tokens; 2-layer MLP projector) and N decoder layers is written under ``--workdir`` as
sharded safetensors, measured, and deleted. Measured with the studio's functions:

- load (``compression.models.load``): time and RSS, then the time and RSS to bring every weight
  in (transformers memory-maps safetensors: pages come in at first touch);
- block influence and Taylor importance (``compression.methods.importance``), each in a fresh
  process so that peaks (``VmHWM``, ``compression.measure.peaks.peak_rss_bytes``) are its own: Taylor on
  the lean path (default) and the old path (every scored gradient kept), scores compared;
- layer and width surgery at 30 % of the language model (``compression.methods.prune``,
  ``make_plan`` / ``apply_plan``; width over every layer, since the paper's default range is
  empty for N <= 4) on copies that share the untouched tensors with the original;
- prefill latency (``compression.measure.evaluate.latency``, batch 1, one ShapesVQA image and
  question, logits of the last position as ``generate``), original vs pruned, interleaved,
  order-rotated, the minimum of ``--repeats`` after one warm-up round: the language model alone
  (from precomputed ``inputs_embeds``) for every N, end to end (pixels in) for ``--e2e-layers``;
  speedup / FLOP-ideal (``compression.measure.whatif``);
- decode tokens/s (KV cache, short context), pruned vs original, against the ratio of the weight
  bytes one decode step reads (the decoder and the LM head; decode is memory-bound at batch 1);
- visual-token pruning (``compression.methods.tokens``, hybrid score, original positions) at 25 %
  and 12.5 % of the visual tokens: language-model prefill against its FLOP ratio, on eager kernels
  and again with the original and the short sequences both on oneDNN-packed linears
  (``evaluate.latency(kernels="onednn")``, ``compression.models.kernels``), timed before any pruned
  copy exists so the packed copy fits beside the model; one 4096 -> 11008 linear is timed at the
  same token counts on both kernels;
- int8 and nf4 (``compression.methods.quantize``): quantize time and saved size against the
  what-if bytes;
- save (``prune.save_pruned`` of the width-pruned model) and reload in a fresh process with plain
  transformers (``from_pretrained``, as ``compression.runs.export`` checks an export).

Then a linear fit ``cost(N) = a + b N`` of each cost over the N measured, extrapolated to 32
layers, beside the what-if estimate for LLaVA-1.5-7B. The machine is shared: load average and a
GEMM throughput probe are recorded with every N, minima of interleaved rounds are reported.

Writes benchmarks/results/scale.csv and scale.md (``--tag`` adds a suffix); prints the summary.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RESULTS = REPO / "benchmarks" / "results"
TOKEN_KEEPS = (0.25, 0.125)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CHILD_TIMEOUT_S = 3600
# --tiny: the same code paths on shrunk dimensions, to check the script itself in a minute (not a measurement)
TINY = {"text_config": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 4},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}}


# ------------------------------------------------------------------------------------------ helpers

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own peak (``VmHWM``: ``ru_maxrss`` would carry the parent's peak across fork + exec)."""
    from compression.measure.peaks import peak_rss_bytes as own_peak

    return own_peak()


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def gemm_gflops(dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """Throughput of one decoder-sized GEMM (590 tokens x 4096 -> 11008): how busy the machine is now."""
    x, w = torch.randn(590, 4096, dtype=dtype), torch.randn(11008, 4096, dtype=dtype)
    torch.nn.functional.linear(x, w)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return 2 * 590 * 4096 * 11008 / best / 1e9


def gemm_by_tokens(tokens: tuple[int, ...], rounds: int = 5, dtype: torch.dtype = torch.float32,
                   kernels: str = "eager") -> dict[int, float]:
    """Seconds of one 4096 -> 11008 linear in ``dtype`` (the model's) at each token count, minimum of
    interleaved rounds: how the CPU's GEMM efficiency falls with fewer rows (eager: the weight is laid out
    for the GEMM on every call whatever M is; with bf16 tiles, at a few dozen rows the weight bytes rather
    than the FLOPs bound the time). ``kernels="onednn"``: the same linear on its pre-packed weight
    (``compression.models.kernels.PackedLinear``)."""
    from compression.models import kernels as kernel_choice

    linear = torch.nn.Linear(4096, 11008, bias=False, dtype=dtype)
    run = kernel_choice.PackedLinear(linear) if kernels == "onednn" else linear
    best = {m: float("inf") for m in tokens}
    with torch.no_grad():
        run(torch.randn(2, 4096, dtype=dtype))
        for _ in range(rounds):
            for m in tokens:
                x = torch.randn(m, 4096, dtype=dtype)
                t = time.perf_counter()
                run(x)
                best[m] = min(best[m], time.perf_counter() - t)
    return best


def machine_state() -> dict:
    return {"load_average_1m": os.getloadavg()[0], "gemm_fp32_gflops": round(gemm_gflops(), 1),
            "mem_available_gb": round(mem_available() / 1e9, 1)}


def touch_weights(model: torch.nn.Module) -> None:
    """Read one element per page of every tensor, so memory-mapped weights become resident."""
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            step = max(1, 4096 // t.element_size())
            t.detach().reshape(-1)[::step].float().sum()


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy whose modules are new but whose tensors are the original's (surgery replaces
    modules, never edits tensors in place, so the original is untouched and no weight is duplicated)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def weight_bytes_per_decode_step(model: torch.nn.Module, anatomy) -> int:
    """Bytes one decode step reads: every language-model weight except the embedding table (one row)."""
    embed = model.get_submodule(anatomy.embed_tokens).weight
    language = [model.get_submodule(anatomy.language_model), model.get_submodule(anatomy.lm_head)]
    seen, total = {id(embed)}, 0
    for module in language:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_child(kind: str, payload: dict, timeout: int = CHILD_TIMEOUT_S) -> dict:
    """Run ``--child kind`` in a fresh interpreter; its last stdout line is a JSON object."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--payload", json.dumps(payload)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-3:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail), "wall_s": time.perf_counter() - start}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - start
    return out


# ------------------------------------------------------------------------------------------ children

def _child_load(payload: dict):
    start = time.perf_counter()
    from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: F401 - timed with the imports

    from compression import models
    from compression.methods import importance
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = models.load(payload["model"], dtype=DTYPES[payload["dtype"]])
    return loaded, importance, {"import_s": import_s, "load_s": time.perf_counter() - start,
                                "rss_after_load": rss_bytes(), "peak_after_load": peak_rss_bytes()}


def child_load_bi(payload: dict) -> dict:
    loaded, importance, out = _child_load(payload)
    start = time.perf_counter()
    touch_weights(loaded.model)
    out.update(touch_s=time.perf_counter() - start, rss_resident=rss_bytes())
    records = importance.calibration_selection("shapes", payload["samples"]).records
    batches = importance.calibration_batches(loaded.prompt, records)
    out["calibration_tokens"] = int(sum(int(b["attention_mask"].sum()) for b in batches))
    before = rss_bytes()
    start = time.perf_counter()
    frame = importance.layer_importance(loaded, batches, "block_influence")
    out.update(bi_s=time.perf_counter() - start, bi_rss_before=before, bi_peak=peak_rss_bytes(),
               bi_scores=frame["score"].tolist())
    return out


def child_taylor(payload: dict) -> dict:
    loaded, importance, out = _child_load(payload)
    touch_weights(loaded.model)
    records = importance.calibration_selection("shapes", payload["samples"]).records
    # one mini-batch per sample: the old path's smallest activation footprint (the lean one takes all at once)
    batches = importance.calibration_batches(loaded.prompt, records, batch_size=1)
    groups = [g for k in ("heads", "neurons") for g in importance.coupled_groups(loaded.model, loaded.anatomy, k)]
    out["scored_bytes"] = sum(p.numel() * p.element_size() for p in importance._scored_parameters(groups))
    gc.collect()
    before, peak_before = rss_bytes(), peak_rss_bytes()
    start = time.perf_counter()
    frames = importance.unit_importances(loaded, batches, ("heads", "neurons"), "taylor", lean=payload["lean"])
    out.update(taylor_s=time.perf_counter() - start, rss_before=before, peak_before=peak_before,
               peak=peak_rss_bytes(), rss_after=rss_bytes())
    for kind, frame in frames.items():
        frame.to_csv(Path(payload["scores_to"]) / f"{kind}.csv", index=False)
    return out


def child_quantize(payload: dict) -> dict:
    loaded, _, out = _child_load(payload)
    from compression.methods import quantize

    start = time.perf_counter()
    quantize.quantize_model(loaded.model, loaded.anatomy, payload["format"])
    out["quantize_s"] = time.perf_counter() - start
    folder = Path(payload["out"])
    start = time.perf_counter()
    quantize.save_quantized(loaded.model, loaded.processor, folder, payload["format"])
    out.update(save_s=time.perf_counter() - start, bytes=folder_bytes(folder), peak=peak_rss_bytes())
    shutil.rmtree(folder, ignore_errors=True)
    return out


def child_reload(payload: dict) -> dict:
    """What a user does with an export: plain transformers, no project import."""
    start = time.perf_counter()
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration
    import_s = time.perf_counter() - start
    # head counts that do not divide hidden_size are saved as "llava_pruned" with its modeling code in the
    # folder (auto_map), loaded with trust_remote_code, exactly as compression.runs.export checks an export
    remote = bool(json.loads((Path(payload["model"]) / "config.json").read_text()).get("auto_map"))
    start = time.perf_counter()
    if remote:
        model = AutoModelForImageTextToText.from_pretrained(payload["model"], trust_remote_code=True)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(payload["model"])
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    touch_weights(model)
    state = model.state_dict()
    matches = all(abs(float(state[k].double().sum()) - v) <= 1e-6 * max(1.0, abs(v)) for k, v in payload["sums"].items())
    return {"import_s": import_s, "load_s": load_s, "touch_s": time.perf_counter() - start,
            "rss_resident": rss_bytes(), "tensors_match": matches, "class": type(model).__name__}


CHILDREN = {"load_bi": child_load_bi, "taylor": child_taylor, "quantize": child_quantize, "reload": child_reload}


# ------------------------------------------------------------------------------------------ one model

class Rows:
    """Long-format results: one row per (layers, dtype, item, variant)."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, layers, dtype, item, value, unit, variant="", ideal=None, note=""):
        of_ideal = None
        if ideal not in (None, 0) and value is not None:
            of_ideal = value / ideal
        self.rows.append({"layers": layers, "dtype": dtype, "item": item, "variant": variant, "value": value,
                          "unit": unit, "ideal": ideal, "of_ideal": of_ideal, "note": note})

    def get(self, layers, dtype, item, variant=""):
        for r in self.rows:
            if (r["layers"], r["dtype"], r["item"], r["variant"]) == (layers, dtype, item, variant):
                return r
        return None


def _log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.0f} s] {msg}", flush=True)


def measure(n_layers: int, dtype: str, args, rows: Rows, workdir: Path) -> dict:
    """Every measurement for one (N, dtype); returns extra facts for the summary."""
    import pandas as pd

    import scale_model
    from compression import models
    from compression.data.sources import open_source, select
    from compression.measure import evaluate
    from compression.methods import importance, prune, quantize, tokens

    facts: dict = {"machine_before": machine_state()}
    folder = workdir / f"llava-scale-{n_layers}-{dtype}"
    shutil.rmtree(folder, ignore_errors=True)
    need = scale_model.expected_bytes(n_layers, dtype, shrink=TINY if args.tiny else None)
    free = shutil.disk_usage(workdir).free
    if 2.5 * need > free:  # the model, one pruned copy, one quantized copy
        raise SystemExit(f"error: --workdir {workdir}: {n_layers} layers in {dtype} need ~{2.5 * need / 1e9:.0f} GB "
                         f"free, {free / 1e9:.0f} GB there")
    _log(f"N={n_layers} {dtype}: writing {need / 1e9:.1f} GB to {folder}")
    start = time.perf_counter()
    scale_model.write_scale_model(folder, n_layers, dtype, shrink=TINY if args.tiny else None)
    add = lambda *a, **k: rows.add(n_layers, dtype, *a, **k)  # noqa: E731
    add("generate_s", time.perf_counter() - start, "s")
    add("weights_on_disk", folder_bytes(folder), "B")
    try:
        base = {"model": str(folder), "dtype": dtype, "samples": args.calibration}
        if args.latency_only:
            bi_frame, scores = None, None  # plans from magnitude scores below: the same widths, other units
        else:
            bi_frame, scores = _importance_children(n_layers, dtype, args, base, add, facts, workdir, need)

        _log("load in this process; plans and surgery")
        loaded = models.load(str(folder), dtype=DTYPES[dtype])
        touch_weights(loaded.model)
        model, anatomy, processor = loaded.model, loaded.anatomy, loaded.processor
        if scores is None:
            scores = importance.unit_importances(loaded, None, ("heads", "neurons"), "magnitude")
        # width: neurons in multiples of 32 (the least the planner allows; its default before "auto");
        # width-128: in multiples of 128, what the planner's default ("auto") chooses for layers this wide
        plans = {"layer": prune.make_plan(loaded, "layer", ratio=args.ratio, scores=bi_frame),
                 "width": prune.make_plan(loaded, "width", ratio=args.ratio, scores=scores, layer_range=(0, n_layers),
                                          neuron_multiple=32)}
        rounded = prune.make_plan(loaded, "width", ratio=args.ratio, scores=scores, layer_range=(0, n_layers),
                                  neuron_multiple=128)
        if rounded.widths_after != plans["width"].widths_after:
            plans["width-128"] = rounded
        return _measure_loaded(n_layers, dtype, args, add, facts, workdir, folder, base, loaded, model, anatomy,
                               processor, plans)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        facts["machine_after"] = machine_state()


def _importance_children(n_layers, dtype, args, base, add, facts, workdir, need):
    """Block influence, lean and old Taylor, each in a fresh process: ``(bi frame, lean Taylor frames)``."""
    import pandas as pd

    if True:
        _log("load + block influence (fresh process)")
        lb = run_child("load_bi", base)
        if "error" in lb:
            raise RuntimeError(f"load/BI child failed: {lb['error']}")
        add("import_s", lb["import_s"], "s", note="transformers' LLaVA classes + compression, fresh process")
        add("load_s", lb["load_s"], "s", note="compression.models.load; safetensors memory-mapped")
        add("load_rss", lb["rss_after_load"], "B")
        add("touch_s", lb["touch_s"], "s", note="bring every weight page in (page cache, not disk)")
        add("resident_rss", lb["rss_resident"], "B")
        add("bi_s", lb["bi_s"], "s", note=f"{args.calibration} sample(s), {lb['calibration_tokens']} tokens")
        add("bi_peak_rss", lb["bi_peak"], "B")
        facts["calibration_tokens"] = lb["calibration_tokens"]
        bi_frame = pd.DataFrame({"layer": range(n_layers), "score": lb["bi_scores"], "method": "block_influence"})

        taylor = {}
        for lean in (True, False):
            name = "lean" if lean else "old"
            scores_to = workdir / f"scores-{name}"
            shutil.rmtree(scores_to, ignore_errors=True)
            scores_to.mkdir(parents=True)
            if not lean:
                # anonymous memory the old path adds: the gradients, ~0.25 GB of fp32 activations per layer
                # and sample at 590 tokens, logits; the weights are page cache already counted in `need`
                grads = scale_model_params_bytes(n_layers, dtype)
                activations = args.calibration * n_layers * 0.25e9 * (1 if dtype == "fp32" else 0.5) + 1e9
                if grads + activations + 2e9 > mem_available() - need:  # 2 GB left for everyone else
                    add("taylor_s", None, "s", "old", note=f"skipped: needs ~{(grads + activations) / 1e9:.0f} GB "
                                                          f"more than MemAvailable")
                    continue
            _log(f"Taylor, {name} path (fresh process)")
            t = run_child("taylor", {**base, "lean": lean, "scores_to": str(scores_to)})
            if "error" in t:
                add("taylor_s", None, "s", name, note=t["error"][:200])
                continue
            taylor[name] = {k: pd.read_csv(scores_to / f"{k}.csv") for k in ("heads", "neurons")}
            add("taylor_s", t["taylor_s"], "s", name, note="heads + neurons, one backward")
            add("taylor_rss_before", t["rss_before"], "B", name)
            add("taylor_peak_rss", t["peak"], "B", name)
            add("taylor_scored_grad_bytes", t["scored_bytes"], "B", name)
        if "lean" not in taylor:
            raise RuntimeError("the lean Taylor child failed; see scale.csv")
        if "old" in taylor:
            for kind in ("heads", "neurons"):
                a = torch.tensor(taylor["lean"][kind]["score"].values)
                b = torch.tensor(taylor["old"][kind]["score"].values)
                add("taylor_max_rel_diff", float(((a - b).abs() / b.abs().clamp_min(1e-30)).max()), "", kind)
        return bi_frame, taylor["lean"]


def _measure_loaded(n_layers, dtype, args, add, facts, workdir, folder, base, loaded, model, anatomy, processor,
                    plans):
    """Surgery, latencies, then (unless ``--latency-only``) save / reload and quantization."""
    from compression import models
    from compression.data.sources import open_source, select
    from compression.measure import evaluate
    from compression.methods import prune, quantize, tokens
    from compression.models import kernels as kernel_choice

    if True:
        record = select(open_source({"path": "shapes", "split": "test"}), samples=1).records[0]
        enc = evaluate.latency_inputs(loaded, record)  # the model's chat template, as every latency figure
        with torch.no_grad():
            merged = tokens.merge_inputs(model, enc)
        seq = int(merged.attention_mask.shape[1])
        prompt_tokens = seq - anatomy.visual_tokens
        facts.update(sequence_tokens=seq, prompt_tokens=prompt_tokens)
        lm_inputs = {"inputs_embeds": merged.inputs_embeds, "attention_mask": merged.attention_mask}
        token_inputs, token_lengths = {}, {}
        for keep in TOKEN_KEEPS:
            cfg = tokens.TokenPruningConfig(keep_ratio=keep, scorer="hybrid", semantic="similarity")
            kept = tokens.prune_visual_tokens(model, enc, cfg)
            name = f"tokens-{keep:g}"
            token_inputs[name] = kept.model_kwargs()
            token_lengths[name] = (int(kept.kept.shape[1]), int(kept.inputs_embeds.shape[1]))
        ideal_before = prune.what_if(loaded, None, hardware="cpu", prompt_tokens=prompt_tokens)
        ideal = {name: prune.what_if(loaded, None, hardware="cpu", prompt_tokens=prompt_tokens, visual_tokens=visual)
                 for name, (visual, _) in token_lengths.items()}
        lengths = (seq, *(length for _, length in token_lengths.values()))

        # the same sequences on oneDNN-packed linears (compression.models.kernels), before any pruned copy
        # exists: the packed copy of the weights must fit beside the model
        _log(f"prefill, language model alone, onednn kernels: {1 + len(token_inputs)} entries x {args.repeats} rounds")
        try:
            dnn = evaluate.latency({"original": model, **{name: model for name in token_inputs}}, None,
                                   repeats=args.repeats, warmup=args.warmup, decode_tokens=0,
                                   inputs_by_name={"original": lm_inputs, **token_inputs}, statistic="min",
                                   rotate=True, kernels="onednn")
        except kernel_choice.KernelError as e:
            add("prefill_lm_ms", None, "ms", "onednn:original", note=str(e))
            dnn = None
        if dnn is not None:
            gemm_dnn = gemm_by_tokens(lengths, dtype=model.dtype, kernels="onednn")
            facts["gemm_by_tokens_onednn"] = {m: 2 * m * 4096 * 11008 / t / 1e9 for m, t in gemm_dnn.items()}
            for name, r in dnn.items():
                length = token_lengths[name][1] if name in token_lengths else seq
                add("prefill_lm_ms", r["prefill_ms"], "ms", f"onednn:{name}",
                    note=f"min of {args.repeats}: " + " ".join(f"{x:.0f}" for x in r["prefill_ms_all"])
                    + f"; {length} tokens; oneDNN pre-packed linears")
                if name != "original":
                    add("speedup_lm", dnn["original"]["prefill_ms"] / r["prefill_ms"], "x", f"onednn:{name}",
                        ideal=ideal_before["prefill_flops"]["language"] / ideal[name]["prefill_flops"]["language"],
                        note="ideal = language-model prefill FLOPs ratio (what-if); both on onednn kernels")
                    add("speedup_lm_vs_gemm", dnn["original"]["prefill_ms"] / r["prefill_ms"], "x",
                        f"onednn:{name}", ideal=gemm_dnn[seq] / gemm_dnn[length],
                        note="ideal = time ratio of one packed decoder linear at the two token counts")

        pruned = {}
        for name, plan in plans.items():
            copy_ = shared_copy(model)
            start = time.perf_counter()
            pruned[name], _ = prune.apply_plan(copy_, anatomy, plan)
            add("surgery_s", time.perf_counter() - start, "s", name,
                note=f"achieved {plan.ratio_achieved:.3f}; " + (f"layers removed {plan.layers_removed}"
                     if plan.method == "layer" else
                     f"heads {sorted(set(plan.widths_after['num_attention_heads']))}, "
                     f"neurons {sorted(set(plan.widths_after['intermediate_size']))}"))
            pruned[name].eval()
        facts["plans"] = {k: {"ratio": p.ratio_achieved, "widths": {w: sorted(set(v)) for w, v in
                                                                     p.widths_after.items()},
                              "layers_removed": p.layers_removed} for k, p in plans.items()}

        entries = {"original": model, **pruned, **{name: model for name in token_inputs}}
        inputs = {name: lm_inputs for name in entries} | token_inputs

        gemm = gemm_by_tokens(lengths, dtype=model.dtype)
        facts["gemm_by_tokens"] = {m: 2 * m * 4096 * 11008 / t / 1e9 for m, t in gemm.items()}
        ideal.update({name: prune.what_if(loaded, plan, hardware="cpu", prompt_tokens=prompt_tokens)
                      for name, plan in plans.items()})

        _log(f"prefill, language model alone: {len(entries)} entries x {args.repeats} rounds (+{args.warmup} warm-up)")
        lm = evaluate.latency(entries, None, repeats=args.repeats, warmup=args.warmup, decode_tokens=0,
                              inputs_by_name=inputs, statistic="min", rotate=True)
        base_ms = lm["original"]["prefill_ms"]
        for name, r in lm.items():
            flops_ratio = ideal_before["prefill_flops"]["language"] / ideal[name]["prefill_flops"]["language"] \
                if name != "original" else 1.0
            add("prefill_lm_ms", r["prefill_ms"], "ms", name,
                note=f"min of {args.repeats}: " + " ".join(f"{x:.0f}" for x in r["prefill_ms_all"])
                + (f"; {token_lengths[name][1]} tokens" if name in token_lengths else f"; {seq} tokens"))
            if name != "original":
                add("speedup_lm", base_ms / r["prefill_ms"], "x", name, ideal=flops_ratio,
                    note="ideal = language-model prefill FLOPs ratio (what-if)")
            if name in token_lengths:
                add("speedup_lm_vs_gemm", base_ms / r["prefill_ms"], "x", name,
                    ideal=gemm[seq] / gemm[token_lengths[name][1]],
                    note="ideal = time ratio of one decoder GEMM at the two token counts (measured here)")

        _log("decode, short context")
        short = {"inputs_embeds": merged.inputs_embeds[:, :args.decode_context],
                 "attention_mask": merged.attention_mask[:, :args.decode_context]}
        decode_entries = {"original": model, **pruned}
        dec = evaluate.latency(decode_entries, None, repeats=args.repeats, warmup=args.warmup,
                               decode_tokens=args.decode_tokens, inputs_by_name={n: short for n in decode_entries},
                               statistic="min", rotate=True)
        read = {name: weight_bytes_per_decode_step(m, anatomy) for name, m in decode_entries.items()}
        for name, r in dec.items():
            add("decode_tokens_per_s", r["decode_tokens_per_s"], "tok/s", name,
                note=f"max of {args.repeats} rounds of {args.decode_tokens} tokens after {args.decode_context}; "
                     f"{read[name] / 1e9:.2f} GB read per step")
            if name != "original":
                add("decode_speedup", r["decode_tokens_per_s"] / dec["original"]["decode_tokens_per_s"], "x", name,
                    ideal=read["original"] / read[name], note="ideal = weight bytes read per decode step ratio")

        e2e_entries = None
        if n_layers in args.e2e_layers:
            e2e_entries = {"original": model, "layer": pruned["layer"], "width": pruned["width"]}
            _log(f"prefill, end to end: {len(e2e_entries)} entries x {args.repeats} rounds")
            e2e = evaluate.latency(e2e_entries, enc, repeats=args.repeats, warmup=args.warmup,
                                   decode_tokens=0, statistic="min", rotate=True)
            for name, r in e2e.items():
                add("prefill_e2e_ms", r["prefill_ms"], "ms", name,
                    note=f"min of {args.repeats}: " + " ".join(f"{x:.0f}" for x in r["prefill_ms_all"]))
                if name != "original":
                    add("speedup_e2e", e2e["original"]["prefill_ms"] / r["prefill_ms"], "x", name,
                        ideal=ideal_before["prefill_flops"]["total"] / ideal[name]["prefill_flops"]["total"],
                        note="ideal = whole-model prefill FLOPs ratio (vision tower unchanged)")

        facts["what_if_prefill_ms"] = ideal_before["prefill_ms"]
        facts["what_if_bytes"] = ideal_before["bytes"]
        if args.latency_only:
            return facts
        linear = sum(lin.weight.numel() for _, _, lin in quantize.decoder_linears(model, anatomy).values())
        rest = models.tensor_bytes(model) - linear * model.dtype.itemsize
        facts["quantized_estimate"] = {"int8": rest + linear + 4 * linear // 4096,  # + one fp32 scale per row
                                       "nf4": rest + linear // 2 + 4 * (linear // 64)}  # + fp32 absmax per block
        width_model, width_plan = pruned["width"], plans["width"]
        sums = {k: float(v.double().sum()) for k, v in list(width_model.state_dict().items())[::40]}
        del entries, inputs, pruned, decode_entries, e2e_entries, model, loaded
        gc.collect()

        out = workdir / f"pruned-width-{n_layers}-{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        _log("save the width-pruned model; reload it in a fresh process")
        start = time.perf_counter()
        prune.save_pruned(width_model, processor, out, width_plan)
        add("save_s", time.perf_counter() - start, "s", "width", note=f"{folder_bytes(out) / 1e9:.2f} GB")
        del width_model
        gc.collect()
        reload = run_child("reload", {"model": str(out), "sums": sums})
        if "error" in reload:
            add("reload_s", None, "s", "width", note=reload["error"][:200])
        else:
            add("reload_s", reload["load_s"], "s", "width",
                note=f"from_pretrained ({reload['class']}), fresh process, no project import; tensors match: "
                     f"{reload['tensors_match']}; "
                     f"+{reload['touch_s']:.1f} s to bring pages in")
        shutil.rmtree(out, ignore_errors=True)

        for fmt in ("int8", "nf4"):
            _log(f"quantize {fmt} (fresh process)")
            q = run_child("quantize", {**base, "format": fmt, "out": str(workdir / f"q-{fmt}")})
            if "error" in q:
                add("quantized_bytes", None, "B", fmt, note=q["error"][:200])
                continue
            add("quantize_s", q["quantize_s"], "s", fmt)
            add("quantized_bytes", q["bytes"], "B", fmt, ideal=facts["quantized_estimate"][fmt],
                note=f"saved safetensors; ideal = decoder linears at {fmt} + the rest at {dtype}; the what-if "
                     f"figure (rest in bf16) is {facts['what_if_bytes'][fmt] / 1e9:.2f} GB")
    return facts


def scale_model_params_bytes(n_layers: int, dtype: str) -> int:
    """Bytes of the weights Taylor scores (every decoder linear): the old path's gradients."""
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    return n_layers * per_layer * (4 if dtype == "fp32" else 2)


# ------------------------------------------------------------------------------------------ summary

def fit(xs: list[int], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares ``a + b x``; None with fewer than 2 points."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return my - b * mx, b


def _fmt(value, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "B":
        return f"{value / 1e9:.2f} GB"
    if unit == "ms":
        return f"{value:,.0f} ms"
    if unit == "s":
        return f"{value:.1f} s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "tok/s":
        return f"{value:.3f}"
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def summarize(rows: Rows, facts: dict, args: dict, command: str, wall_s: float) -> str:
    layers = sorted({r["layers"] for r in rows.rows})
    dtypes = sorted({r["dtype"] for r in rows.rows})
    lines = ["# Real scale on CPU: LLaVA-1.5-7B layer shapes, N decoder layers (measured)", "",
             f"Command: `{command}` ({wall_s / 60:.0f} min wall).  ",
             f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 matmul: "
             f"{'yes' if native_bf16() else 'no (no AVX512-BF16 / AMX)'}; "
             f"fp32 GEMM probe {facts['gemm']['fp32']:.0f} GFLOPS, bf16 {facts['gemm']['bf16']:.0f} GFLOPS "
             f"(590x4096 by 4096x11008, best of 1 s). "
             "**The machine is shared** with other engineers' jobs: every latency is the minimum of "
             f"{args['repeats']} interleaved, order-rotated rounds after {args['warmup']} warm-up round(s), and load "
             "average / GEMM throughput were recorded before and after each N (below).", "",
             f"Model: `benchmarks/scale_model.py` (LLaVA-1.5-7B dimensions: Llama 4096 hidden, 32 x 128 heads, 32 KV "
             "heads, 11008 intermediate, vocabulary 32064; CLIP ViT-L/14-336, 576 visual tokens; MLP projector), "
             "N decoder layers, random weights, sharded safetensors, written to and read from the page cache. "
             f"Calibration: {args['calibration']} ShapesVQA sample(s) "
             f"({facts.get('calibration_tokens', '?')} tokens). Latency input: one ShapesVQA image + question = "
             f"{facts.get('sequence_tokens', '?')} tokens ({facts.get('prompt_tokens', '?')} text). Pruning: 30 % of "
             "language-model parameters (embeddings and LM head included), layer = lowest block influence, "
             "width = lean-Taylor heads and neurons over every layer.", ""]
    lines[-2] = lines[-2].replace("Pruning: 30 %", f"Pruning: {args.get('ratio', 0.3):.0%}")
    failures = [r for r in rows.rows if r["item"] == "failed"]
    if failures:
        lines += ["**Failed:** " + "; ".join(f"N = {r['layers']} {r['dtype']}: {r['note']}" for r in failures), ""]
    for d in dtypes:
        lines += [f"## {d}", "", "| | " + " | ".join(f"N = {n}" for n in layers) + " |",
                  "| --- |" + " --- |" * len(layers)]

        def row(label, item, variant="", show="value"):
            cells = []
            for n in layers:
                r = rows.get(n, d, item, variant)
                if r is None:
                    cells.append("")
                elif show == "with_ideal":
                    cells.append(_fmt(r["value"], r["unit"]) + ("" if r["ideal"] is None
                                                                else f" ({_fmt(r['ideal'], r['unit'])})"))
                elif show == "of_ideal":
                    cells.append("n/a" if r["value"] is None else
                                 f"{r['value']:.2f}x / {r['ideal']:.2f}x = **{r['of_ideal']:.2f}**")
                else:
                    cells.append(_fmt(r["value"], r["unit"]))
            if any(cells):
                lines.append(f"| {label} | " + " | ".join(cells) + " |")

        row("generate (write shards)", "generate_s")
        row("weights on disk", "weights_on_disk")
        row("import (fresh process)", "import_s")
        row("load (`models.load`, mmap)", "load_s")
        row("RSS after load", "load_rss")
        row("bring weights in (touch)", "touch_s")
        row("RSS, weights resident", "resident_rss")
        row("block influence", "bi_s")
        row("block influence peak RSS", "bi_peak_rss")
        for path in ("lean", "old"):
            row(f"Taylor {path} (heads + neurons)", "taylor_s", path)
            row(f"Taylor {path} RSS before", "taylor_rss_before", path)
            row(f"Taylor {path} peak RSS", "taylor_peak_rss", path)
        row("gradients the old path keeps", "taylor_scored_grad_bytes", "old")
        row("lean vs old, max rel. diff (heads)", "taylor_max_rel_diff", "heads")
        row("lean vs old, max rel. diff (neurons)", "taylor_max_rel_diff", "neurons")
        for v in ("layer", "width", "width-128"):
            row(f"surgery {v}", "surgery_s", v)
        row("prefill LM alone, original", "prefill_lm_ms", "original")
        for v in ("layer", "width", "width-128", "tokens-0.25", "tokens-0.125"):
            row(f"prefill LM alone, {v}", "prefill_lm_ms", v)
            row(f"speedup / ideal, LM alone, {v}", "speedup_lm", v, "of_ideal")
            row(f"speedup / GEMM-time ratio, {v}", "speedup_lm_vs_gemm", v, "of_ideal")
        row("prefill LM alone, original, onednn kernels", "prefill_lm_ms", "onednn:original")
        for v in ("tokens-0.25", "tokens-0.125"):
            row(f"prefill LM alone, {v}, onednn kernels", "prefill_lm_ms", f"onednn:{v}")
            row(f"speedup / ideal, LM alone, {v}, onednn kernels", "speedup_lm", f"onednn:{v}", "of_ideal")
            row(f"speedup / packed-GEMM-time ratio, {v}, onednn", "speedup_lm_vs_gemm", f"onednn:{v}", "of_ideal")
        row("prefill end to end, original", "prefill_e2e_ms", "original")
        for v in ("layer", "width"):
            row(f"prefill end to end, {v}", "prefill_e2e_ms", v)
            row(f"speedup / ideal, end to end, {v}", "speedup_e2e", v, "of_ideal")
        row("decode tok/s, original", "decode_tokens_per_s", "original")
        for v in ("layer", "width", "width-128"):
            row(f"decode tok/s, {v}", "decode_tokens_per_s", v)
            row(f"decode speedup / bytes ratio, {v}", "decode_speedup", v, "of_ideal")
        row("int8 quantize", "quantize_s", "int8")
        row("int8 size saved (what-if)", "quantized_bytes", "int8", "with_ideal")
        row("nf4 quantize", "quantize_s", "nf4")
        row("nf4 size saved (what-if)", "quantized_bytes", "nf4", "with_ideal")
        row("save width-pruned", "save_s", "width")
        row("reload (plain transformers)", "reload_s", "width")
        lines.append("")
        plan_lines = []
        for n in layers:
            p = facts["per_model"].get(f"{n}-{d}", {}).get("plans", {})
            if p:
                plan_lines.append(f"- N = {n}: " + "; ".join(
                    f"{k} {v['ratio']:.1%} ({'layers ' + str(v['layers_removed']) if k == 'layer' else 'heads ' + str(v['widths']['num_attention_heads']) + ', neurons ' + str(v['widths']['intermediate_size'])})"
                    for k, v in p.items()))
        lines += ["Plans (achieved fraction of the language model):", ""] + plan_lines + [""]
        machine = []
        for n in layers:
            m = facts["per_model"].get(f"{n}-{d}", {})
            if m:
                b, a = m["machine_before"], m["machine_after"]
                machine.append(f"- N = {n}: load average {b['load_average_1m']:.1f} -> {a['load_average_1m']:.1f}, "
                               f"GEMM {b['gemm_fp32_gflops']:.0f} -> {a['gemm_fp32_gflops']:.0f} GFLOPS, "
                               f"MemAvailable {b['mem_available_gb']:.0f} -> {a['mem_available_gb']:.0f} GB")
        lines += ["Machine state around each N:", ""] + machine + [""]
        def gemm_by_n(key: str) -> list[str]:
            found = [(n, facts["per_model"].get(f"{n}-{d}", {}).get(key)) for n in layers]
            return [f"- N = {n}: " + ", ".join(f"{m} tokens {v:.0f} GFLOPS" for m, v in g.items())
                    for n, g in found if g]

        gemm_lines, dnn_lines = gemm_by_n("gemm_by_tokens"), gemm_by_n("gemm_by_tokens_onednn")
        lines += [f"Visual-token pruning shortens the sequence, and this CPU's eager {d} GEMM "
                  f"({torch.backends.cpu.get_cpu_capability()}{', native bf16' if native_bf16() else ''}) loses "
                  "efficiency with fewer rows: the 4096 x 11008 weight is laid out for the GEMM on every call "
                  "whatever the row count (with bf16 tiles, at a few dozen rows its bytes rather than the FLOPs "
                  "bound the time), so the per-layer time is roughly `a + b * tokens`, not `b * tokens`. Measured, "
                  f"one 4096 -> 11008 linear in {d} (minimum of 5 interleaved rounds), at the sequence lengths "
                  "timed, eager:", "", *gemm_lines, ""]
        if dnn_lines:
            lines += ["and the same linear on its oneDNN-packed weight (`compression.models.kernels`: packed once, "
                      "as a CPU deployment runs it; the `onednn kernels` rows above time the original and the "
                      "token-pruned sequences that way, both on the same kernels):", "", *dnn_lines, ""]

        # ---- growth with N and extrapolation
        est = facts["what_if_32"]
        prof = est["hardware_profile"]
        lang_ms = est["prefill_flops"]["language"] / (prof["peak_flops"] * prof["flops_efficiency"]) * 1e3 \
            + 32 * prof["overhead_per_layer_s"] * 1e3
        bpe = 4 if d == "fp32" else 2
        w32 = est["params_total"] * bpe
        grads32 = scale_model_params_bytes(32, d)
        estimates = {"resident_rss": (w32, f"weights {est['params_total'] / 1e9:.2f} B params x {bpe} B"),
                     "taylor_peak_rss:old": (None, f"weights + {grads32 / 1e9:.1f} GB gradients + activations"),
                     "prefill_lm_ms:original": (lang_ms, "language FLOPs / (peak x efficiency) + per-layer overhead"),
                     "weights_on_disk": (w32, "params x bytes")}
        if d == "fp32":
            estimates["quantized_bytes:int8"] = (est["bytes"]["int8"], "what-if int8 (rest in bf16)")
            estimates["quantized_bytes:nf4"] = (est["bytes"]["nf4"], "what-if nf4 (rest in bf16)")
        if len(layers) >= 2:
            lines += ["### How each cost grows with N, and 32 layers", "",
                      "Least-squares fit `cost(N) = a + b N` over the measured N; extrapolated to N = 32 "
                      "(LLaVA-1.5-7B); the what-if estimate (`compression.measure.whatif` on "
                      "`config:llava-1.5-7b`, CPU profile re-measured at the start of this run: "
                      f"{prof['peak_flops'] / 1e9:.0f} GFLOPS x {prof['flops_efficiency']}, "
                      f"{prof['bandwidth'] / 1e9:.1f} GB/s x {prof['bandwidth_efficiency']}, from a 512 x 512 "
                      "matmul and a 64 MB copy) beside it where one exists.", "",
                      "| cost | a | b (per layer) | at N = 32 | what-if at 32 |", "| --- | --- | --- | --- | --- |"]
            items = [("resident_rss", ""), ("weights_on_disk", ""), ("load_s", ""), ("touch_s", ""), ("bi_s", ""),
                     ("bi_peak_rss", ""), ("taylor_s", "lean"), ("taylor_peak_rss", "lean"), ("taylor_s", "old"),
                     ("taylor_peak_rss", "old"), ("prefill_lm_ms", "original"), ("prefill_lm_ms", "layer"),
                     ("prefill_lm_ms", "width"), ("decode_tokens_per_s", "original"), ("surgery_s", "width"),
                     ("save_s", "width"), ("reload_s", "width"), ("quantized_bytes", "int8"),
                     ("quantized_bytes", "nf4"), ("generate_s", "")]
            for item, variant in items:
                found = [rows.get(n, d, item, variant) for n in layers]
                if not any(found) or not any(r and r["value"] is not None for r in found):
                    continue
                unit = next(r["unit"] for r in found if r)
                values = [r["value"] if r else None for r in found]
                if item == "decode_tokens_per_s":  # fit the time per token, which is what grows linearly
                    values = [1e3 / v if v else None for v in values]
                    unit, label = "ms", "decode ms per token, original"
                else:
                    label = f"{item} {variant}".strip()
                f = fit(layers, values)
                if f is None:
                    continue
                a, b = f
                e = estimates.get(f"{item}:{variant}" if variant else item)
                if item == "decode_tokens_per_s":
                    e = (est["decode_ms_per_token"], "language weights / bandwidth")
                est_text = "" if e is None else (f"{_fmt(e[0], unit)} ({e[1]})" if e[0] is not None else e[1])
                lines.append(f"| {label} | {_fmt(a, unit)} | {_fmt(b, unit)} | {_fmt(a + 32 * b, unit)} | {est_text} |")
            lines.append("")
            lean_fit = fit(layers, [(rows.get(n, d, "taylor_peak_rss", "lean") or {}).get("value") for n in layers])
            old_fit = fit(layers, [(rows.get(n, d, "taylor_peak_rss", "old") or {}).get("value") for n in layers])
            if lean_fit:
                lines.append(f"Taylor peak at 32 layers ({d}, {args['calibration']} sample(s)): lean "
                             f"{(lean_fit[0] + 32 * lean_fit[1]) / 1e9:.1f} GB"
                             + (f", old {(old_fit[0] + 32 * old_fit[1]) / 1e9:.1f} GB" if old_fit else "")
                             + (f"; in bf16 about half (weights and gradients are 2 B): lean "
                                f"~{(lean_fit[0] + 32 * lean_fit[1]) / 2e9:.0f} GB"
                                + (f", old ~{(old_fit[0] + 32 * old_fit[1]) / 2e9:.0f} GB" if old_fit else "")
                                + " (an estimate from the fp32 fit, not a measurement)" if d == "fp32" else "") + ".")
                lines.append("")
        lines += _verdicts(rows, layers, d)
    return "\n".join(lines) + "\n"


def _verdicts(rows: Rows, layers: list[int], d: str) -> list[str]:
    out = ["### Against the goals", ""]
    for n in layers:
        parts = []
        for item, variants, goal in (("speedup_lm", ("layer", "width", "width-128"), 0.9),
                                     ("decode_speedup", ("layer", "width", "width-128"), 0.9),
                                     ("speedup_lm", ("tokens-0.25", "tokens-0.125"), 0.8),
                                     ("speedup_lm", ("onednn:tokens-0.25", "onednn:tokens-0.125"), 0.8),
                                     ("speedup_e2e", ("layer", "width"), None)):
            for v in variants:
                r = rows.get(n, d, item, v)
                if r and r["of_ideal"] is not None:
                    mark = "" if goal is None else (" meets" if r["of_ideal"] >= goal else " **misses**")
                    label = {"speedup_lm": "prefill", "decode_speedup": "decode", "speedup_e2e": "e2e"}[item]
                    parts.append(f"{label} {v} {r['of_ideal']:.2f}{mark}" + ("" if goal is None else f" (>= {goal})"))
        lean = rows.get(n, d, "taylor_peak_rss", "lean")
        old = rows.get(n, d, "taylor_peak_rss", "old")
        before = rows.get(n, d, "taylor_rss_before", "old")
        grads = rows.get(n, d, "taylor_scored_grad_bytes", "old")
        if lean and old and before and grads and None not in (lean["value"], old["value"]):
            activations = old["value"] - before["value"] - grads["value"]
            bound = 1.1 * (before["value"] + activations)
            parts.append(f"Taylor lean peak {lean['value'] / 1e9:.2f} GB vs old {old['value'] / 1e9:.2f} GB; "
                         f"weights + one mini-batch of activations (old peak - gradients) + 10 % = "
                         f"{bound / 1e9:.2f} GB: " + ("meets" if lean["value"] <= bound else "**misses**"))
        out.append(f"- N = {n}: " + "; ".join(parts))
    return out + [""]


# ------------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,4,8", help="decoder layers, comma-separated (default 2,4,8)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated from fp32,bf16 (default fp32, plus bf16 where the CPU has native bf16)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, no warm-up, 2 decode tokens: a smoke run")
    parser.add_argument("--ratio", type=float, default=0.3, help="fraction of language-model parameters pruned")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per latency (minimum reported)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed rounds first (default 0: the minimum already drops a cold first round)")
    parser.add_argument("--calibration", type=int, default=1, help="calibration samples for BI and Taylor")
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--decode-context", type=int, default=32, help="prompt tokens before decoding")
    parser.add_argument("--e2e-layers", default="2", help="N for which end-to-end prefill is timed too")
    parser.add_argument("--workdir", default="/tmp/bench-scale")
    parser.add_argument("--tag", default="", help="suffix for the result files (scale<tag>.csv/md)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--summarize-only", action="store_true",
                        help="rewrite scale<tag>.md from scale<tag>.csv and scale<tag>.json, measuring nothing")
    parser.add_argument("--latency-only", action="store_true",
                        help="surgery, prefill and decode only (plans from magnitude scores: the same widths); for "
                             "re-timing on a quieter machine, merged with --combine")
    parser.add_argument("--combine", default=None,
                        help="comma-separated tags (use - for none) to merge into scale.csv / scale.md, later ones "
                             "replacing earlier rows of the same N, dtype, item and variant; measures nothing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--payload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](json.loads(args.payload))))
        return
    try:
        layer_list = [int(x) for x in args.layers.split(",")]
        args.e2e_layers = [int(x) for x in args.e2e_layers.split(",") if x]
    except ValueError:
        raise SystemExit(f"error: --layers {args.layers!r} / --e2e-layers {args.e2e_layers!r}: expected "
                         "comma-separated integers") from None
    if any(n < 1 for n in layer_list):
        raise SystemExit(f"error: --layers {args.layers!r}: every N must be at least 1")
    dtypes = args.dtypes.split(",") if args.dtypes else ["fp32"] + (["bf16"] if native_bf16() else [])
    if any(d not in DTYPES for d in dtypes):
        raise SystemExit(f"error: --dtypes {args.dtypes!r}: expected fp32 and/or bf16")
    if args.tiny:
        args.ratio = 0.01  # a shrunk layer is ~1 % of the (full-size-vocabulary) language model
    if args.quick:
        args.repeats, args.warmup, args.decode_tokens = 2, 0, 2
    command = "HF_HUB_OFFLINE=1 .venv/bin/python -u benchmarks/bench_scale.py " + " ".join(sys.argv[1:])
    csv_path, facts_path = RESULTS / f"scale{args.tag}.csv", RESULTS / f"scale{args.tag}.json"
    if args.combine:
        return combine([("" if t == "-" else t) for t in args.combine.split(",")])
    if args.summarize_only:
        rows, facts = read_results(csv_path, facts_path)
        write_summary(summarize(rows, facts, facts["args"], facts["command"], facts["wall_s"]), args.tag)
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    facts = {"gemm": {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16)}, "per_model": {},
             "command": command, "args": vars(args)}
    if "bf16" in dtypes and not native_bf16():
        print("note: this CPU has no native bf16 matmul (no AVX512-BF16 / AMX); bf16 timings measure emulation")
    from compression import models
    from compression.measure import whatif

    whatif.cpu_profile(refresh=True)  # the cached calibration may come from a busier hour
    rows = Rows()
    for dtype in dtypes:
        for n in layer_list:
            try:
                f = measure(n, dtype, args, rows, workdir)
            except Exception as e:  # noqa: BLE001 - keep the other N; the row says what failed
                _log(f"N={n} {dtype} failed: {type(e).__name__}: {e}")
                rows.add(n, dtype, "failed", None, "", note=f"{type(e).__name__}: {str(e)[:300]}")
                f = {}
            facts["per_model"][f"{n}-{dtype}"] = f
            for k in ("sequence_tokens", "prompt_tokens", "calibration_tokens"):
                facts[k] = f.get(k, facts.get(k))
            facts["wall_s"] = time.perf_counter() - T0
            write_csv(rows, csv_path)  # after every N: a crash keeps what was measured
            write_json(facts, facts_path)
    facts["what_if_32"] = whatif.what_if(models.load("config:llava-1.5-7b"), None, hardware="cpu",
                                         prompt_tokens=facts.get("prompt_tokens") or 13)
    write_json(facts, facts_path)
    write_summary(summarize(rows, facts, vars(args), command, facts["wall_s"]), args.tag)


def combine(tags: list[str]) -> None:
    """scale.csv / scale.json / scale.md from several runs: rows of later tags replace earlier ones with the same
    (N, dtype, item, variant); facts per model are merged the same way; every command is listed."""
    merged: dict[tuple, dict] = {}
    facts: dict = {"per_model": {}}
    commands, wall = [], 0.0
    for tag in tags:
        rows, f = read_results(RESULTS / f"scale{tag}.csv", RESULTS / f"scale{tag}.json")
        for r in rows.rows:
            merged[(r["layers"], r["dtype"], r["item"], r["variant"])] = r
        for key, value in f.get("per_model", {}).items():
            facts["per_model"].setdefault(key, {}).update(value)
        for key, value in f.items():
            if key != "per_model" and value is not None:
                facts[key] = value
        ns = sorted({r["layers"] for r in rows.rows})
        commands.append(f"{f['command']} [N = {', '.join(map(str, ns))}, {f.get('wall_s', 0) / 60:.0f} min]")
        wall += f.get("wall_s", 0)
    out = Rows()
    out.rows = sorted(merged.values(), key=lambda r: (r["dtype"], r["layers"]))
    write_csv(out, RESULTS / "scale.csv")
    facts["command"] = "; then ".join(commands)
    write_json(facts, RESULTS / "scale.json")
    write_summary(summarize(out, facts, facts["args"], facts["command"], wall), "")


def write_summary(text: str, tag: str) -> None:
    tmp = RESULTS / f".scale{tag}.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, RESULTS / f"scale{tag}.md")
    print(text)


def write_json(facts: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(facts, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_results(csv_path: Path, facts_path: Path) -> tuple[Rows, dict]:
    if not csv_path.is_file() or not facts_path.is_file():
        raise SystemExit(f"error: {csv_path} or {facts_path} is missing; run the benchmark first")
    rows = Rows()
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            num = lambda x: None if x in ("", "None") else float(x)  # noqa: E731
            rows.add(int(r["layers"]), r["dtype"], r["item"], num(r["value"]), r["unit"], r["variant"],
                     num(r["ideal"]), r["note"])
    facts = json.loads(facts_path.read_text())
    facts["per_model"] = {k: {**v, "gemm_by_tokens": {int(m): g for m, g in v.get("gemm_by_tokens", {}).items()}}
                          for k, v in facts["per_model"].items()}
    return rows, facts


def write_csv(rows: Rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layers", "dtype", "item", "variant", "value", "unit", "ideal",
                                               "of_ideal", "note"])
        writer.writeheader()
        writer.writerows(rows.rows)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
