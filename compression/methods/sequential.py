"""Layer-sequential importance: block influence, activation and magnitude scores with one decoder layer in memory.

llm-compressor's *sequential onloading* (``vllm-project/llm-compressor``, ``pipelines/sequential``; GPTQ's
"Catcher", Frantar et al. 2022) applied to ``compression.methods.importance``:

1. the model is built on ``meta`` (``load(..., sequential=True)``, ``compression.models.shards``) and
   everything but its decoder layers and LM head is read from the shards;
2. every calibration batch goes through the model's own forward once, with each decoder layer's ``forward``
   replaced by a recorder that returns its input: the embeddings with the visual tokens merged in (the family's
   own vision tower, projector and placement), and every argument the model passes each layer — its causal /
   sliding-window / bidirectional-image mask, its rotary ``position_embeddings`` (Qwen's 3-D M-RoPE; Gemma 3's
   local and global ones), ``position_ids`` — exactly as the model builds them;
3. then for each layer in turn: read its weights from the shards, push every batch through it (scoring it on
   the way), keep only its outputs as the next layer's inputs, and put the layer back on ``meta``.

Memory: the non-layer parts and one batch's vision-tower activations during the capture; then one decoder layer,
every sample's hidden states and one batch's activations (``compression.measure.memory`` predicts both). The scores are ``importance``'s own (same per-layer sums, same tensors into each layer):
``block_influence``, and ``activation`` / ``magnitude`` for heads and neurons.

Taylor (``sequential_taylor``) runs the same way in two sweeps, as activation checkpointing does with a layer as
the unit: forward, layer by layer, keeping every layer's input hidden states (not its activations); the loss
on the answer tokens through the final norm and the LM head (read from the shards for that step only); then
backward, layer by layer in reverse, onloading each layer again, recomputing its forward from the kept input
and pushing the gradient of its output through it. The layer's weight gradients, summed over the batches, become
``|W * dL/dW|`` per unit while it is in memory; the gradient of its input is the next step's. The loss is the
mean answer-token cross-entropy over all samples, as the whole-model paths, so the scores are equal to float
rounding. Peak: one decoder layer, its gradients, every layer's input hidden states and one batch's activations.
``removal_loss`` is not offered (it needs the whole model per layer).

Qwen3-VL's DeepStack adds vision features between layers inside the model's loop, which the recorder does not
see: refused in one line.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from compression.data.records import Record
from compression.data.sources import Selection
from compression.methods.importance import (SCORERS, TaylorImportance, _as_batches, _scored_parameters,
                                            activation_hook, answer_logit_positions, influence_sum, layer_group,
                                            unit_frames)
from compression.models import Anatomy, LoadedModel

# calibration batch size when records are given: llm-compressor calibrates one sample at a time; the vision tower's
# activations and kept hidden states (LLaVA reads layer -2: all of them) and a layer's activations scale with it,
# while the scores are per-token sums (the same to float rounding for any batching: RoPE sees relative positions)
BATCH_SIZE = 1
LAYER_METHODS = ("block_influence",)
UNIT_METHODS = ("activation", "magnitude", "taylor")


@dataclass
class LayerInputs:
    """What the model's forward passes decoder layers for one batch: the hidden states entering layer 0
    ``[batch, tokens, hidden]``, each layer's keyword arguments (shared tensors are shared, not copied), and
    the batch's ``attention_mask`` ``[batch, tokens]`` (float: the non-padding tokens the scores average over)."""

    hidden: torch.Tensor
    kwargs: list[dict]
    mask: torch.Tensor


