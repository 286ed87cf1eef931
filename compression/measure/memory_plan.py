"""A memory plan before launch: each stage's predicted peak on the chosen device, from the config alone.

What a recipe's stages hold at their peak (bytes; ``w`` = the weights' bytes per parameter in the chosen
precision, 2 for bf16 / fp16 and 4 for fp32):

- **evaluate / Q&A**: the weights, plus the KV cache and one layer's activations at batch 1.
- **recover**: the student's weights; its trainable parameters again as fp32 master weights (when the
  precision is half: ``compression.methods.recover`` trains them in fp32 under autocast), their fp32
  gradients and AdamW's two fp32 moments (16 bytes per trainable parameter in all); the teacher's weights
  when it distils, less its frozen vision tower, which it shares with the student
  (``compression.methods.vision_sharing``: one copy, the family's ``frozen_vision``); and the activations kept
  for the backward pass. Gradients flow through the whole
  language model to the projector even when only the projector trains, so every recovery mode keeps the
  decoder's activations. Per decoder layer and token, in 16-bit, with PyTorch's SDPA attention (no score
  matrix kept): ``18 h + 6 m`` bytes (the layer's inputs to norms, q/k/v/o and the gated MLP's three
  projections; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  eq. 1 without its attention-matrix term and with a SwiGLU MLP of width ``m``), twice that in fp32.
  Gradient checkpointing keeps only each layer's input (``2 h`` per token) plus one layer's full set.
  The loss adds the logits (``b * s * V``: the 16-bit logits, their fp32 copy and its gradient), and
  distillation the teacher's logits and, for hidden-state KD, its hidden states.

These are estimates (no model runs); ``benchmarks/bench_memory.py`` and a run's ``metrics.json``
(``memory.peak_bytes``, measured) put them beside what was measured. Allocator overhead and
fragmentation come on top: the plan says a run fits when its peak is under 90 % of the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
HEADROOM = 0.9  # a peak above 90 % of the device does not count as fitting (allocator, fragmentation, CUDA context)
GIB = 2**30


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class Shapes:
    """What the plan needs from a model: parameter counts by part and the language model's widths."""

    params_total: int
    params_language: int
    params_projector: int
    params_vision: int  # the frozen vision tower (the family's frozen_vision): what a distilling teacher shares
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    visual_tokens: int
    lora_linear_in_out: int  # sum over the decoder's linear layers of (in + out) features: LoRA's r * this

    @classmethod
    def of(cls, source, plan=None) -> "Shapes":
        """From a ``LoadedModel`` (config-only is enough) or ``(model, anatomy)``; ``plan`` (a pruning plan)
        gives the student's shapes."""
        from compression.measure.whatif import _unpack
        from compression.models import parameter_counts

        model, anatomy = _unpack(source)
        counts = parameter_counts(model, anatomy)
        heads, kv = anatomy.heads_per_layer, anatomy.kv_heads_per_layer
        inter, layers = anatomy.intermediate_per_layer, anatomy.num_layers
        removed = 0
        if plan is not None:
            heads, kv, inter = (plan.widths_after["num_attention_heads"], plan.widths_after["num_key_value_heads"],
                                plan.widths_after["intermediate_size"])
            layers = len(inter)
            removed = plan.params_before - plan.params_after
        hd, h = anatomy.head_dim, anatomy.hidden_size
        mlp_mats = 3 if anatomy.gate_proj else 2
        lora = sum((h + q * hd) + 2 * (h + k * hd) + (q * hd + h) + mlp_mats * (h + m)
                   for q, k, m in zip(heads, kv, inter))
        return cls(counts["total"] - removed, counts["language"] - removed, counts["projector"], counts["vision"], layers, h,
                   round(sum(inter) / max(len(inter), 1)), anatomy.vocab_size, anatomy.visual_tokens, lora)


def _trainable(shapes: Shapes, mode: str, lora_r: int) -> int:
    if mode == "none":
        return 0
    if mode == "projector":
        return shapes.params_projector
    if mode == "lora":
        return shapes.params_projector + lora_r * shapes.lora_linear_in_out
    return shapes.params_language + shapes.params_projector  # full: the language model and the projector


