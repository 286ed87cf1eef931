"""What-if estimates from a config alone (no weights): size, prefill FLOPs, KV cache, latency.

Every number here is a named *estimate*, not a measurement:

- parameters are exact (counted from the module shapes of the meta-device model, minus what a
  pruning plan removes); bytes per storage dtype: fp32 4 B, bf16 2 B; int8 and nf4 store the
  decoder's linear weights in 1 B / 0.5 B (+ one fp32 absmax per 64 weights for nf4, as
  bitsandbytes does) and everything else in bf16;
- prefill FLOPs for one image plus a prompt: 2 x tokens x weights for every linear, plus
  4 x tokens^2 x heads x head_dim for attention (scores and weighted sum, full matrix), in the
  vision tower (its patches), the projector (the visual tokens) and the language model (visual
  + prompt tokens); the LM head for the last token only (what ``generate`` computes);
- latency: a roofline, ``max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency))``
  plus a fixed per-layer overhead (kernel launches, framework); GPU peaks are the vendors'
  dense bf16 figures, the CPU profile is calibrated by a quick fp32 matmul / copy measurement
  on this machine (cached under ``cache_dir()/whatif``).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from compression.models import Anatomy, LoadedModel, parameter_counts
from compression.paths import cache_dir

NF4_BLOCK = 64


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: float            # dense, at ``dtype``, per second
    bandwidth: float             # memory bytes per second
    dtype: str                   # compute dtype of the estimate
    flops_efficiency: float      # fraction of peak a batch-1 prefill reaches (assumed)
    bandwidth_efficiency: float
    overhead_per_layer_s: float  # kernel launches / framework per transformer layer (assumed or measured)
    source: str


# Vendor datasheets (dense, no sparsity); efficiencies and overheads are assumptions for eager PyTorch.
HARDWARE: dict[str, HardwareProfile] = {
    "h100": HardwareProfile("h100", 989e12, 3.35e12, "bf16", 0.5, 0.8, 1.5e-4, "NVIDIA H100 SXM datasheet"),
    "a100-80gb": HardwareProfile("a100-80gb", 312e12, 2.039e12, "bf16", 0.5, 0.8, 1.5e-4,
                                 "NVIDIA A100 80GB SXM datasheet"),
    "rtx-4090": HardwareProfile("rtx-4090", 165.2e12, 1.008e12, "bf16", 0.5, 0.8, 1.5e-4,
                                "NVIDIA Ada whitepaper (FP16/BF16 tensor, FP32 accumulate)"),
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def bytes_by_dtype(params_total: int, decoder_linear_weights: int) -> dict[str, int]:
    """Storage bytes of a model of ``params_total`` parameters at fp32 / bf16 / int8 / nf4 (estimate)."""
    rest = params_total - decoder_linear_weights
    return {"fp32": 4 * params_total, "bf16": 2 * params_total,
            "int8": decoder_linear_weights + 2 * rest,
            "nf4": decoder_linear_weights // 2 + 4 * (decoder_linear_weights // NF4_BLOCK) + 2 * rest}


def _measure_cpu() -> dict[str, float]:
    threads = torch.get_num_threads()
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        a @ b
        reps += 1
    flops = 2 * 512 ** 3 * reps / (time.perf_counter() - start)
    src, dst = torch.randn(16 * 1024 * 1024), torch.empty(16 * 1024 * 1024)  # 64 MB: beyond the caches
    dst.copy_(src)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        dst.copy_(src)
        reps += 1
    bandwidth = 2 * src.numel() * 4 * reps / (time.perf_counter() - start)  # read + write
    x, w = torch.randn(1, 64), torch.randn(64, 64)
    for _ in range(20):
        x @ w
    start = time.perf_counter()
    for _ in range(500):
        x @ w
    per_op = (time.perf_counter() - start) / 500
    # a decoder layer runs ~25 small kernels (norms, 7 linears, rotary, attention, residuals)
    return {"peak_flops": flops, "bandwidth": bandwidth, "overhead_per_layer_s": 25 * per_op, "threads": threads}


def cpu_profile(refresh: bool = False) -> HardwareProfile:
    """This machine's CPU, calibrated by a quick measurement (~1 s) cached per thread count."""
    path = cache_dir() / "whatif" / f"cpu-{platform.machine()}-{torch.get_num_threads()}threads.json"
    if path.is_file() and not refresh:
        m = json.loads(path.read_text())
    else:
        m = _measure_cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(m))
        os.replace(tmp, path)
    return HardwareProfile("cpu", m["peak_flops"], m["bandwidth"], "fp32", 0.7, 0.8, m["overhead_per_layer_s"],
                           f"measured here: fp32 512x512 matmul, 64 MB copy, {m['threads']} threads")


