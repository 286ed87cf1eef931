"""Memory plans: the predicted peak resident memory of each stage, and whether a model fits.

Every number here is a named *estimate*, from the config alone (module shapes of the ``meta``-device model)
and the run's sizes; ``benchmarks/bench_memory.py`` puts each beside the measured peak. Terms (bytes):

- ``runtime``: the Python process with torch and transformers imported (measured by the caller: it differs
  by build; ``RUNTIME_BYTES`` is this project's CPU build, measured by ``bench_memory.py``);
- ``parts``: the weights outside the decoder layers that a sequential load keeps (vision tower, projector,
  embeddings, final norm; not the LM head), at the compute precision, until the capture is done;
- ``vision_activations``: the vision tower on one batch of images (its MLP, or its attention with fp32 scores),
  plus every vision layer's output (kept when the model reads an inner layer, as LLaVA's ``-2``);
- ``layer``: the largest decoder layer, and ``layer_read``: the transient while it is read (the largest tensor
  of it twice: the memory-mapped bytes and their copy);
- ``hidden``: every calibration batch's hidden states ``samples x tokens x hidden`` kept between layers, plus
  one batch's layer output;
- ``activations``: one batch inside one decoder layer, no gradients: the MLP's ``3 x batch x tokens x
  intermediate`` (gate, up, their product) or the attention's q/k/v/output ``4 x batch x tokens x hidden`` plus
  its ``batch x heads x tokens^2`` fp32 scores (the math kernel), whichever is larger;
- streaming surgery: one output shard (``shard``, filled before it is written) + the layer being read (width:
  all of it, sliced into the shard; layer removal: its largest tensor).

Available memory (``available_bytes``): ``psutil.virtual_memory().available`` on the CPU,
``torch.cuda.mem_get_info`` free bytes on a GPU. ``fits`` compares the whole model's weights at the compute
precision with it (the analysis also needs activations, so "fits" is generous: a model that does not fit
certainly needs the sequential path).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

RUNTIME_BYTES = 320_000_000  # a CPU process after `import torch, transformers` and the studio (bench_memory.py: 0.32 GB)
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@dataclass
class MemoryPlan:
    """A stage's predicted peak and the terms it is the sum of (bytes)."""

    stage: str
    terms: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.terms.values())

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "peak_bytes": self.peak, **{f"{k}_bytes": v for k, v in self.terms.items()}}


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts by part, from the module shapes (``meta`` model)."""

    parts: int        # vision tower, projector, embeddings, final norm
    lm_head: int      # 0 when tied to the embeddings
    layer: int        # the largest decoder layer
    layers: int       # all decoder layers
    largest_tensor: int
    hidden_size: int
    intermediate_size: int
    heads: int
    vision_tokens: int = 0  # positions the vision tower sees per image
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_heads: int = 0
    vision_layers: int = 0
    decoder_layers: int = 0

    @property
    def total(self) -> int:
        return self.parts + self.lm_head + self.layers


def model_sizes(model: nn.Module, anatomy) -> ModelSizes:
    """Counts of a (meta or real) model, shared tensors once."""
    layers = anatomy.decoder_layers(model)
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    head = model.get_submodule(anatomy.lm_head).weight
    seen, parts = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in layer_ids or p is head:
            continue
        seen.add(id(p))
        parts += p.numel()
    tied = id(head) in seen or head is model.get_input_embeddings().weight
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    largest = max(p.numel() for layer in layers for p in layer.parameters())
    vision = getattr(model.config, "vision_config", None)
    return ModelSizes(parts, 0 if tied else head.numel(), max(per_layer), sum(per_layer), largest,
                      anatomy.hidden_size, max(anatomy.intermediate_per_layer), max(anatomy.heads_per_layer),
                      anatomy.vision_patches, anatomy.vision_hidden_size,
                      int(getattr(vision, "intermediate_size", 0) or 4 * anatomy.vision_hidden_size),
                      int(getattr(vision, "num_attention_heads", 0) or getattr(vision, "num_heads", 0) or 1),
                      anatomy.vision_layers, len(layers))


def _activations(s: ModelSizes, batch: int, tokens: int, b: int) -> int:
    mlp = 3 * batch * tokens * s.intermediate_size * b
    attention = 4 * batch * tokens * s.hidden_size * b + batch * s.heads * tokens * tokens * 4
    return max(mlp, attention)


def _vision_activations(s: ModelSizes, images: int, b: int) -> int:
    mlp = 2 * images * s.vision_tokens * s.vision_intermediate * b
    attention = 4 * images * s.vision_tokens * s.vision_hidden * b + images * s.vision_heads * s.vision_tokens ** 2 * 4
    # every layer's output is kept when the model reads an inner one (LLaVA's vision_feature_layer -2)
    kept = (s.vision_layers + 1) * images * s.vision_tokens * s.vision_hidden * b
    return max(mlp, attention) + kept


def _training_activations(s: ModelSizes, batch: int, tokens: int, b: int) -> int:
    """What autograd keeps of one batch through one decoder layer for its backward: the norms' outputs, q, k, v,
    the attention output and the fp32 scores and probabilities (the math kernel), gate, up, their activation and
    product."""
    return (6 * s.hidden_size + 4 * s.intermediate_size) * batch * tokens * b + 2 * batch * s.heads * tokens ** 2 * 4


def sequential_analysis_plans(sizes: ModelSizes, dtype: torch.dtype, samples: int, tokens: int, batch_size: int,
                              runtime: int = RUNTIME_BYTES, taylor: bool = False) -> list[MemoryPlan]:
    """``compression.methods.sequential.sequential_importance``, its phases: the capture (the parts in memory,
    the vision tower running on one batch of images) and the layer sweep (the parts released; one layer, every
    batch's hidden states, one batch's activations); with ``taylor``, the backward sweep (one layer and its
    gradients, every layer's kept input hidden states and every batch's output
    gradient, one batch's activations kept for backward). The stage's peak is the largest."""
    b = DTYPE_BYTES[dtype]
    batch = min(batch_size, samples)
    capture = MemoryPlan("analyze, sequential: capture", {
        "runtime": runtime, "parts": sizes.parts * b, "vision_activations": _vision_activations(sizes, batch, b),
        "hidden": samples * tokens * sizes.hidden_size * b})
    sweep = MemoryPlan("analyze, sequential: layer sweep", {
        "runtime": runtime, "layer": sizes.layer * b, "layer_read": sizes.largest_tensor * b,
        "hidden": (samples + batch) * tokens * sizes.hidden_size * b,
        "activations": _activations(sizes, batch, tokens, b)})
    if not taylor:
        return [capture, sweep]
    count = sizes.decoder_layers or max(1, round(sizes.layers / max(sizes.layer, 1)))
    hidden = samples * tokens * sizes.hidden_size * b
    sweep.terms["kept_inputs"] = count * hidden  # the forward sweep keeps every layer's input for the backward one
    backward = MemoryPlan("analyze, sequential: Taylor backward", {
        "runtime": runtime, "layer": sizes.layer * b, "layer_read": sizes.largest_tensor * b,
        "gradients": sizes.layer * b, "kept_inputs": count * hidden, "output_gradients": hidden,
        "activations": _training_activations(sizes, batch, tokens, b),
        "scoring": 2 * sizes.largest_tensor * 4})  # |W * G| of the largest weight: two fp32 temporaries
    return [capture, sweep, backward]


def sequential_analysis_plan(sizes: ModelSizes, dtype: torch.dtype, samples: int, tokens: int, batch_size: int,
                             runtime: int = RUNTIME_BYTES, taylor: bool = False) -> MemoryPlan:
    """The largest phase of ``sequential_analysis_plans``."""
    return max(sequential_analysis_plans(sizes, dtype, samples, tokens, batch_size, runtime, taylor),
               key=lambda p: p.peak)


def whole_analysis_plan(sizes: ModelSizes, dtype: torch.dtype, samples: int, tokens: int, batch_size: int,
                        runtime: int = RUNTIME_BYTES) -> MemoryPlan:
    """``importance.layer_importance`` / activation scores on the whole model (forward only, hooks)."""
    b = DTYPE_BYTES[dtype]
    batch = min(batch_size, samples)
    return MemoryPlan("analyze, whole model", {
        "runtime": runtime, "weights": sizes.total * b, "hidden": 2 * batch * tokens * sizes.hidden_size * b,
        "activations": _activations(sizes, batch, tokens, b), "vision_activations": _vision_activations(sizes, batch, b)})


def whole_taylor_plan(sizes: ModelSizes, dtype: torch.dtype, samples: int, tokens: int,
                      runtime: int = RUNTIME_BYTES) -> MemoryPlan:
    """``importance._taylor_lean`` on the whole model: the weights, every decoder layer's input for the merged
    batch of all samples (activation recomputation keeps only those), one layer's activations kept for backward
    on that batch, the vision tower on every image at once (no gradients), and the gradient arriving for the
    largest weight with its ``|W * G|`` in fp32."""
    b = DTYPE_BYTES[dtype]
    count = sizes.decoder_layers or max(1, round(sizes.layers / max(sizes.layer, 1)))
    return MemoryPlan("analyze, whole model: lean Taylor", {
        "runtime": runtime, "weights": sizes.total * b,
        "kept_inputs": (count + 1) * samples * tokens * sizes.hidden_size * b,
        "activations": _training_activations(sizes, samples, tokens, b),
        "vision_activations": _vision_activations(sizes, samples, b),
        "gradient": sizes.largest_tensor * (b + 4)})


def whole_load_plan(sizes: ModelSizes, dtype: torch.dtype, stored_dtype: torch.dtype,
                    runtime: int = RUNTIME_BYTES) -> MemoryPlan:
    """Loading the whole model with ``from_pretrained``: the weights at the compute precision, and while they are
    cast from another stored precision, the memory-mapped stored bytes too (resident until loading ends)."""
    terms = {"runtime": runtime, "weights": sizes.total * DTYPE_BYTES[dtype]}
    if stored_dtype != dtype:
        terms["stored_mapped"] = sizes.total * DTYPE_BYTES[stored_dtype]
    return MemoryPlan("load, whole model", terms)


def offloaded_check_plan(sizes: ModelSizes, dtype: torch.dtype, budget: int, tokens: int,
                         runtime: int = RUNTIME_BYTES) -> MemoryPlan:
    """``compression.runs.export.verify_export`` with a memory budget: each side (the run's model, then the export
    in a fresh process) keeps at most ``budget`` of weights in memory and moves one offloaded module (a decoder
    layer) in at a time; the prompt's activations and logits; while the fresh process runs, the parent's runtime
    stays resident beside the child's."""
    b = DTYPE_BYTES[dtype]
    vocab = sizes.lm_head // sizes.hidden_size if sizes.lm_head else 0
    terms = {"runtime": runtime, "reload_process_runtime": runtime, "weights_in_memory": min(budget, sizes.total * b),
             "module_read": sizes.layer * b,
             "activations": max(_activations(sizes, 1, tokens, b), _vision_activations(sizes, 1, b)),
             "logits": tokens * vocab * b}
    return MemoryPlan("export check, offloaded", terms)


def streaming_prune_plan(sizes: ModelSizes, dtype: torch.dtype, shard_bytes: int, method: str = "width",
                         runtime: int = RUNTIME_BYTES) -> MemoryPlan:
    """``compression.methods.streaming.stream_prune``: one output shard filled while a layer is read; width
    surgery touches the whole layer (and slices it into the shard), layer removal copies its tensors untouched
    until the shard is written (the largest tensor is the transient)."""
    b = DTYPE_BYTES[dtype]
    terms = {"runtime": runtime, "shard": min(shard_bytes, sizes.total * b)}
    if method == "width":
        terms["layer"] = sizes.layer * b
    else:
        terms["layer_read"] = sizes.largest_tensor * b
    return MemoryPlan(f"prune {method}, streaming", terms)


def available_bytes(device: str = "cpu") -> int:
    """Memory free for a model on ``device`` now."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def weight_bytes(folder: str | Path, dtype: torch.dtype | None = None) -> int:
    """Bytes a model folder's weights take in memory: as stored, or at ``dtype`` (floating tensors)."""
    from compression.models.shards import Checkpoint

    checkpoint = Checkpoint(folder)
    if dtype is None:
        return checkpoint.nbytes
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.nbytes // t.dtype.itemsize * size if t.dtype.is_floating_point else t.nbytes
               for t in checkpoint.tensors.values())


def fits(folder: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> bool:
    """Whether the folder's weights at ``dtype`` fit in the memory ``device`` has free now."""
    return weight_bytes(folder, dtype) < available_bytes(device)
