"""Streaming surgery: a pruned Hugging Face folder written shard by shard from the source shards, one decoder
layer in memory at a time.

The same plan (``compression.methods.prune.make_plan``), the same surgery code and the same folder as
``apply_plan`` + ``save_pruned`` (llm-compressor's sequential onloading, applied to export):

- the *structure and config* come from ``apply_plan`` run on a ``meta``-device model (no weights), so
  ``num_hidden_layers``, ``layer_types``, widths, ``head_dim``, ``model_type`` (``<family>_pruned`` for
  non-uniform widths), ``auto_map`` and the shipped modeling files are exactly what the in-memory path writes
  (``save_pretrained`` with no tensors writes them);
- the *tensor names* are what ``save_pretrained`` would write for that model (transformers'
  ``revert_weight_conversion`` of the renamings the source folder was read with);
- the *tensors*: every tensor outside the decoder layers is copied as stored; each kept decoder layer is read
  from the source shards into its module, pruned in place by ``prune._prune_layer_width`` (the very function
  ``apply_plan`` calls: q/k/v/o rows and columns GQA-aware, per-head norms, biases), its state dict written,
  and the module put back on ``meta``; removed layers are never read;
- shards of at most ``shard_bytes`` (``safetensors.torch.save_file``) plus ``model.safetensors.index.json``,
  the processor through ``families.processors.save_processor``, ``pruning_plan.json``; all in a temporary
  folder renamed at the end.

Tensors keep the folder's stored precision (``dtype`` casts them); the in-memory path writes the precision it
loaded in (fp32 by default). Peak memory: the largest decoder layer (read + pruned copy) + one output shard
(``compression.measure.memory`` predicts it).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from compression.methods.prune import Plan, _prune_layer_width, apply_plan
from compression.models.shards import INDEX, Checkpoint, onloaded, plan_shards, shard_file_names

SHARD_BYTES = 1_000_000_000  # one shard is held in memory before it is written: the main memory term


def _output_names(model) -> dict[str, str]:
    """``{name save_pretrained writes: module key}`` for every tensor ``model`` (on meta) would save."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    by_id = {id(t): k for k, t in state.items()}
    reverted = revert_weight_conversion(model, state)
    names = {}
    for out_name, t in reverted.items():
        if id(t) not in by_id:
            raise ValueError(f"cannot trace saved tensor {out_name} back to a module; streaming needs renamings only")
        names[out_name] = by_id[id(t)]
    return names