def _device_batch(batch: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: v.to(device, dtype=dtype) if k == "pixel_values" else v.to(device) for k, v in batch.items()
            if k != "labels"}


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, anatomy: Anatomy, batches: list[dict], device: str = "cpu",
                         dtype: torch.dtype = torch.float32) -> list[LayerInputs]:
    """Run the model's own forward on each batch with every decoder layer replaced by a recorder (module
    docstring); the layers' weights are never needed, so they may be on ``meta``."""
    from compression.models import families

    family = families.family_for(model.config)
    if family.deepstack:
        raise ValueError(f"sequential analysis of {family.name} is not supported: its DeepStack features are added "
                         "between decoder layers inside the model's loop; load the whole model instead")
    layers = anatomy.decoder_layers(model)
    base = model.get_submodule(anatomy.language_model.rpartition(".")[0])  # the VLM body: vision, merge, masks
    captured: list[LayerInputs] = []
    current: dict = {}

    def recorder(i):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                current["hidden"] = hidden
            current["kwargs"].append(kwargs)
            return hidden
        return forward

    previous = [vars(layer).get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for batch in batches:
            inputs = _device_batch(batch, device, dtype)
            current.clear()
            current["kwargs"] = []
            base(**inputs, use_cache=False)
            if len(current["kwargs"]) != len(layers):
                raise RuntimeError(f"the model called {len(current['kwargs'])} of its {len(layers)} decoder layers")
            captured.append(LayerInputs(current["hidden"], current["kwargs"], inputs["attention_mask"].float()))
    finally:
        for layer, forward in zip(layers, previous):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    return captured


def _check(layer_methods, unit_methods, kinds) -> None:
    for m in layer_methods:
        if m not in LAYER_METHODS:
            raise ValueError(f"sequential layer importance method {m!r} is not one of {', '.join(LAYER_METHODS)}")
    for m in unit_methods:
        if m not in UNIT_METHODS:
            raise ValueError(f"sequential unit importance method {m!r} is not one of {', '.join(UNIT_METHODS)}")
    for k in kinds:
        if k not in ("heads", "neurons"):
            raise ValueError(f"unit kind {k!r} is not 'heads' or 'neurons'")


@torch.no_grad()
def sequential_importance(loaded: LoadedModel, samples: "Selection | list[Record] | list[dict] | None",
                          layer_methods: tuple[str, ...] = ("block_influence",),
                          unit_methods: tuple[str, ...] = ("activation", "magnitude"),
                          kinds: tuple[str, ...] = ("heads", "neurons"),
                          progress=None, release_parts: bool = True,
                          batch_size: int = BATCH_SIZE) -> dict[tuple[str, str], pd.DataFrame]:
    """Scores with one decoder layer in memory at a time, keyed ``(kind, method)``: ``("layers",
    "block_influence")``, ``("heads", "activation")``, ``("neurons", "magnitude")`` ... Each frame is what
    ``layer_importance`` / ``unit_importance`` return for the whole model.

    ``loaded`` comes from ``load(folder, sequential=True)``; ``samples`` may be None when only ``magnitude``
    is asked; records (or a selection) are batched ``batch_size`` at a time (batches given are used as they
    are). ``progress(layer, layers)`` is called after each layer. The parts outside the decoder layers (vision
    tower, projector, embeddings) are read from the shards for the capture; with ``release_parts`` (default) they
    go back to ``meta`` once every batch's layer-0 inputs are captured (nothing needs them again), so the sweep
    holds one decoder layer and the hidden states only.
    """
    _check(layer_methods, unit_methods, kinds)
    checkpoint = loaded.extras.get("checkpoint")
    if checkpoint is None:
        raise ValueError(f"model {loaded.name} was not loaded for sequential analysis; use load(..., sequential=True)")
    model, anatomy = loaded.model, loaded.anatomy
    device, dtype = loaded.extras.get("device", "cpu"), loaded.extras.get("dtype", torch.float32)
    taylor = "taylor" in unit_methods
    needs_data = bool(layer_methods) or "activation" in unit_methods or taylor
    labels: list[torch.Tensor] = []
    if needs_data:
        from compression.models.shards import load_parts

        load_parts(model, checkpoint, anatomy, dtype, device, skip=(anatomy.lm_head,))  # a no-op when already read
        batches = _batches(loaded, samples, batch_size)
        if taylor:
            if any("labels" not in b for b in batches):
                raise ValueError("Taylor importance needs answer labels in every calibration batch (records give them)")
            labels = [b["labels"] for b in batches]
        inputs = capture_layer_inputs(model, anatomy, batches, device, dtype)
    else:
        inputs = []
    if release_parts:
        _release_parts(model, anatomy)
    count = max(sum(int(x.mask.sum()) for x in inputs), 1)
    n = anatomy.num_layers
    influence = torch.zeros(n, dtype=torch.float64)
    scored: dict[str, list] = {m: [] for m in unit_methods}
    kept: list[list[torch.Tensor]] = []  # Taylor: every layer's input hidden states, one tensor per batch
    for i in range(n):
        if taylor:
            kept.append([x.hidden for x in inputs])
        with checkpoint_layer(loaded, i) as layer:
            groups = [layer_group(layer, anatomy, i, k) for k in kinds]
            if "magnitude" in unit_methods:
                scored["magnitude"] += [(g, SCORERS["magnitude"]()(g)) for g in groups]
            sums = [torch.zeros(g.units, dtype=torch.float64) for g in groups]
            mask_holder: dict[str, torch.Tensor] = {}
            handles = ([g.cols[0].register_forward_pre_hook(activation_hook(g, total, mask_holder))
                        for g, total in zip(groups, sums)] if "activation" in unit_methods else [])
            try:
                for x in inputs:
                    mask_holder["mask"] = x.mask
                    out = layer(x.hidden, **x.kwargs[i])
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    influence[i] += influence_sum(x.hidden, out, x.mask)
                    x.hidden = out
            finally:
                for h in handles:
                    h.remove()
            if "activation" in unit_methods:
                scored["activation"] += [(g, (total / count).double()) for g, total in zip(groups, sums)]
        if progress is not None:
            progress(i + 1, n * (2 if taylor else 1))
    if taylor:
        scored["taylor"] = _taylor_backward(loaded, inputs, kept, labels, kinds, progress)
    out: dict[tuple[str, str], pd.DataFrame] = {}
    if "block_influence" in layer_methods:
        scores = (influence / count).float()
        out[("layers", "block_influence")] = pd.DataFrame({"layer": range(n), "score": scores.tolist(),
                                                           "method": "block_influence"})
    for method, pairs in scored.items():
        frames = unit_frames([g for g, _ in pairs], _Fixed(dict((id(g), s) for g, s in pairs)), tuple(kinds), method)
        for kind, frame in frames.items():
            out[(kind, method)] = frame
    return out


@contextlib.contextmanager
def _onloaded_head(loaded: LoadedModel) -> Iterator[tuple[nn.Module, nn.Module]]:
    """The final norm and the LM head, read from the shards for a ``with`` block (a tied head reads the
    embeddings), back on ``meta`` afterwards."""
    from compression.models.shards import _set, _tied_keys, return_freed_memory

    model, anatomy, checkpoint = loaded.model, loaded.anatomy, loaded.extras["checkpoint"]
    dtype, device = loaded.extras.get("dtype", torch.float32), loaded.extras.get("device", "cpu")
    tied = set(_tied_keys(model))
    sources = getattr(model, "_tied_weights_keys", None)
    embeddings = next(f"{n}.weight" for n, m in model.named_modules() if m is model.get_input_embeddings())
    names = [f"{prefix}.{k}" for prefix in (anatomy.norm, anatomy.lm_head)
             for k in model.get_submodule(prefix).state_dict()]
    for name in names:
        source = name
        if name not in checkpoint.to_stored and name in tied:  # a tied head: read what it is tied to
            source = sources[name] if isinstance(sources, dict) else embeddings
        _set(model, name, checkpoint.read([source], dtype)[source].to(device))
    try:
        yield model.get_submodule(anatomy.norm), model.get_submodule(anatomy.lm_head)
    finally:
        for name in names:
            _set(model, name, "meta")
        return_freed_memory()


def _taylor_backward(loaded: LoadedModel, inputs: list[LayerInputs], kept: list[list[torch.Tensor]],
                     labels: list[torch.Tensor], kinds: tuple[str, ...], progress=None) -> list:
    """The loss through the final norm and LM head, then backward one decoder layer at a time in reverse (module
    docstring): ``(group, taylor scores)`` pairs for every layer and kind, in layer order."""
    model, anatomy = loaded.model, loaded.anatomy
    text = model.config.get_text_config()
    softcap = getattr(text, "final_logit_softcapping", None)  # Gemma: tanh capping of the logits before the loss
    positions = [answer_logit_positions(lab.to(x.hidden.device)) for lab, x in zip(labels, inputs)]
    answers = sum(int((t != -100).sum()) for _, t in positions)
    if not answers:
        raise ValueError("calibration batches hold no answer tokens; Taylor importance needs a loss")
    grads: list[torch.Tensor] = []
    with _onloaded_head(loaded) as (norm, head), torch.enable_grad():
        for p in list(norm.parameters()) + list(head.parameters()):
            p.requires_grad_(False)
        for x, (keep, targets) in zip(inputs, positions):
            hidden = x.hidden.detach().requires_grad_(True)
            logits = head(norm(hidden)[keep]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            (F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / answers).backward()
            grads.append(hidden.grad)
            x.hidden = None  # the last layer's outputs are no longer needed
    n = anatomy.num_layers
    per_layer: list[list] = [[] for _ in range(n)]
    scorer = TaylorImportance()
    for i in reversed(range(n)):
        with checkpoint_layer(loaded, i) as layer, torch.enable_grad():
            groups = [layer_group(layer, anatomy, i, k) for k in kinds]
            scored_ids = {id(p) for p in _scored_parameters(groups)}
            for p in layer.parameters():
                p.requires_grad_(id(p) in scored_ids)
                p.grad = None
            for b, x in enumerate(inputs):
                hidden = kept[i][b].detach().requires_grad_(True)
                out = layer(hidden, **x.kwargs[i])
                out = out[0] if isinstance(out, (tuple, list)) else out
                out.backward(grads[b])
                grads[b] = hidden.grad
                kept[i][b] = None
            per_layer[i] = [(g, scorer(g)) for g in groups]
            for p in layer.parameters():
                p.grad = None
        if progress is not None:
            progress(2 * n - i, 2 * n)
    return [pair for pairs in per_layer for pair in pairs]


def _batches(loaded: LoadedModel, samples, batch_size: int) -> list[dict]:
    from compression.methods.importance import calibration_batches

    if isinstance(samples, Selection):
        samples = samples.records
    if samples and not isinstance(samples[0], dict):
        return calibration_batches(loaded.prompt, list(samples), batch_size)
    return _as_batches(loaded, samples)


def _release_parts(model: nn.Module, anatomy: Anatomy) -> None:
    """Every parameter outside the decoder layers back on ``meta`` (buffers stay: they are small)."""
    from accelerate.utils import set_module_tensor_to_device

    from compression.models.shards import return_freed_memory

    prefix = anatomy.layers + "."
    for name, p in list(model.named_parameters(remove_duplicate=False)):  # a tied head too
        if not name.startswith(prefix) and p.device.type != "meta":
            set_module_tensor_to_device(model, name, "meta")
    return_freed_memory()


class _Fixed:
    """A scorer that returns scores already computed while the group's layer was in memory."""

    def __init__(self, scores: dict[int, torch.Tensor]):
        self.scores = scores

    def __call__(self, group) -> torch.Tensor:
        return self.scores[id(group)]


def checkpoint_layer(loaded: LoadedModel, i: int):
    """Decoder layer ``i`` of a sequentially loaded model, onloaded from its shards for a ``with`` block."""
    from compression.models.shards import onloaded

    return onloaded(loaded.model, loaded.anatomy, loaded.extras["checkpoint"], i,
                    loaded.extras.get("dtype", torch.float32), loaded.extras.get("device", "cpu"))


def cached_sequential_importance(loaded: LoadedModel, kind: str, method: str | None = None,
                                 selection: Selection | None = None, progress=None) -> pd.DataFrame:
    """``importance.cached_importance`` on the sequential path: one sweep scores layers (block influence),
    heads and neurons (activation and magnitude) at once and stores every frame under the whole-model cache
    names (the scores are the same), so a later request for another kind is a file read.

    ``method`` defaults to ``block_influence`` for layers and ``taylor`` for heads and neurons, as on the whole
    model. A Taylor request adds the backward sweep to the same forward sweep (every frame is stored)."""
    from compression.methods.importance import checked_request, importance_path, store_scores

    method = checked_request(kind, method, selection, LAYER_METHODS, UNIT_METHODS, " sequentially")
    path = importance_path(loaded, kind, method, selection if method != "magnitude" else None)
    if path.is_file():
        return pd.read_csv(path)
    if method == "magnitude":
        frames = sequential_importance(loaded, None, (), ("magnitude",), ("heads", "neurons"), progress)
    else:  # one forward sweep for block influence, activation and magnitude; the backward one only for Taylor
        unit_methods = UNIT_METHODS if method == "taylor" else tuple(m for m in UNIT_METHODS if m != "taylor")
        frames = sequential_importance(loaded, selection, LAYER_METHODS, unit_methods, ("heads", "neurons"), progress)
    for (k, m), frame in frames.items():
        store_scores(frame, importance_path(loaded, k, m, selection if m != "magnitude" else None))
    return frames[(kind, method)]