def hardware_profile(name: str) -> HardwareProfile:
    if name == "cpu":
        return cpu_profile()
    if name not in HARDWARE:
        raise ValueError(f"hardware {name!r} is not one of cpu, {', '.join(HARDWARE)}")
    return HARDWARE[name]


def _unpack(source) -> tuple[nn.Module, Anatomy]:
    if isinstance(source, LoadedModel):
        return source.model, source.anatomy
    if isinstance(source, tuple) and len(source) == 2:
        return source
    raise TypeError(f"expected a LoadedModel or (model, anatomy), got {type(source).__name__}")


def what_if(source: LoadedModel | tuple[nn.Module, Anatomy], plan=None, hardware: str = "cpu",
            prompt_tokens: int = 32, visual_tokens: int | None = None) -> dict[str, Any]:
    """Estimates for the model as it is, or after ``plan`` (a ``compression.methods.prune.Plan``), on ``hardware``.

    Needs only shapes: works on config-only models (``models.load("config:llava-1.5-7b")``).
    ``prompt_tokens``: text tokens of the prompt besides the image's visual tokens.
    ``visual_tokens``: visual tokens the language model sees (visual-token pruning keeps fewer);
    default all of them. The vision tower and projector still process every patch.
    """
    if prompt_tokens < 0:
        raise ValueError(f"prompt_tokens {prompt_tokens} must be 0 or more")
    model, anatomy = _unpack(source)
    profile = hardware_profile(hardware)
    counts = parameter_counts(model, anatomy)
    if plan is not None:
        heads = plan.widths_after["num_attention_heads"]
        kv = plan.widths_after["num_key_value_heads"]
        inter = plan.widths_after["intermediate_size"]
        total, language = plan.params_after, plan.language_params_after
    else:
        heads, kv, inter = anatomy.heads_per_layer, anatomy.kv_heads_per_layer, anatomy.intermediate_per_layer
        total, language = counts["total"], counts["language"]
    hd, hidden = anatomy.head_dim, anatomy.hidden_size
    mlp_mats = 3 if anatomy.gate_proj else 2
    linear = [hidden * (hd * (2 * h + 2 * k) + mlp_mats * m) for h, k, m in zip(heads, kv, inter)]

    patches = anatomy.vision_patches  # for one image_size image (one tile where the count varies)
    visual = anatomy.visual_tokens
    if visual_tokens is not None and not 0 <= visual_tokens <= visual:
        raise ValueError(f"visual_tokens {visual_tokens} must be between 0 and the model's {visual}")
    kept = visual if visual_tokens is None else visual_tokens
    tokens = kept + prompt_tokens
    flops_vision = 2 * patches * counts["vision"] + 4 * patches ** 2 * anatomy.vision_hidden_size * anatomy.vision_layers
    flops_projector = 2 * visual * counts["projector"]
    flops_language = sum(2 * tokens * w + 4 * tokens ** 2 * h * hd for w, h in zip(linear, heads))
    flops_language += 2 * hidden * anatomy.vocab_size  # LM head, last token only
    flops = flops_vision + flops_projector + flops_language

    dtype_bytes = DTYPE_BYTES[profile.dtype]
    kv_per_token = {d: sum(2 * k * hd * b for k in kv) for d, b in DTYPE_BYTES.items()}
    weight_bytes = total * dtype_bytes
    moved = weight_bytes + tokens * kv_per_token[profile.dtype]
    compute_s = flops / (profile.peak_flops * profile.flops_efficiency)
    memory_s = moved / (profile.bandwidth * profile.bandwidth_efficiency)
    layers = len(heads) + anatomy.vision_layers
    prefill_s = max(compute_s, memory_s) + layers * profile.overhead_per_layer_s
    # decode is memory-bound at batch 1: the language model's weights are read once per token
    decode_s = (language * dtype_bytes) / (profile.bandwidth * profile.bandwidth_efficiency) \
        + len(heads) * profile.overhead_per_layer_s
    return {
        "estimate": "roofline from config shapes (not a measurement)",
        "hardware": profile.name, "hardware_profile": asdict(profile), "dtype": profile.dtype,
        "params_total": total, "params_language": language, "params_vision": counts["vision"],
        "params_projector": counts["projector"],
        "bytes": bytes_by_dtype(total, sum(linear)),
        "visual_tokens": kept, "visual_tokens_fixed": anatomy.visual_tokens_fixed,
        "visual_tokens_note": anatomy.visual_tokens_note, "prompt_tokens": prompt_tokens, "prefill_tokens": tokens,
        "prefill_flops": {"vision": flops_vision, "projector": flops_projector, "language": flops_language,
                          "total": flops},
        "kv_cache_bytes_per_token": kv_per_token,
        "prefill_ms": prefill_s * 1e3, "prefill_bound": "compute" if compute_s >= memory_s else "memory",
        "decode_ms_per_token": decode_s * 1e3,
        "plan": None if plan is None else {"method": plan.method, "ratio_achieved": plan.ratio_achieved},
    }
