"""The whole compression pipeline for one recipe: load -> prune -> recover -> quantize -> evaluate -> save.

One function, ``run_recipe``, used by ``python -m compression run`` and by the background job
worker alike, so the same recipe and seed give the same metrics either way. It writes a *run
folder* that appears only when complete (built under a hidden temporary name, then renamed):

    <run>/model/         the compressed model, Hugging Face format (safetensors)
    <run>/recipe.yaml    the validated recipe
    <run>/metrics.json   original and compressed: accuracy, per type, params, size, prefill ms,
                         decode tokens/s (measured interleaved in this process), the what-if estimate;
                         the original's accuracy and importance scores are measured once per model
                         and data and shared by later runs (compression.runs.shared)
    <run>/logs/          the pipeline log (and the worker's log when run as a job)

With a ``work_dir`` the pipeline is resumable: the pruned model is kept there and recovery
checkpoints every ``recovery.checkpoint_every`` steps; a second call continues from them.
Methods: Huang et al. (arXiv 2507.20749) for pruning and recovery; QAPruner (arXiv 2604.02816)
for visual-token pruning.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from compression import hardware
from compression.data.sources import Selection, open_source, select
from compression.measure import evaluate, memory_plan, peaks as stage_peaks
from compression.methods import distributed, prune, quantize, recover, tokens
from compression.models import LoadedModel, families, load, parameter_counts
from compression.runs import shared
from compression.runs.recipe import Recipe

# progress(stage, step, total, loss): stage is one of STAGES; step/total count recovery steps.
Progress = Callable[[str, int, int, "float | None"], None]
STAGES = ("load", "prune", "recover", "quantize", "evaluate", "save")


def data_selections(recipe: Recipe, seed: int) -> dict[str, Selection]:
    """The records every step reads, named by the recipe's ``data:`` section and checked before any model
    work starts (a bad record stops the run here, naming it, rather than after an hour of training)."""
    spec = recipe.data
    out: dict[str, Selection] = {}
    if recipe.recovery.mode != "none":
        train = spec.train
        out["train"] = select(open_source(train.source, "train"), samples=train.samples, fraction=train.fraction,
                              seed=seed, on_error=train.on_error, order="random")
    evaluation = spec.eval
    source = open_source(evaluation.source, "eval")
    # one file for both: evaluation never scores a record that recovery trained on
    held_out = out["train"].indices if "train" in out and out["train"].source.fingerprint() == \
        source.fingerprint() else ()
    out["eval"] = select(source, samples=evaluation.samples, fraction=evaluation.fraction, seed=seed,
                         need_images=True, on_error=evaluation.on_error, exclude=held_out)
    if recipe.prune.method != "none" and recipe.prune.scorer != "magnitude":
        calibration = spec.calibration
        out["calibration"] = select(open_source(calibration.source, "calibration"), samples=calibration.samples,
                                    fraction=calibration.fraction, seed=seed, need_images=True,
                                    on_error=calibration.on_error, order="random")
    return out


def run_recipe(recipe: Recipe, out_dir: str | Path, progress: Progress | None = None,
               work_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
               overwrite: bool = False, extra_logs: dict[str, Path] | None = None) -> dict[str, Any]:
    """Run ``recipe`` end to end and write the run folder ``out_dir``; returns the metrics.

    ``work_dir`` (optional) keeps the pruned model and recovery checkpoints for resuming.
    ``extra_logs`` ``{name: path}`` are copied into ``<run>/logs/`` at the end.
    Raises ``ValueError`` (one line) for bad input, e.g. a model without weights.
    """
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not overwrite:
        raise ValueError(f"run folder {out_dir} already exists; expected a new folder (or overwrite)")
    lines: list[str] = []
    started = time.time()
    timings: dict[str, float] = {}

    def say(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        lines.append(line)
        if log is not None:
            log(line)

    def stage(name: str, step: int = 0, total: int = 0, loss: float | None = None) -> None:
        if progress is not None:
            progress(name, step, total, loss)

    chosen = hardware.resolve(recipe.hardware.device, recipe.hardware.dtype)  # one line if it is not there
    say(f"hardware: {chosen.label}")
    seed = recipe.recovery.seed
    torch.manual_seed(seed)
    work = Path(work_dir) if work_dir is not None else None
    peaks = stage_peaks.StagePeaks(chosen)

    # ---------------------------------------------------------------- load
    stage("load")
    t = time.time()
    selections = data_selections(recipe, seed)
    for role, selection in selections.items():
        say(f"data for {role}: {selection.describe()}")
    original = load(recipe.model, device=chosen.device, dtype=chosen.dtype)
    if not original.has_weights:
        raise ValueError(f"model {recipe.model} is config-only (no weights); a run needs weights")
    original.model.requires_grad_(False)
    say(f"loaded {original.name}: {parameter_counts(original.model, original.anatomy)['total']:,} parameters; "
        f"prompted with {original.prompt.name}")
    timings["load_s"] = time.time() - t
    peaks.record("load")

    # ---------------------------------------------------------------- prune
    stage("prune")
    t = time.time()
    student, plan = _pruned_student(recipe, original, work, say, selections.get("calibration"), chosen)
    timings["prune_s"] = time.time() - t
    peaks.record("prune")
    predicted = memory_plan.plan_for_recipe(original, recipe, hardware.device_memory(chosen)[0], chosen.dtype_name,
                                            plan=plan)
    say(f"memory plan: predicted peak {predicted['peak_bytes'] / 2**30:.2f} GiB on {chosen.label}")

    # ---------------------------------------------------------------- recover
    stage("recover")
    t = time.time()
    recovery_info: dict[str, Any] = {"mode": recipe.recovery.mode, "distillation": recipe.recovery.distillation}
    if recipe.recovery.mode != "none":
        spec = recipe.recovery
        samples = selections["train"]
        mapping = recover.layer_mapping(
            original.anatomy.num_layers, plan.layers_removed if plan is not None else None, spec.hidden_layers)
        config = recover.RecoveryConfig(
            mode=spec.mode, distillation=spec.distillation, temperature=spec.temperature, alpha=spec.alpha,
            hidden_layers=mapping, epochs=spec.epochs, learning_rate=spec.learning_rate,
            batch_size=spec.batch_size, seed=seed, lora_r=spec.lora_r, lora_alpha=spec.lora_alpha,
            checkpoint_every=spec.checkpoint_every, max_steps=spec.max_steps,
            gradient_checkpointing=spec.gradient_checkpointing,
            checkpoint_dir=work / "checkpoint" if work is not None else None)
        say(f"recovery: {spec.mode}, distillation {spec.distillation}, on {samples.describe()}, "
            f"{spec.epochs} epoch(s)")
        result = recover.recover(student.model, student.anatomy, student.prompt, samples, config,
                                 teacher=original.model, log=say, hardware=chosen,
                                 progress=lambda step, total, loss: stage("recover", step, total, loss))
        student.model = result.model
        say(f"recovery done: {result.steps} steps in {result.seconds:.1f}s"
            + (f" (resumed at step {result.resumed_from})" if result.resumed_from else ""))
        recovery_info.update(steps=result.steps, seconds=round(result.seconds, 2), resumed_from=result.resumed_from,
                             train_samples=len(samples), data_fraction=samples.fraction,
                             supervised_tokens=result.supervised_tokens,
                             final_loss=result.losses[-1] if result.losses else None,
                             hidden_layers={str(k): v for k, v in mapping.items()}
                             if "hidden" in spec.distillation else None)
    timings["recover_s"] = time.time() - t
    peaks.record("recover")

    # ---------------------------------------------------------------- quantize
    stage("quantize")
    t = time.time()
    if recipe.quantize != "none":
        student.model = _quantized(student, recipe.quantize)
        say(f"quantized the language model to {recipe.quantize}")
    timings["quantize_s"] = time.time() - t

    # ---------------------------------------------------------------- evaluate
    stage("evaluate")
    t = time.time()
    generate_fn = inputs_fn = None
    if recipe.visual_tokens.keep_ratio < 1:
        generate_fn, inputs_fn = _token_pruning(recipe)
        say(f"visual tokens: keeping {recipe.visual_tokens.keep_ratio:.0%} ({recipe.visual_tokens.scorer}, "
            f"alpha {recipe.visual_tokens.alpha})")
    world = distributed.launched_world_size()
    if world > 1:
        share = -(-len(selections["eval"]) // world)
        say(f"evaluation split over {world} processes (up to {share} records each)")
    metrics = _measure(original, student, selections["eval"], recipe.data.eval, generate_fn, inputs_fn, plan, say,
                       kernels=recipe.hardware.kernels)
    if not _is_main_process():
        return {}  # under `accelerate launch`, every rank answered its share; rank 0 alone times and saves
    metrics["data"] = {role: selection.summary() for role, selection in selections.items()}
    metrics["prompt"] = original.prompt.name
    metrics["hardware"] = chosen.to_dict()
    timings["evaluate_s"] = time.time() - t
    peaks.record("evaluate")

    # ---------------------------------------------------------------- save
    stage("save")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_model(student, tmp / "model", plan)
        metrics["compressed"]["size_bytes"] = evaluate.size_bytes(student.model, tmp / "model")
        metrics["kept"]["size"] = metrics["compressed"]["size_bytes"] / metrics["original"]["size_bytes"]
        timings["total_s"] = time.time() - started
        peaks.record("save")
        metrics.update(recipe=recipe.to_dict(), recovery=recovery_info,
                       timings={k: round(v, 2) for k, v in timings.items()},
                       memory={**peaks.to_dict(), "predicted_bytes": {k: v["total"] for k, v in
                                                                      predicted["stages"].items()}})
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        say(f"accuracy {metrics['original']['accuracy']:.1%} -> {metrics['compressed']['accuracy']:.1%}, "
            f"params {metrics['original']['params_total']:,} -> {metrics['compressed']['params_total']:,}")
        (tmp / "logs").mkdir()
        (tmp / "logs" / "pipeline.log").write_text("\n".join(lines) + "\n")
        for name, path in (extra_logs or {}).items():
            if Path(path).is_file():
                shutil.copyfile(path, tmp / "logs" / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def _pruned_student(recipe: Recipe, original: LoadedModel, work: Path | None, say,
                    calibration: Selection | None, chosen=None):
    """The student before recovery: a pruned copy of the original (or the copy kept in ``work``)."""
    kept = work / "pruned" if work is not None else None
    if kept is not None and (kept / "config.json").is_file():
        where = {"device": chosen.device, "dtype": chosen.dtype} if chosen is not None else {}
        student = load(str(kept), **where)
        plan = prune.load_plan(kept / "pruning_plan.json") if (kept / "pruning_plan.json").is_file() else None
        say(f"resuming with the pruned model kept in {kept}")
        return student, plan
    student = LoadedModel(copy.deepcopy(original.model), original.processor, original.anatomy, original.name,
                          original.kind, original.path, True, original.fingerprint)
    plan = None
    if recipe.prune.method != "none":
        scores = _importance_scores(recipe, original, calibration, say)
        plan = prune.make_plan((student.model, student.anatomy), recipe.prune.method, ratio=recipe.prune.ratio,
                               scores=scores, layer_range=recipe.prune.layer_range, scorer=recipe.prune.scorer,
                               servable=recipe.prune.servable, neuron_multiple=recipe.prune.neuron_multiple)
        student.model, student.anatomy = prune.apply_plan(student.model, student.anatomy, plan)
        student.path = None
        say(f"pruned ({plan.method}, {recipe.prune.scorer}): asked {recipe.prune.ratio:.0%}, achieved "
            f"{plan.ratio_achieved:.1%} of the language model; params {plan.params_before:,} -> {plan.params_after:,}"
            + (f"; layers removed {plan.layers_removed}" if plan.layers_removed else ""))
    if kept is not None and _is_main_process():
        _save_model(student, kept, plan)
    return student, plan


def _is_main_process() -> bool:
    """Rank 0 under ``accelerate launch`` (or the only process); read from the launcher's environment."""
    return int(os.environ.get("RANK", "0")) == 0


