"""Importance of decoder layers, attention heads and MLP neurons, on calibration image-question samples.

Layers (``layer_importance``):

- ``block_influence`` (Men et al., ShortGPT, arXiv 2403.03853; used by Huang et al., arXiv
  2507.20749): ``BI_i = mean over tokens of (1 - cos(h_in, h_out))`` of decoder layer ``i``,
  from forward hooks on the layers (``output_hidden_states[-1]`` is taken after the final norm,
  so hooks, not hidden states, give the last layer's output);
- ``removal_loss``: increase of the answer-token cross-entropy when that one layer is skipped.

Units (``unit_importance``), one row per attention head or MLP neuron of every layer. A unit is
a *coupled group* (Torch-Pruning's word): every weight slice that goes when it goes —
a query head's q rows and o columns (Phi: ``dense``), a neuron's gate/up rows (Phi: ``fc1``)
and its down column (``fc2``), biases included. Scorers are interchangeable objects with one
call signature, ``scorer(group) -> 1-D tensor`` of one score per unit:

- ``TaylorImportance`` (default; LLM-Pruner, Ma et al. 2023; the paper): first-order Taylor
  ``sum |W * dL/dW|`` over the group, ``dL/dW`` the gradient of the mean answer-token
  cross-entropy over all calibration samples. Two paths give the same scores (to float rounding):
  *lean* (default, ``_taylor_lean``): one backward over all samples in one batch, with per-layer
  activation recomputation; a post-accumulate-grad hook on each scored weight turns its gradient
  into per-unit sums the moment it arrives and frees it, so memory is the weights + layer inputs +
  one layer's activations, with no gradients kept; *old* (``lean=False``,
  ``_accumulate_gradients``): gradients of every scored weight summed over mini-batches and kept,
  memory = weights + those gradients + one mini-batch of activations. Only scored weights ask
  for gradients on either path. Measured on LLaVA-1.5-7B layer shapes: ``benchmarks/results/scale.md``;
- ``ActivationImportance`` (Minitron, Muralidharan et al. 2024): mean over tokens of a head's
  attention-output L2 norm (input of o_proj) / a neuron's absolute activation (input of down_proj);
- ``MagnitudeImportance``: ``sum |W|`` over the group, no data.

GQA: a KV head is shared by the ``G`` query heads of its group and goes only with all of them,
so each query head is scored with its own q rows and o columns **plus 1/G of its KV group's k and
v rows**: the sum over a group's query heads is the importance of the whole KV group
(``compression.methods.prune`` ranks KV groups by that sum, then query heads inside kept groups).

Calibration data is any data source (``compression.data.sources``: the user's LLaVA JSON, a datasets
folder, or ShapesVQA for the reference model), prompted with the model's own chat template; the loss is
on the assistant turns only.

Models larger than memory: ``compression.methods.sequential`` gives block influence, Taylor, activation and
magnitude scores with one decoder layer in memory at a time (the same per-layer sums, the same loss; equal to
these to float rounding).

Results are pandas DataFrames; ``cached_importance`` stores them under
``cache_dir()/importance/<model fingerprint>-<selection fingerprint>-<kind>-<method>.csv`` (CSV, so a
repeated request is a file read; the selection fingerprint covers the data file and the records chosen).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Protocol

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from compression.data.records import Record
from compression.data.sources import Selection, SourceSpec, open_source, select
from compression.models import Anatomy, LoadedModel
from compression.models.prompting import PromptFormat, training_inputs
from compression.paths import cache_dir

LayerMethod = Literal["block_influence", "removal_loss"]
UnitKind = Literal["heads", "neurons"]
UnitMethod = Literal["taylor", "activation", "magnitude"]
LAYER_METHODS = ("block_influence", "removal_loss")
UNIT_METHODS = ("taylor", "activation", "magnitude")
DEFAULT_SAMPLES = 32
BATCH_SIZE = 8
LM_HEAD_MIN_ROWS = 16  # see _taylor_lean


# ------------------------------------------------------------------------------------------------ data

def calibration_selection(data: "str | dict | SourceSpec" = "shapes", n: int = DEFAULT_SAMPLES,
                          seed: int = 0) -> Selection:
    """``n`` calibration records of a data source (a seeded random subset, images required)."""
    if n < 1:
        raise ValueError(f"calibration samples {n} must be at least 1")
    return select(open_source(data, "calibration"), samples=n, seed=seed, need_images=True, order="random")


def calibration_batches(prompt: PromptFormat, records: list[Record], batch_size: int = BATCH_SIZE) -> list[dict]:
    """Teacher-forcing batches in the model's prompt format, labels on the assistant turns only."""
    return [training_inputs(prompt, records[start:start + batch_size]) for start in range(0, len(records), batch_size)]