def stream_prune(source: str | Path, plan: Plan, out_dir: str | Path, shard_bytes: int = SHARD_BYTES,
                 dtype: torch.dtype | None = None, progress=None) -> Path:
    """Write the pruned folder for ``plan`` at ``out_dir`` (new or empty) from the model folder ``source``,
    never holding more than one decoder layer (module docstring). Returns the folder's path.

    ``dtype``: cast floating tensors (default: keep the stored precision). ``progress(done, total)`` is called
    after each decoder layer."""
    from compression.models import anatomy_from_config, families
    from compression.models.loader import _read_config, load_processor, load_skeleton
    from compression.models.families.processors import save_processor

    source = Path(source).expanduser()
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} already exists and is not empty; expected a new folder")
    if not (source / "config.json").is_file():
        raise ValueError(f"model folder {source} has no config.json; expected a Hugging Face model folder")
    original, checkpoint = load_skeleton(_read_config(source / "config.json"), source, dtype=None, read_parts=False)
    pruned, _ = load_skeleton(_read_config(source / "config.json"), source, dtype=None, read_parts=False)
    anatomy = anatomy_from_config(original.config)
    pruned, pruned_anatomy = apply_plan(pruned, anatomy_from_config(pruned.config), plan)
    kept = [i for i in range(anatomy.num_layers) if i not in set(plan.layers_removed)]
    names = _output_names(pruned)
    meta = pruned.state_dict()
    layer_prefix = pruned_anatomy.layers + "."

    def layer_of(module_key: str) -> int | None:
        if not module_key.startswith(layer_prefix):
            return None
        return int(module_key[len(layer_prefix):].split(".", 1)[0])

    def out_dtype(module_key: str) -> torch.dtype:
        j = layer_of(module_key)
        key = module_key if j is None else f"{anatomy.layers}.{kept[j]}." + module_key[len(layer_prefix):].split(".", 1)[1]
        stored = checkpoint.stored(key).dtype
        return dtype if dtype is not None and stored.is_floating_point else stored

    # emission order: the parts before the layers, the layers in order, then the rest (final norm, head)
    def order(item):
        out_name, module_key = item
        j = layer_of(module_key)
        return (1, j, out_name) if j is not None else (0 if "embed" in module_key or not module_key.startswith(
            pruned_anatomy.language_model) else 2, -1, out_name)

    emitted = sorted(names.items(), key=order)
    sizes = [(n, meta[k].numel() * torch.empty((), dtype=out_dtype(k)).element_size()) for n, k in emitted]
    shards = plan_shards(sizes, shard_bytes)
    files = shard_file_names(len(shards))
    shard_of = {n: files[s] for s, names_in in enumerate(shards) for n in names_in}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from safetensors.torch import save_file

    try:
        if (source / "generation_config.json").is_file():  # what from_pretrained would have read
            from transformers import GenerationConfig

            pruned.generation_config = GenerationConfig.from_pretrained(source)
        pruned.save_pretrained(tmp, state_dict={})  # config, generation config, modeling files + auto_map
        buffer: dict[str, torch.Tensor] = {}
        layer_cache: dict[str, torch.Tensor] = {}
        current_layer = None
        weight_map, total = {}, 0
        for n, (out_name, module_key) in enumerate(emitted):
            j = layer_of(module_key)
            if j is None:
                tensor = checkpoint.read([module_key], out_dtype(module_key))[module_key]
            else:
                if j != current_layer:
                    layer_cache = _pruned_layer(original, anatomy, checkpoint, plan, kept[j], dtype)
                    current_layer = j
                    if progress is not None:
                        progress(j + 1, len(kept))
                tensor = layer_cache.pop(module_key[len(layer_prefix):].split(".", 1)[1])
            if tuple(tensor.shape) != tuple(meta[module_key].shape):
                raise ValueError(f"{out_name}: streamed shape {tuple(tensor.shape)} is not the pruned model's "
                                 f"{tuple(meta[module_key].shape)}")
            buffer[out_name] = tensor.contiguous()
            weight_map[out_name] = shard_of[out_name]
            total += tensor.numel() * tensor.element_size()
            last = n + 1 == len(emitted) or shard_of[emitted[n + 1][0]] != shard_of[out_name]
            if last:
                save_file(buffer, tmp / shard_of[out_name], metadata={"format": "pt"})
                buffer = {}
        if len(files) > 1:
            params = sum(meta[k].numel() for k in names.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_parameters": params, "total_size": total},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        processor = load_processor(source, family=families.family_for(original.config))
        save_processor(processor, tmp)
        (tmp / "pruning_plan.json").write_text(plan.to_json())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@torch.no_grad()
def _pruned_layer(model, anatomy, checkpoint: Checkpoint, plan: Plan, i: int,
                  dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Decoder layer ``i``'s state dict after the plan's width surgery (as stored, or cast to ``dtype``)."""
    with onloaded(model, anatomy, checkpoint, i, dtype) as layer:
        if plan.method == "width" and (i in plan.heads_kept or i in plan.neurons_kept):
            _prune_layer_width(layer, anatomy, i, plan.heads_kept.get(i), plan.kv_heads_kept.get(i),
                               plan.neurons_kept.get(i))
        state = {k: v.detach() for k, v in layer.state_dict().items()}
        # the surgery replaced modules; what onloaded puts back on meta is only what it loaded
        layers = anatomy.decoder_layers(model)
        layers[i] = layers[i].to("meta")
    return state
