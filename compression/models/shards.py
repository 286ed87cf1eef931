"""A model folder's safetensors shards, read one tensor at a time, and its decoder layers onloaded one at a time.

What llm-compressor calls *sequential onloading* (``vllm-project/llm-compressor``, ``sequential`` pipeline;
accelerate's ``init_empty_weights`` / ``set_module_tensor_to_device``): the model is built on the ``meta``
device, the parts that are not decoder layers (embeddings, vision tower, projector, final norm) are read from
the shards, and each decoder layer is read only while it is used, then put back on ``meta``.

``Checkpoint`` indexes the shards (``model.safetensors.index.json``, or every ``*.safetensors`` header) and
maps each stored key to the module name it loads into with transformers' own renaming rules
(``conversion_mapping``: LLaVA folders store ``language_model.model.layers.0...`` for the module
``model.language_model.layers.0...``). Checkpoints whose tensors transformers *converts* on load (fused or
split projections, MoE expert stacking) are refused in one line: their stored tensors are not the modules'.

Each tensor is read through its own ``safetensors.safe_open`` as a view of the memory-mapped file (a cast
copies): its pages become resident as they are used and are unmapped when it is freed, so a layer put back on
``meta`` leaves nothing of itself in the resident set.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from compression.models.anatomy import Anatomy, ModelLoadError

INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a shard header describes it."""

    key: str  # the stored name
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


class Checkpoint:
    """The safetensors shards of a model folder: what they hold, and reads of named tensors."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"model folder {self.folder} has no safetensors shards; sequential analysis and "
                                 "streaming surgery read *.safetensors (convert .bin checkpoints first)")
        self.tensors: dict[str, StoredTensor] = {}
        for name in files:
            for key, info in _header(self.folder / name).items():
                if info["dtype"] not in _DTYPES:
                    raise ModelLoadError(f"{name}: tensor {key} has dtype {info['dtype']}; expected a float or int dtype")
                self.tensors[key] = StoredTensor(key, name, _DTYPES[info["dtype"]], tuple(info["shape"]))
        self.to_module: dict[str, str] = {}  # stored key -> module key (``bind``)
        self.to_stored: dict[str, str] = {}

    @property
    def nbytes(self) -> int:
        """Bytes the shards hold (the weights as stored)."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype most stored bytes have (the folder's storage precision)."""
        by: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        return max(by, key=by.get) if by else torch.float32

    def bind(self, model: nn.Module) -> None:
        """Map every stored key to ``model``'s parameter / buffer names, as ``from_pretrained`` would, and
        remember on the model which renamings were used (``_weight_conversions``: what ``save_pretrained``
        reverts, so a streamed folder keeps the names an in-memory save would write)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        for key in self.tensors:
            target, converted = rename_source_key(key, renamings, converters, prefix, meta)
            if converted is not None:
                raise ModelLoadError(f"stored tensor {key} is converted by transformers on load ({converted}); "
                                     "sequential analysis and streaming surgery need tensors stored as the modules hold them")
            self.to_module[key] = target
            self.to_stored[target] = key
        model._weight_conversions = [c for c in conversions if c.was_used()]

    def stored(self, module_key: str) -> StoredTensor:
        if module_key not in self.to_stored:
            raise ModelLoadError(f"{self.folder}: no stored tensor loads into {module_key}; the shards do not match "
                                 "the config")
        return self.tensors[self.to_stored[module_key]]

    def read(self, module_keys: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (module names), copied out of the shards (``dtype``: cast floating tensors)."""
        from safetensors import safe_open

        out = {}
        for k in module_keys:
            # one mapping per tensor: the tensor is a view of the memory-mapped file, its pages resident as they
            # are used and unmapped when it is freed. Tensors of one safe_open share its mapping, and a small one
            # kept (a norm weight) would keep every page its siblings touched resident.
            with safe_open(self.folder / self.stored(k).file, framework="pt") as f:
                t = f.get_tensor(self.to_stored[k])
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                t = t.to(dtype)
            out[k] = t
        return out


# ------------------------------------------------------------------------------------------------ writing

def plan_shards(items: list[tuple[Any, int]], shard_bytes: int) -> list[list[Any]]:
    """``(item, bytes)`` pairs grouped in order into shards of at most ``shard_bytes`` (an item larger than that
    gets a shard of its own), as ``save_pretrained``'s ``max_shard_size`` does."""
    shards, current, size = [], [], 0
    for item, b in items:
        if current and size + b > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += b
    return shards + ([current] if current else [])


def shard_file_names(count: int) -> list[str]:
    """transformers' names for ``count`` shards: ``model.safetensors``, or ``model-00001-of-0000N.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# ------------------------------------------------------------------------------------------------ onloading

def return_freed_memory() -> None:
    """Hand freed heap pages back to the system (glibc ``malloc_trim``). A vision tower's weights are many
    tensors small enough for malloc's heap; freed between later allocations they stay resident otherwise."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _set(module: nn.Module, name: str, value: torch.Tensor | str) -> None:
    from accelerate.utils import set_module_tensor_to_device

    if isinstance(value, str):  # a device: "meta" puts it back
        set_module_tensor_to_device(module, name, value)
    else:
        set_module_tensor_to_device(module, name, "cpu" if value.device.type == "cpu" else value.device, value=value)


def load_parts(model: nn.Module, checkpoint: Checkpoint, anatomy: Anatomy, dtype: torch.dtype,
               device: str = "cpu", skip: tuple[str, ...] = ()) -> None:
    """Read every tensor of ``model`` that is not in a decoder layer (nor under a ``skip`` prefix) from the
    shards onto ``device``; a tied head is re-tied to its embeddings."""
    layers = anatomy.layers + "."
    wanted = [k for k, t in model.state_dict(keep_vars=True).items()
              if not k.startswith(layers) and not any(k == s or k.startswith(s + ".") for s in skip)
              and t.device.type == "meta"]
    tied = set(_tied_keys(model))
    missing = [k for k in wanted if k not in checkpoint.to_stored and k not in tied]
    if missing:
        raise ModelLoadError(f"{checkpoint.folder}: the shards hold no tensor for {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for k in wanted:
        if k in checkpoint.to_stored:
            value = checkpoint.read([k], dtype)[k]
            _set(model, k, value.to(device) if device != "cpu" else value)
    if tied:
        model.tie_weights()


def _tied_keys(model: nn.Module) -> list[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False) and not getattr(
            model.config, "tie_word_embeddings", False):
        return []
    return list(tied) if isinstance(tied, (dict, list, tuple)) else []


def layer_keys(model: nn.Module, anatomy: Anatomy, i: int) -> list[str]:
    """Module names of decoder layer ``i``'s parameters and persistent buffers."""
    prefix = f"{anatomy.layers}.{i}."
    return [prefix + k for k in anatomy.decoder_layers(model)[i].state_dict().keys()]


@contextlib.contextmanager
def onloaded(model: nn.Module, anatomy: Anatomy, checkpoint: Checkpoint, i: int, dtype: torch.dtype,
             device: str = "cpu") -> Iterator[nn.Module]:
    """Decoder layer ``i`` with its weights read from the shards; back on ``meta`` afterwards."""
    layer = anatomy.decoder_layers(model)[i]
    prefix = f"{anatomy.layers}.{i}."
    keys = layer_keys(model, anatomy, i)
    tensors = checkpoint.read(keys, dtype)
    for k, t in tensors.items():
        _set(layer, k[len(prefix):], t.to(device) if device != "cpu" else t)
    del tensors
    try:
        yield layer
    finally:
        for k in keys:
            _set(layer, k[len(prefix):], "meta")
        return_freed_memory()
