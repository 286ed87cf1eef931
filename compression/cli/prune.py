"""CLI subcommands ``analyze``, ``plan`` and ``prune`` (contract in shared/DESIGN.md).

    python -m compression analyze --model reference --kind layers --json
    python -m compression plan --model config:llava-1.5-7b --method width --ratio 0.3 --hardware h100 --json
    python -m compression prune --model reference --method layer --ratio 0.25 --out /tmp/pruned --json
    python -m compression analyze --model path/to/llava-1.5-13b-hf --kind layers --data my.json --sequential
    python -m compression prune --model path/to/llava-1.5-13b-hf --method width --ratio 0.3 --scorer activation \
        --data my.json --streaming --out /tmp/pruned

``--sequential`` / ``--streaming`` (on by themselves when the weights do not fit in the free memory) keep one
decoder layer in memory at a time (``compression.methods.sequential``, ``compression.methods.streaming``).
"""
from __future__ import annotations

import argparse
import sys

from compression.cli.common import UsageError, add_data_arguments, add_hardware_arguments, data_source, emit, load_model

SCORER_DEFAULTS = {"layer": "block_influence", "width": "taylor"}


def _layer_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise UsageError(f"--layer-range {text!r} is not START:STOP (e.g. 3:7)")
    return int(parts[0]), int(parts[1])


def _check_budget(args) -> None:
    if (args.ratio is None) == (args.target_mb is None):
        raise UsageError("give exactly one of --ratio R (fraction of language-model parameters) or --target-mb X")
    if args.ratio is not None and not 0 < args.ratio < 1:
        raise UsageError(f"--ratio {args.ratio} must be between 0 and 1 (fraction of language-model parameters)")
    if args.target_mb is not None and args.target_mb <= 0:
        raise UsageError(f"--target-mb {args.target_mb} must be positive")
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples} must be at least 1")
    _layer_range(args.layer_range)


def _calibration(args, method: str | None):
    """The calibration records the arguments name (None when the scorer needs no data)."""
    from compression.methods.importance import calibration_selection

    if method == "magnitude":
        return None
    return calibration_selection(data_source(args), args.samples)


def _compute(args):
    """The device and precision the command computes in (``--device`` / ``--dtype`` where the command has them)."""
    from compression.hardware import resolve

    chosen = resolve(getattr(args, "device", None) or "auto", getattr(args, "dtype", None) or "auto")
    return chosen.device, chosen.dtype


def _sequential(args, flag: str) -> bool:
    """Whether to keep one decoder layer in memory at a time: asked for, or the weights do not fit.

    Only a local folder of safetensors shards can be read layer by layer; the reference model and config-only
    sources never need it."""
    from pathlib import Path

    from compression.measure.memory import available_bytes, weight_bytes

    folder = Path(args.model).expanduser()
    readable = folder.is_dir() and (any(folder.glob("*.safetensors")))
    if getattr(args, flag):
        if not readable:
            raise UsageError(f"--{flag} needs a local model folder with safetensors shards; {args.model} is not one")
        return True
    if not readable:
        return False
    device, dtype = _compute(args)
    need, free = weight_bytes(folder, dtype), available_bytes(device)
    if need < free:
        return False
    print(f"note: the weights take {need / 1e9:.1f} GB at {str(dtype).removeprefix('torch.')} and {device} has "
          f"{free / 1e9:.1f} GB free: {flag} (one decoder layer in memory at a time)", file=sys.stderr)
    return True


def _load_sequential(args):
    from compression.cli.common import hardware
    from compression.models import load

    chosen = hardware(args)
    loaded = load(args.model, device=chosen.device, dtype=chosen.dtype, sequential=True)
    args.hardware_label = chosen.label  # emit() reports it with the result
    return loaded


def _sequential_scores(args, loaded, method: str, scorer: str):
    """Scores for a plan from the sequential path (block influence; Taylor, activation or magnitude)."""
    from compression.methods.sequential import LAYER_METHODS, UNIT_METHODS, cached_sequential_importance

    if scorer == "none":
        return None
    allowed = LAYER_METHODS if method == "layer" else UNIT_METHODS
    if scorer not in allowed:
        raise UsageError(f"--scorer {scorer!r} needs the whole model in memory; with --streaming use "
                         f"{', '.join(allowed)} or none")
    calibration = _calibration(args, scorer)
    if method == "layer":
        return cached_sequential_importance(loaded, "layers", scorer, calibration)
    return {kind: cached_sequential_importance(loaded, kind, scorer, calibration) for kind in ("heads", "neurons")}