def _importance_scores(recipe: Recipe, original: LoadedModel, calibration: Selection | None, say):
    """Scores the plan ranks by, from compression.methods.importance (computed once per model and
    calibration data, shared by every later run: compression.runs.shared)."""
    if recipe.prune.method == "layer":
        return shared.importance_scores(original, "layers", recipe.prune.scorer, calibration, say)
    return {kind: shared.importance_scores(original, kind, recipe.prune.scorer, calibration, say)
            for kind in ("heads", "neurons")}


def _quantized(student: LoadedModel, fmt: str):
    out = quantize.quantize_model(student.model, student.anatomy, fmt)
    return out[0] if isinstance(out, tuple) else out


def _token_pruning(recipe: Recipe):
    """``generate_fn`` for accuracy and ``inputs_fn`` for latency, from compression.methods.tokens (QAPruner)."""
    spec = recipe.visual_tokens
    scorer, semantic = tokens.RECIPE_SCORERS.get(spec.scorer, (spec.scorer, None))
    kwargs = dict(alpha=spec.alpha, seed=recipe.recovery.seed, semantic=semantic or "attention")
    return (tokens.make_generate_fn(spec.keep_ratio, scorer, **kwargs),
            tokens.make_inputs_fn(spec.keep_ratio, scorer, **kwargs))