def _to(batch: dict, model: nn.Module) -> dict:
    p = next(model.parameters())
    return {k: v.to(p.device, dtype=p.dtype) if k == "pixel_values" else v.to(p.device) for k, v in batch.items()}


def _as_batches(loaded: LoadedModel, samples: "Selection | list[Record] | list[dict]") -> list[dict]:
    if not loaded.has_weights:
        raise ValueError(f"model {loaded.name} is config-only (no weights); importance needs weights")
    if isinstance(samples, Selection):
        samples = samples.records
    if not samples:
        raise ValueError("no calibration samples given; expected at least 1")
    if isinstance(samples[0], dict):  # already batches
        return samples
    return calibration_batches(loaded.prompt, samples)


# ------------------------------------------------------------------------------------------------ layers

def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def influence_sum(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum over non-padding tokens of (1 - cos(h_in, h_out))`` (float64 scalar); ``mask`` ``[batch, tokens]``."""
    cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (batch, tokens)
    return ((1 - cos) * mask).sum().double().cpu()


@torch.no_grad()
def block_influence(model: nn.Module, anatomy: Anatomy, batches: list[dict]) -> torch.Tensor:
    """``BI_i`` per decoder layer: mean over (non-padding) tokens of ``1 - cos(h_in, h_out)``."""
    layers = anatomy.decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    mask_holder: dict[str, torch.Tensor] = {}
    handles = []

    def hook(i):
        def fn(module, args, kwargs, output):
            sums[i] += influence_sum(_hidden_from(args, kwargs), _output_hidden(output), mask_holder["mask"])
        return fn

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        for batch in batches:
            batch = _to(batch, model)
            mask_holder["mask"] = batch["attention_mask"].to(torch.float32)
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
            count += int(batch["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).float()


@torch.no_grad()
def _answer_loss(model: nn.Module, batches: list[dict]) -> float:
    total, tokens = 0.0, 0
    for batch in batches:
        batch = _to(batch, model)
        out = model(**batch, use_cache=False)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(out.loss) * n
        tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def removal_loss(model: nn.Module, anatomy: Anatomy, batches: list[dict]) -> torch.Tensor:
    """Per decoder layer: answer cross-entropy with that layer skipped minus the full model's."""
    base = _answer_loss(model, batches)
    scores = []
    for layer in anatomy.decoder_layers(model):
        # the layer still runs, but its output is replaced by its input: the residual stream skips it
        handle = layer.register_forward_hook(
            lambda m, args, kwargs, out: _hidden_from(args, kwargs) if not isinstance(out, tuple)
            else (_hidden_from(args, kwargs),) + tuple(out[1:]), with_kwargs=True)
        try:
            scores.append(_answer_loss(model, batches) - base)
        finally:
            handle.remove()
    return torch.tensor(scores)


_LAYER_SCORERS = {"block_influence": block_influence, "removal_loss": removal_loss}


def layer_importance(loaded: LoadedModel, samples: "Selection | list[Record] | list[dict]",
                     method: LayerMethod = "block_influence") -> pd.DataFrame:
    """One row per decoder layer: ``layer``, ``score`` (higher = more important), ``method``."""
    if method not in _LAYER_SCORERS:
        raise ValueError(f"layer importance method {method!r} is not one of {', '.join(LAYER_METHODS)}")
    batches = _as_batches(loaded, samples)
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        scores = _LAYER_SCORERS[method](model, loaded.anatomy, batches)
    finally:
        model.train(was_training)
    return pd.DataFrame({"layer": range(len(scores)), "score": scores.tolist(), "method": method})


# ------------------------------------------------------------------------------------------------ units

@dataclass
class CoupledGroup:
    """One layer's prunable units of one kind, and every weight slice that belongs to each unit.

    ``rows``: linears whose output rows belong to units (q; gate/up), ``unit_size`` rows each;
    ``cols``: linears whose input columns belong to units (o; down); ``shared_rows``: k and v,
    whose rows belong to a KV group of ``group_size`` units (GQA). ``activation``: per-unit mean
    activation collected on the calibration samples (``ActivationImportance`` only); ``taylor``:
    per-unit Taylor scores accumulated during the backward pass by the lean path (``TaylorImportance``).
    """

    layer: int
    kind: UnitKind
    units: int
    unit_size: int
    group_size: int
    rows: list[nn.Linear]
    cols: list[nn.Linear]
    shared_rows: list[nn.Linear] = field(default_factory=list)
    activation: torch.Tensor | None = None
    taylor: torch.Tensor | None = None


def _per_unit_parts(group: CoupledGroup) -> list[tuple[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]:
    """Every weight and bias of the group, each with the map from an elementwise tensor of its shape
    (``|W|``, ``|W * dL/dW|``) to its contribution to the ``units`` scores (float64)."""
    u, size, g = group.units, group.unit_size, group.group_size
    rows = lambda e: e.sum(1).double().view(u, size).sum(1)  # noqa: E731 - output rows of each unit
    row_bias = lambda e: e.double().view(u, size).sum(1)  # noqa: E731
    cols = lambda e: e.sum(0).double().view(u, size).sum(1)  # noqa: E731 - input columns of each unit
    # a KV group's k/v rows are shared by its G query heads: each head gets 1/G of them
    shared = lambda e: (e.sum(1).double().view(u // g, size).sum(1) / g).repeat_interleave(g)  # noqa: E731
    shared_bias = lambda e: (e.double().view(u // g, size).sum(1) / g).repeat_interleave(g)  # noqa: E731
    parts = []
    for linears, weight_fn, bias_fn in ((group.rows, rows, row_bias), (group.shared_rows, shared, shared_bias)):
        for lin in linears:
            parts.append((lin.weight, weight_fn))
            if lin.bias is not None:
                parts.append((lin.bias, bias_fn))
    parts += [(lin.weight, cols) for lin in group.cols]  # an o/down bias lives on the hidden size: no unit's
    return parts


def _reduce(group: CoupledGroup, elementwise) -> torch.Tensor:
    """Sum ``elementwise(tensor)`` over every slice of each unit (``elementwise`` of weight or bias)."""
    score = torch.zeros(group.units, dtype=torch.float64)
    for p, per_unit in _per_unit_parts(group):
        score += per_unit(elementwise(p)).cpu()
    return score


class UnitScorer(Protocol):
    """One call signature for every scorer: ``scorer(group) -> 1-D tensor`` (one score per unit)."""

    name: str
    needs: Literal["gradients", "activations", "weights"]

    def __call__(self, group: CoupledGroup) -> torch.Tensor: ...


class TaylorImportance:
    name, needs = "taylor", "gradients"

    def __call__(self, group: CoupledGroup) -> torch.Tensor:
        if group.taylor is not None:  # the lean path scored the group as its gradients arrived
            return group.taylor
        def taylor(p: torch.Tensor) -> torch.Tensor:
            if p.grad is None:
                raise ValueError("Taylor importance needs gradients; run the backward pass first")
            return (p.detach().float() * p.grad.float()).abs()
        return _reduce(group, taylor)


class MagnitudeImportance:
    name, needs = "magnitude", "weights"

    def __call__(self, group: CoupledGroup) -> torch.Tensor:
        return _reduce(group, lambda p: p.detach().float().abs())


class ActivationImportance:
    name, needs = "activation", "activations"

    def __call__(self, group: CoupledGroup) -> torch.Tensor:
        if group.activation is None:
            raise ValueError("activation importance needs activations collected on calibration samples")
        return group.activation.double()


SCORERS: dict[str, type] = {"taylor": TaylorImportance, "activation": ActivationImportance,
                            "magnitude": MagnitudeImportance}


def layer_group(layer: nn.Module, anatomy: Anatomy, i: int, kind: UnitKind) -> CoupledGroup:
    """The coupled group of one kind in decoder layer ``i`` (``layer``, the module itself)."""
    if kind == "heads":
        a = anatomy.attention_linears(layer)
        heads, kv = anatomy.heads_per_layer[i], anatomy.kv_heads_per_layer[i]
        return CoupledGroup(i, kind, heads, anatomy.head_dim, heads // kv, [a["q"]], [a["o"]], [a["k"], a["v"]])
    m = anatomy.mlp_linears(layer)
    return CoupledGroup(i, kind, anatomy.intermediate_per_layer[i], 1, 1,
                        [m[n] for n in ("gate", "up") if n in m], [m["down"]])


def coupled_groups(model: nn.Module, anatomy: Anatomy, kind: UnitKind) -> list[CoupledGroup]:
    return [layer_group(layer, anatomy, i, kind) for i, layer in enumerate(anatomy.decoder_layers(model))]


def _scored_parameters(groups: list[CoupledGroup]) -> list[nn.Parameter]:
    params = []
    for g in groups:
        for lin in g.rows + g.cols + g.shared_rows:
            params += [lin.weight] + ([lin.bias] if lin.bias is not None else [])
    return params


def _accumulate_gradients(model: nn.Module, groups: list[CoupledGroup], batches: list[dict]) -> None:
    """One backward pass over the calibration batches; gradients only for the scored weights.

    The loss is the mean answer-token cross-entropy over all samples: each mini-batch's loss is
    weighted by its share of answer tokens, so the summed gradient is the full batch's.
    """
    scored = {id(p) for p in _scored_parameters(groups)}
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in scored)
            p.grad = None
        for batch in batches:
            batch = _to(batch, model)
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(**batch, use_cache=False).loss * (n / max(tokens, 1))
            loss.backward()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(previous[name])


def merge_batches(batches: list[dict], pad_token_id: int = 0) -> dict:
    """All calibration batches as one: rows right-padded to the longest (mask 0, label -100).

    Causal attention never lets a real token see the padding after it, and position ids do not
    depend on the mask, so every real token's logits, and the mean answer loss, are unchanged.
    ``pad_token_id`` must not be the image token (LLaVA counts those).
    """
    if len(batches) == 1:
        return batches[0]
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100}
    merged = {}
    for key in batches[0]:
        per_token = all(b[key].dim() >= 2 and b[key].shape[:2] == b["input_ids"].shape for b in batches)
        if per_token:  # [batch, tokens, ...]: ids, mask, labels and any token-type ids the processor adds
            merged[key] = torch.cat([F.pad(b[key], (0, 0) * (b[key].dim() - 2) + (0, width - b[key].shape[1]),
                                           value=fill.get(key, 0)) for b in batches])
        else:  # per image (pixel_values, image sizes)
            merged[key] = torch.cat([b[key] for b in batches])
    return merged


@contextlib.contextmanager
def _recompute_layers(layers: nn.ModuleList) -> Iterator[None]:
    """Activation checkpointing per decoder layer (Chen et al. 2016, ``torch.utils.checkpoint``): the
    forward keeps only each layer's input; backward recomputes one layer at a time."""
    from torch.utils.checkpoint import checkpoint

    previous = [vars(layer).get("forward") for layer in layers]  # accelerate hooks may have set one
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer, forward in zip(layers, previous):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def answer_logit_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits the Taylor loss reads, ``[batch, tokens]`` bool, and their targets.

    Logits at position t predict token t + 1: the positions whose next token is an answer token, padded with
    ignored ones (target -100) to ``LM_HEAD_MIN_ROWS`` rows: with 1-7 rows the LM head's backward takes a
    matrix-vector kernel that sums the 32k-vocabulary products in sequence, ~10x less precise in fp32 than the
    blocked GEMM the full-logits path uses, and the scores then drift by up to 1e-4."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
    keep = shifted != -100
    spare = (~keep).flatten().nonzero().flatten()[:max(0, LM_HEAD_MIN_ROWS - int(keep.sum()))]
    keep.view(-1)[spare] = True
    return keep, shifted[keep]


def _taylor_lean(model: nn.Module, anatomy: Anatomy, groups: list[CoupledGroup], batches: list[dict],
                 recompute: bool = True) -> None:
    """Taylor scores accumulated as each weight's gradient arrives, that gradient freed at once.

    One forward and one backward over *all* calibration samples (the paper's 10 samples, one
    backward): each scored weight then receives its full-batch gradient ``G`` exactly once, so a
    ``register_post_accumulate_grad_hook`` can turn ``|W * G|`` into per-unit sums at that moment
    and set ``p.grad = None``. Why one batch: ``|W * G|`` is per element of the *summed* gradient,
    so with several mini-batches every element would have to be kept until the last one — the
    very memory this path removes. The scores equal ``_accumulate_gradients``' (same loss, same
    summed gradient; float rounding only).

    What the single batch costs is activations for every sample at once; ``recompute`` (default)
    keeps only each decoder layer's input and recomputes one layer at a time in backward (about
    one more forward of the language model). The loss is taken on the answer positions only
    (``logits_to_keep`` mask), so the full ``[tokens, vocab]`` logits are never built.
    Peak memory: weights + every layer's input hidden states + one layer's activations + the
    current weight's gradient and its ``|W * G|``.
    """
    text = model.config.text_config if hasattr(model.config, "text_config") else model.config
    image_token = getattr(model.config, "image_token_index", None)
    pad = next(t for t in (getattr(text, "pad_token_id", None), 0, 1) if t is not None and t != image_token)
    batch = _to(merge_batches(batches, pad), model)
    keep, targets = answer_logit_positions(batch.pop("labels"))
    if not (targets != -100).any():
        raise ValueError("calibration batches hold no answer tokens; Taylor importance needs a loss")
    parts: dict[int, list[tuple[torch.Tensor, Callable]]] = {}
    scores = [torch.zeros(g.units, dtype=torch.float64) for g in groups]
    for gi, g in enumerate(groups):
        for p, per_unit in _per_unit_parts(g):
            parts.setdefault(id(p), []).append((scores[gi], per_unit))
    params = {id(p): p for g in groups for p, _ in _per_unit_parts(g)}
    arrived: set[int] = set()

    @torch.no_grad()
    def score_and_free(p: torch.Tensor) -> None:
        # in place on the gradient (fp32; a float copy of a bf16 one): no weight-sized temporaries beyond it
        elementwise = p.grad.float().mul_(p.detach()).abs_()
        for total, per_unit in parts[id(p)]:
            total += per_unit(elementwise).cpu()
        arrived.add(id(p))
        p.grad = None

    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in params)
            p.grad = None
        handles = [p.register_post_accumulate_grad_hook(score_and_free) for p in params.values()]
        layers = anatomy.decoder_layers(model)
        with _recompute_layers(layers) if recompute else contextlib.nullcontext():
            logits = model(**batch, use_cache=False, logits_to_keep=keep).logits  # [answer tokens, vocab]
            F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="mean").backward()
    finally:
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(previous[name])
    if len(arrived) != len(params):
        raise ValueError(f"{len(params) - len(arrived)} scored weights received no gradient; "
                         "Taylor importance needs every scored weight on the loss path")
    for g, total in zip(groups, scores):
        g.taylor = total


def activation_hook(group: CoupledGroup, total: torch.Tensor, mask_holder: dict[str, torch.Tensor]):
    """A forward pre-hook for the group's o_proj / down_proj that adds, per unit, the activation norm
    (a head's attention output L2 norm; a neuron's absolute value) over the non-padding tokens to ``total``."""
    def fn(module, args):
        x = args[0].float()  # (batch, tokens, units * unit_size)
        per_unit = x.view(*x.shape[:-1], group.units, group.unit_size).norm(dim=-1) if group.unit_size > 1 else x.abs()
        total.add_((per_unit * mask_holder["mask"][..., None]).sum((0, 1)).double().cpu())
    return fn


@torch.no_grad()
def _collect_activations(model: nn.Module, groups: list[CoupledGroup], batches: list[dict]) -> None:
    """Mean per-unit activation over non-padding tokens, from pre-hooks on o_proj / down_proj."""
    sums = [torch.zeros(g.units, dtype=torch.float64) for g in groups]
    mask_holder: dict[str, torch.Tensor] = {}
    handles = [g.cols[0].register_forward_pre_hook(activation_hook(g, total, mask_holder))
               for g, total in zip(groups, sums)]
    count = 0
    try:
        for batch in batches:
            batch = _to(batch, model)
            mask_holder["mask"] = batch["attention_mask"].float()
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
            count += int(batch["attention_mask"].sum())
    finally:
        for h in handles:
            h.remove()
    for g, s in zip(groups, sums):
        g.activation = s / max(count, 1)


def unit_frames(groups: list[CoupledGroup], scorer: "UnitScorer", kinds: tuple[UnitKind, ...],
                method: str) -> dict[str, pd.DataFrame]:
    """The scored groups as ``unit_importance``'s frames, one per kind."""
    rows: dict[str, list[dict]] = {k: [] for k in kinds}
    for g in groups:
        for u, s in enumerate(scorer(g).tolist()):
            row = {"layer": g.layer, ("head" if g.kind == "heads" else "neuron"): u, "score": s, "method": method}
            if g.kind == "heads":
                row["kv_head"] = u // g.group_size
            rows[g.kind].append(row)
    order = {"heads": ["layer", "head", "kv_head", "score", "method"], "neurons": ["layer", "neuron", "score", "method"]}
    return {k: pd.DataFrame(rows[k])[order[k]] for k in kinds}


def unit_importance(loaded: LoadedModel, samples: "Selection | list[Record] | list[dict] | None" = None,
                    kind: UnitKind = "heads", method: UnitMethod = "taylor", lean: bool = True,
                    recompute: bool = True) -> pd.DataFrame:
    """One row per attention head (``kind="heads"``) or MLP neuron (``"neurons"``) of every layer.

    Columns: ``layer``, ``head`` (plus ``kv_head``, its KV group) or ``neuron``, ``score``
    (higher = more important), ``method``. For GQA each query head's score carries 1/G of its
    KV group's k/v importance (module docstring). ``magnitude`` ignores ``samples``.
    Taylor: ``lean`` (default) scores each weight as its gradient arrives and frees it, over one
    batch of every sample (``_taylor_lean``; ``recompute`` recomputes layer activations in
    backward); ``lean=False`` keeps every scored gradient over mini-batches (the old path, for comparison).
    """
    return unit_importances(loaded, samples, (kind,), method, lean, recompute)[kind]


def unit_importances(loaded: LoadedModel, samples: "Selection | list[Record] | list[dict] | None" = None,
                     kinds: tuple[UnitKind, ...] = ("heads", "neurons"), method: UnitMethod = "taylor",
                     lean: bool = True, recompute: bool = True) -> dict[str, pd.DataFrame]:
    """``unit_importance`` for several kinds from one pass over the data (one backward for Taylor)."""
    if not kinds:
        raise ValueError("no unit kinds given; expected 'heads' and/or 'neurons'")
    for kind in kinds:
        if kind not in ("heads", "neurons"):
            raise ValueError(f"unit kind {kind!r} is not 'heads' or 'neurons'")
    if method not in SCORERS:
        raise ValueError(f"unit importance method {method!r} is not one of {', '.join(UNIT_METHODS)}")
    model, anatomy = loaded.model, loaded.anatomy
    scorer: UnitScorer = SCORERS[method]()
    groups = [g for k in kinds for g in coupled_groups(model, anatomy, k)]
    was_training = model.training
    model.eval()
    try:
        if scorer.needs == "gradients" and lean:
            _taylor_lean(model, anatomy, groups, _as_batches(loaded, samples), recompute)
        elif scorer.needs == "gradients":
            _accumulate_gradients(model, groups, _as_batches(loaded, samples))
        elif scorer.needs == "activations":
            _collect_activations(model, groups, _as_batches(loaded, samples))
        frames = unit_frames(groups, scorer, kinds, method)
    finally:
        if scorer.needs == "gradients":
            for p in model.parameters():
                p.grad = None  # free the gradients: the model is back to its inference footprint
        model.train(was_training)
    return frames


# ------------------------------------------------------------------------------------------------ cache

def importance_path(loaded: LoadedModel, kind: str, method: str, selection: Selection | None) -> Path:
    data_key = selection.fingerprint() if selection is not None else "nodata"
    # scores computed in another precision differ in their last digits: kept apart (fp32 keeps its old name)
    p = next(loaded.model.parameters())
    precision = "" if p.dtype == torch.float32 else "-" + str(p.dtype).replace("torch.", "")
    return cache_dir() / "importance" / f"{loaded.fingerprint}-{data_key}-{kind}-{method}{precision}.csv"


def checked_request(kind: str, method: str | None, selection: Selection | None, layer_methods: tuple[str, ...],
                    unit_methods: tuple[str, ...], how: str = "") -> str:
    """The method a cached-importance request asks for (defaults: ``block_influence`` for layers, ``taylor`` for
    heads and neurons), after checking it; ``how`` names the path in the error (`` sequentially``)."""
    if kind not in ("layers", "heads", "neurons"):
        raise ValueError(f"importance kind {kind!r} is not one of layers, heads, neurons")
    method = method or ("block_influence" if kind == "layers" else "taylor")
    allowed = layer_methods if kind == "layers" else unit_methods
    if method not in allowed:
        raise ValueError(f"method {method!r} does not score {kind}{how}; expected one of {', '.join(allowed)}")
    if selection is None and method != "magnitude":
        raise ValueError(f"{method} importance needs calibration data; expected a selection of records")
    return method


def store_scores(frame: pd.DataFrame, path: Path) -> None:
    """Write a score frame to its cache file (a temporary name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def cached_importance(loaded: LoadedModel, kind: Literal["layers", "heads", "neurons"], method: str | None = None,
                      selection: Selection | None = None) -> pd.DataFrame:
    """``layer_importance`` / ``unit_importance``, stored by (model fingerprint, calibration selection, kind, method).

    ``method`` defaults to ``block_influence`` for layers and ``taylor`` for heads and neurons;
    ``selection`` (from ``calibration_selection``) may be None only for ``magnitude``, which needs no data.
    """
    method = checked_request(kind, method, selection, LAYER_METHODS, UNIT_METHODS)
    path = importance_path(loaded, kind, method, selection if method != "magnitude" else None)
    if path.is_file():
        return pd.read_csv(path)
    if kind == "layers":
        frame = layer_importance(loaded, selection, method)
    else:
        frame = unit_importance(loaded, selection, kind, method)
    store_scores(frame, path)
    return frame