def _scores(args, loaded, method: str, scorer: str):
    """Importance scores for a plan, or None for config-only models / ``--scorer none``."""
    from compression.methods.importance import LAYER_METHODS, UNIT_METHODS, cached_importance

    if scorer == "none" or not loaded.has_weights:
        return None
    if method == "layer":
        if scorer not in LAYER_METHODS:
            raise UsageError(f"--scorer {scorer!r} does not score layers; expected {', '.join(LAYER_METHODS)} or none")
        return cached_importance(loaded, "layers", scorer, _calibration(args, scorer))
    if scorer not in UNIT_METHODS:
        raise UsageError(f"--scorer {scorer!r} does not score heads/neurons; expected {', '.join(UNIT_METHODS)} or none")
    calibration = _calibration(args, scorer)
    return {kind: cached_importance(loaded, kind, scorer, calibration) for kind in ("heads", "neurons")}


def _make_plan(args, loaded, sequential: bool = False):
    from compression.methods.prune import make_plan

    scorer = args.scorer or SCORER_DEFAULTS[args.method]
    if sequential:
        scores = _sequential_scores(args, loaded, args.method, scorer)
    else:
        scores = _scores(args, loaded, args.method, scorer)
    return make_plan(loaded, args.method, ratio=args.ratio, target_mb=args.target_mb, scores=scores,
                     layer_range=_layer_range(args.layer_range), target_dtype=args.target_dtype,
                     servable=args.servable, neuron_multiple=_neuron_multiple(args.neuron_multiple))


