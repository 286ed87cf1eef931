"""CLI subcommands ``analyze``, ``plan`` and ``prune`` (contract in shared/DESIGN.md).

    python -m compression analyze --model reference --kind layers --json
    python -m compression plan --model config:llava-1.5-7b --method width --ratio 0.3 --hardware h100 --json
    python -m compression prune --model reference --method layer --ratio 0.25 --out /tmp/pruned --json
"""
from __future__ import annotations

import argparse

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


def _make_plan(args, loaded):
    from compression.methods.prune import make_plan

    scorer = args.scorer or SCORER_DEFAULTS[args.method]
    scores = _scores(args, loaded, args.method, scorer)
    return make_plan(loaded, args.method, ratio=args.ratio, target_mb=args.target_mb, scores=scores,
                     layer_range=_layer_range(args.layer_range), target_dtype=args.target_dtype,
                     servable=args.servable)


def _cmd_analyze(args) -> int:
    if args.samples < 1:
        raise UsageError(f"--samples {args.samples} must be at least 1")
    if args.kind == "tokens":
        return _analyze_tokens(args)
    loaded = load_model(args)
    if not loaded.has_weights:
        raise UsageError(f"model {args.model} is config-only (no weights); importance needs weights")
    from compression.methods.importance import cached_importance

    method = args.method or ("block_influence" if args.kind == "layers" else "taylor")
    calibration = _calibration(args, method)
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
                "data": on, "prompt": loaded.prompt.name, "scores": rows}, text)
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
    loaded = load_model(args)
    if not loaded.has_weights:
        raise UsageError(f"model {args.model} is config-only (no weights); prune needs weights — use `plan`")
    plan = _make_plan(args, loaded)
    model, anatomy = apply_plan(loaded.model, loaded.anatomy, plan)
    path = save_pruned(model, loaded.processor, out, plan)
    payload = {"path": str(path), "uniform": anatomy.uniform, **plan_summary(plan)}
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_prune)