def recovery_peak(shapes: Shapes, teacher: Shapes | None, mode: str, distillation: str, dtype: str,
                  batch_size: int, sequence_tokens: int, gradient_checkpointing: bool = False,
                  lora_r: int = 16, shared_vision: bool = True, processes: int = 1,
                  fsdp: bool = False) -> dict[str, int]:
    """Predicted bytes of one recovery step at its peak on *one* device, by part (see the module docstring).
    ``shared_vision``: the teacher holds the student's vision tower (what recovery does, except under FSDP).
    ``processes``: the global batch is split across them (activations and logits per process); with ``fsdp`` the
    student's weights, gradients and optimizer state are sharded across them too (plus one decoder layer gathered
    at a time), and the teacher, replicated, keeps its own vision tower."""
    w = BYTES[dtype]
    trainable = _trainable(shapes, mode, lora_r)
    half = w == 2
    processes = max(1, processes)
    shared_vision = shared_vision and not (fsdp and processes > 1)
    tokens = -(-batch_size // processes) * sequence_tokens
    per_layer = (18 * shapes.hidden + 6 * shapes.intermediate) * (1 if half else 2)  # bytes per token
    if gradient_checkpointing:
        activations = tokens * (shapes.layers * 2 * shapes.hidden * (1 if half else 2) + per_layer)
    else:
        activations = tokens * shapes.layers * per_layer
    logits = tokens * shapes.vocab * (w + 4 + 4)
    if mode == "lora":  # the adapters are new fp32 parameters; the base stays in its precision
        upcast = shapes.params_projector * 2 if half else 0
        weights = shapes.params_total * w + (trainable - shapes.params_projector) * 4 + upcast
    else:  # trainable parameters upcast to fp32 master weights: 2 more bytes each in half precision
        weights = shapes.params_total * w + (trainable * 2 if half else 0)
    parts = {"weights": weights, "gradients": trainable * 4, "optimizer": trainable * 8,
             "activations": activations, "logits": logits, "teacher": 0}
    if fsdp and processes > 1:
        for k in ("weights", "gradients", "optimizer"):
            parts[k] = -(-parts[k] // processes)
        parts["weights"] += shapes.params_language // max(shapes.layers, 1) * w  # the unit being gathered
    if distillation != "none" and teacher is not None:
        own = teacher.params_total - (teacher.params_vision if shared_vision else 0)
        parts["teacher"] = own * w + tokens * shapes.vocab * w
        if "hidden" in distillation:
            parts["teacher"] += tokens * (teacher.layers + 1) * teacher.hidden * w
    parts["total"] = sum(parts.values())
    return parts


def inference_peak(shapes: Shapes, dtype: str, sequence_tokens: int, kv_bytes_per_token: int | None = None) -> dict[str, int]:
    w = BYTES[dtype]
    kv = kv_bytes_per_token if kv_bytes_per_token is not None else 2 * shapes.layers * shapes.hidden * w
    parts = {"weights": shapes.params_total * w, "kv_cache": sequence_tokens * kv,
             "activations": sequence_tokens * (18 * shapes.hidden + 6 * shapes.intermediate) * (w // 2 or 1)
             + sequence_tokens * shapes.vocab * 4}
    parts["total"] = sum(parts.values())
    return parts


def plan_for_recipe(source, recipe, device_bytes: int | None, dtype: str, plan=None,
                    sequence_tokens: int | None = None) -> dict[str, Any]:
    """The memory plan of ``recipe`` (a ``compression.runs.recipe.Recipe``) for ``source`` on a device of
    ``device_bytes`` (None: unknown), in ``dtype`` (a resolved name: fp32, bf16, fp16): each stage's
    predicted peak, whether the run fits, and, when it does not, the first change that makes it fit."""
    teacher = Shapes.of(source)
    student = Shapes.of(source, plan) if plan is not None else teacher
    seq = sequence_tokens or teacher.visual_tokens + 64  # the image's tokens and a short question and answer
    spec = recipe.recovery
    stages = {"evaluate": inference_peak(teacher, dtype, seq)}
    processes = recipe.hardware.processes
    parallelism = recipe.hardware.parallelism
    fsdp = parallelism == "fsdp" or (parallelism == "auto" and spec.mode == "full")  # runs.launch.parallelism
    if spec.mode != "none":
        stages["recover"] = recovery_peak(student, teacher, spec.mode, spec.distillation, dtype, spec.batch_size,
                                          seq, spec.gradient_checkpointing, spec.lora_r, processes=processes,
                                          fsdp=fsdp)
    peak = max(s["total"] for s in stages.values())
    out: dict[str, Any] = {"dtype": dtype, "sequence_tokens": seq, "device_bytes": device_bytes,
                           "stages": stages, "peak_bytes": peak, "fits": None, "suggestion": None}
    if device_bytes is None:
        return out
    budget = HEADROOM * device_bytes
    out["fits"] = peak <= budget
    if out["fits"] or spec.mode == "none":
        if not out["fits"]:
            out["suggestion"] = "the model's weights alone do not fit: load it offloaded (device_map='auto') or on a larger device"
        return out
    tries = []
    if not spec.gradient_checkpointing:
        tries.append(("recovery.gradient_checkpointing: true", dict(gradient_checkpointing=True)))
    if spec.mode == "full":
        tries.append(("recovery.mode: lora", dict(mode="lora")))
        tries.append(("recovery.mode: lora with gradient_checkpointing: true", dict(mode="lora", gradient_checkpointing=True)))
    if spec.batch_size > 1:
        tries.append((f"recovery.batch_size: 1 (with gradient_checkpointing)", dict(batch_size=1, gradient_checkpointing=True,
                                                                                  mode="lora" if spec.mode == "full" else spec.mode)))
    if dtype == "fp32":
        tries.append(("hardware.dtype: bf16", dict(dtype="bf16")))
    for label, change in tries:
        args = dict(mode=spec.mode, distillation=spec.distillation, dtype=dtype, batch_size=spec.batch_size,
                    gradient_checkpointing=spec.gradient_checkpointing, lora_r=spec.lora_r)
        args.update(change)
        total = recovery_peak(student, teacher, args["mode"], args["distillation"], args["dtype"], args["batch_size"],
                              seq, args["gradient_checkpointing"], args["lora_r"], processes=processes,
                              fsdp=fsdp and args["mode"] == "full" if parallelism == "auto" else fsdp)["total"]
        if total <= budget:
            out["suggestion"] = (f"{label} (predicted peak {_gib(total)} instead of {_gib(peak)}; the device has "
                                 f"{_gib(device_bytes)}, {HEADROOM:.0%} of it usable: {_gib(budget)})")
            break
    else:
        out["suggestion"] = "no single recovery option fits: use several GPUs (FSDP, see the README) or a larger device"
    return out


def recovery_choice(source, device_bytes: int, dtype: str, distillation: str = "none", batch_size: int = 16,
                    plan=None, sequence_tokens: int | None = None, lora_r: int = 16) -> dict[str, Any]:
    """Full finetuning or LoRA on a device of ``device_bytes``: the predicted recovery peak of each, without and
    with gradient checkpointing, and the first that fits (under ``HEADROOM`` of the device) in the order full,
    full + checkpointing, LoRA, LoRA + checkpointing: ``choice`` ``{"mode", "gradient_checkpointing",
    "peak_bytes", "fits"}``, or None when none fits. ``plan`` (a pruning plan) gives the student's shapes."""
    teacher = Shapes.of(source)
    student = Shapes.of(source, plan) if plan is not None else teacher
    seq = sequence_tokens or teacher.visual_tokens + 64
    budget = HEADROOM * device_bytes
    options = []
    for mode in ("full", "lora"):
        for checkpointing in (False, True):
            total = recovery_peak(student, teacher, mode, distillation, dtype, batch_size, seq, checkpointing,
                                  lora_r)["total"]
            options.append({"mode": mode, "gradient_checkpointing": checkpointing, "peak_bytes": total,
                            "fits": total <= budget})
    return {"device_bytes": device_bytes, "budget_bytes": int(budget), "dtype": dtype, "sequence_tokens": seq,
            "batch_size": batch_size, "options": options, "choice": next((o for o in options if o["fits"]), None)}