def _save_model(student: LoadedModel, folder: Path, plan) -> None:
    pruned_type = families.family_for(student.model.config).pruned_model_type
    if student.model.config.model_type == pruned_type and "_weight_conversions" in vars(student.model):
        # A model loaded with from_pretrained remembers transformers' legacy-key conversion and saves
        # keys the old way (LLaVA: "language_model.lm_head.weight"); for model_type "<family>_pruned"
        # loading does not map them back and lm_head would come back random. Save today's keys.
        del student.model._weight_conversions
    fmt = quantize.quantization_format(student.model)
    if fmt is not None:
        quantize.save_quantized(student.model, student.processor, folder, fmt)
        if plan is not None:
            (folder / "pruning_plan.json").write_text(plan.to_json())
        return
    prune.save_pruned(student.model, student.processor, folder, plan)


def _measure(original: LoadedModel, student: LoadedModel, test: Selection, spec, generate_fn, inputs_fn, plan,
             say, kernels: str = "eager") -> dict[str, Any]:
    """Accuracy of both on the same records; latency of both interleaved in this process."""
    report: dict[str, Any] = {"eval_samples": len(test), "eval_data": test.describe()}
    started, answered = time.time(), 0
    for name, loaded, fn in (("original", original, None), ("compressed", student, generate_fn)):
        if name == "original":  # the same for every run of this model on these records: measured once
            acc, computed = shared.original_accuracy(loaded, test, spec.metric, spec.max_new_tokens, say,
                                                     split=True)
            report["evaluation"] = {"original_accuracy": "measured in this run" if computed else "cached"}
            answered += len(test) if computed else 0
        else:
            acc = evaluate.accuracy(loaded, test.records, spec.metric, max_new_tokens=spec.max_new_tokens,
                                    generate_fn=fn, split=True)
            answered += len(test)
        counts = parameter_counts(loaded.model, loaded.anatomy)
        report[name] = {"accuracy": acc.accuracy, "per_type": acc.per_type, "metric": acc.metric,
                        "details": acc.details, "params_total": counts["total"],
                        "params_language": counts["language"],
                        "size_bytes": evaluate.size_bytes(loaded.model, loaded.path)}
        say(f"{name}: {acc.metric.replace('_', ' ')} {acc.accuracy:.1%} on {test.describe()}")
    # what a sweep's wall-time estimate reads (compression.runs.sweep.estimate)
    report["evaluation"].update(questions_answered=answered, accuracy_s=round(time.time() - started, 2))
    if not _is_main_process():
        return report  # latency is timed by rank 0 alone: processes timed at once would share the machine
    feed = None
    if inputs_fn is not None:  # visual-token pruning applies to the compressed model only
        def feed(model, inputs):
            return inputs_fn(model, inputs) if model is student.model else inputs
    timing = evaluate.latency({"original": original.model, "compressed": student.model},
                              evaluate.latency_inputs(original, test.records[0]), inputs_fn=feed,
                              kernels=kernels)
    for name in ("original", "compressed"):
        report[name].update(prefill_ms=timing[name]["prefill_ms"],
                            decode_tokens_per_s=timing[name]["decode_tokens_per_s"])
    o, c = report["original"], report["compressed"]
    report["kept"] = {"accuracy": c["accuracy"] / o["accuracy"] if o["accuracy"] else None,
                      "params": c["params_total"] / o["params_total"],
                      "size": c["size_bytes"] / o["size_bytes"]}
    report["speedup"] = {"prefill": o["prefill_ms"] / c["prefill_ms"],
                         "decode": c["decode_tokens_per_s"] / o["decode_tokens_per_s"]}
    report["latency_note"] = ("measured: medians, batch 1, original and compressed interleaved in one process, "
                              f"{kernels} kernels")
    report["plan"] = plan.model_dump(mode="json") if plan is not None else None
    report["what_if"] = _what_if(original, plan)
    return report


def _what_if(original: LoadedModel, plan) -> dict[str, Any] | None:
    """The what-if estimate (a roofline, not a measurement) for the original and after the plan."""
    keys = ("prefill_ms", "decode_ms_per_token", "params_total", "params_language", "bytes", "estimate")
    before = prune.what_if(original)
    after = prune.what_if(original, plan) if plan is not None else before
    return {"original": {k: before.get(k) for k in keys}, "compressed": {k: after.get(k) for k in keys}}