def _neuron_multiple(text: str) -> int | str:
    """``--neuron-multiple``: auto, or a multiple of 32."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 32 or int(text) % 32:
        raise UsageError(f"--neuron-multiple {text!r}: expected auto or a multiple of 32 (32, 64, 128)")
    return int(text)


def _cmd_analyze(args) -> int:
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples} must be at least 1")
    if args.kind == "tokens":
        return _analyze_tokens(args)
    sequential = _sequential(args, "sequential")
    loaded = _load_sequential(args) if sequential else load_model(args)
    if not loaded.has_weights:
        raise UsageError(f"model {args.model} is config-only (no weights); importance needs weights")
    from compression.methods.importance import cached_importance
    from compression.methods.sequential import cached_sequential_importance

    method = args.method or ("block_influence" if args.kind == "layers" else "taylor")
    calibration = _calibration(args, method)
    if sequential:
        frame = cached_sequential_importance(loaded, args.kind, method, calibration)
    else:
        frame = cached_importance(loaded, args.kind, method, calibration)
    rows = frame.to_dict("records")
    top = frame.sort_values("score", ascending=False).head(10)
    unit = {"layers": "layer", "heads": "head", "neurons": "neuron"}[args.kind]
    on = calibration.describe() if calibration is not None else "weights only"
    text = (f"{args.kind} importance ({method}, on {on}, prompted with {loaded.prompt.name}), most important "
            "first:\n") + "\n".join(
        f"  layer {int(r.layer):>3}" + (f" {unit} {int(getattr(r, unit)):>5}" if unit != "layer" else "")
        + f"  {r.score:.6g}" for r in top.itertuples())
    emit(args, {"kind": args.kind, "method": method, "samples": len(calibration) if calibration else 0,
                "data": on, "prompt": loaded.prompt.name, "sequential": sequential, "scores": rows},
         text + ("\n(sequential: one decoder layer in memory at a time)" if sequential else ""))
    return 0


def _analyze_tokens(args) -> int:
    from compression.data.images import load_image
    from compression.methods.tokens import analyze_tokens
    if not args.image or not args.question:
        raise UsageError("--kind tokens needs --image PATH and --question TEXT")
    image = load_image(args.image)
    loaded = load_model(args)
    if not loaded.has_weights:
        raise UsageError(f"model {args.model} is config-only (no weights); token analysis needs weights")
    result = analyze_tokens(loaded, image, args.question, layer=args.layer)
    emit(args, {"kind": "tokens", **result}, f"visual-token scores for {args.image}: {len(result.get('scores', []))} rows")
    return 0


def _cmd_plan(args) -> int:
    from compression.methods.prune import plan_summary, what_if

    _check_budget(args)
    loaded = load_model(args)
    plan = _make_plan(args, loaded)
    payload = plan_summary(plan)
    payload["what_if"] = what_if(loaded, plan, hardware=args.hardware, prompt_tokens=args.prompt_tokens)
    payload["what_if_before"] = what_if(loaded, None, hardware=args.hardware, prompt_tokens=args.prompt_tokens)
    after, before = payload["what_if"], payload["what_if_before"]
    text = (f"{plan.method}wise plan: removes {plan.ratio_achieved:.1%} of the language model "
            f"(asked {plan.ratio_requested if plan.ratio_requested is not None else f'{plan.target_mb} MB'})\n"
            f"params {plan.params_before:,} -> {plan.params_after:,}; bf16 {plan.bytes_after['bf16'] / 1e6:,.1f} MB\n"
            + (f"layers removed: {plan.layers_removed}\n" if plan.method == "layer" else
               "per layer heads/KV heads/neurons kept: " + ", ".join(
                   f"{i}: {len(plan.heads_kept[i])}/{len(plan.kv_heads_kept[i])}/{len(plan.neurons_kept[i])}"
                   for i in plan.heads_kept) + "\n")
            + f"estimated prefill on {args.hardware}: {before['prefill_ms']:.1f} ms -> {after['prefill_ms']:.1f} ms "
              f"(scorer: {plan.scorer})\n"
            + f"serving: {plan.servable['needs']}; tensor parallel "
              + ", ".join(f"{t}: {'yes' if ok else 'no'}" for t, ok in plan.servable["tensor_parallel"].items()))
    emit(args, payload, text)
    return 0


def _cmd_prune(args) -> int:
    from pathlib import Path

    from compression.methods.prune import apply_plan, plan_summary, save_pruned

    _check_budget(args)
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists and is not empty; expected a new folder")
    streaming = _sequential(args, "streaming")
    loaded = _load_sequential(args) if streaming else load_model(args)
    if not loaded.has_weights:
        raise UsageError(f"model {args.model} is config-only (no weights); prune needs weights — use `plan`")
    plan = _make_plan(args, loaded, sequential=streaming)
    if streaming:
        from compression.methods.streaming import stream_prune
        from compression.models import anatomy_from_config
        from compression.models.loader import _read_config

        path = stream_prune(loaded.path, plan, out)
        anatomy = anatomy_from_config(_read_config(path / "config.json"))
    else:
        model, anatomy = apply_plan(loaded.model, loaded.anatomy, plan)
        path = save_pruned(model, loaded.processor, out, plan)
    payload = {"path": str(path), "uniform": anatomy.uniform, "streaming": streaming, **plan_summary(plan)}
    emit(args, payload, f"pruned {plan.method}wise, {plan.ratio_achieved:.1%} of the language model removed "
                        f"({plan.params_before:,} -> {plan.params_after:,} params); saved to {path}"
                        + ("" if anatomy.uniform else " (non-uniform widths: load with trust_remote_code=True)"))
    return 0


def _budget_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--method", required=True, choices=["layer", "width"])
    p.add_argument("--ratio", type=float, help="fraction of language-model parameters to remove")
    p.add_argument("--target-mb", type=float, help="target size in MB (instead of --ratio)")
    p.add_argument("--target-dtype", default="fp32", choices=["fp32", "bf16", "int8", "nf4"],
                   help="storage dtype the target size refers to")
    p.add_argument("--layer-range", help="eligible layers START:STOP (width default: first 3 and last left whole)")
    p.add_argument("--servable", action="store_true",
                   help="width: every layer alike (plain transformers, no custom code), tensor-parallel sizes kept")
    p.add_argument("--neuron-multiple", default="auto",
                   help="width: kept MLP neurons per layer a multiple of this (auto: 128 for layers of 4096 neurons "
                        "or more, 64 from 2048, else 32; 32 is the least, what bitsandbytes nf4 on CPU needs)")
    p.add_argument("--scorer", help="layer: block_influence|removal_loss; width: taylor|activation|magnitude; or none")
    p.add_argument("--samples", type=int, default=32, help="calibration samples for importance")
    add_data_arguments(p, "calibration data for the importance scores")
    add_hardware_arguments(p)


def register(sub) -> None:
    p = sub.add_parser("analyze", help="importance of layers, heads, neurons or visual tokens")
    p.add_argument("--model", required=True)
    p.add_argument("--kind", required=True, choices=["layers", "heads", "neurons", "tokens"])
    p.add_argument("--method", help="layers: block_influence|removal_loss; heads/neurons: taylor|activation|magnitude")
    p.add_argument("--samples", type=int, default=32, help="calibration records (a seeded random subset)")
    add_data_arguments(p, "calibration data")
    p.add_argument("--image", help="image for --kind tokens")
    p.add_argument("--question", help="question for --kind tokens")
    p.add_argument("--layer", type=int, help="decoder layer for --kind tokens")
    add_hardware_arguments(p)
    p.add_argument("--sequential", action="store_true",
                   help="one decoder layer in memory at a time, read from the folder's shards (block influence, "
                        "activation, magnitude); on by itself when the weights do not fit in memory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("plan", help="a pruning plan for a budget, with what-if estimates (no weights needed)")
    _budget_arguments(p)
    p.add_argument("--hardware", default="cpu", choices=["cpu", "h100", "a100-80gb", "rtx-4090"])
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens besides the image's visual tokens")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("prune", help="one-shot structural prune (no recovery) to a Hugging Face folder")
    _budget_arguments(p)
    p.add_argument("--out", required=True)
    p.add_argument("--streaming", "--sequential", dest="streaming", action="store_true",
                   help="write the pruned folder shard by shard, one decoder layer in memory at a time (scores from "
                        "the sequential path); on by itself when the weights do not fit in memory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_prune)
