"""The weight files of a model folder, checked by their headers before anything is read.

One place for what the loader (``compression.models.loader``) and the converter (``compression.models.convert``)
both need to know about a folder's weights: which files hold them (the shard index's, every shard it names
present), that each file is whole (a safetensors header parses and covers the file: ``safe_open`` reads the
header only), which tensors they hold with which shapes, and whether those agree with the model a config
describes (built on the ``meta`` device: no memory). Transformers would otherwise re-initialise a missing or
mis-shaped weight at random and go on (its ``from_pretrained`` "LOAD REPORT"); here either is refused in one
line naming the file and what was expected.

Formats follow safetensors (huggingface/safetensors: 8-byte little-endian header length, JSON header of
``dtype`` / ``shape`` / ``data_offsets``) and transformers' sharded checkpoints (``*.index.json``'s
``weight_map``: tensor name -> shard file).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.models.anatomy import ModelLoadError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# safetensors' own words for a file that is shorter than its header says, and for a header that is garbage
_HINTS = (("not fully covered", "the file is shorter than its header says: truncated"),
          ("invalid JSON in header", "its header is not safetensors JSON: corrupt"),
          ("header too large", "its header length is implausible: corrupt or not a safetensors file"),
          ("header too small", "it is too short to hold a safetensors header: truncated or empty"))


def read_json(path: Path, what: str, error: type[Exception] = ModelLoadError) -> dict[str, Any]:
    """A JSON object from ``path``, or ``error`` in one line naming the file and ``what`` it should be."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} cannot be read as JSON ({e}); expected {what}") from None
    if not isinstance(raw, dict):
        raise error(f"{path} is not a JSON object; expected {what}")
    return raw


def shard_index(folder: Path, error: type[Exception] = ModelLoadError) -> list[Path] | None:
    """The shards a folder's index names (every one present), or None when the folder has no index."""
    for index in INDEX_FILES:
        if (folder / index).is_file():
            weight_map = read_json(folder / index, "a shard index ({\"weight_map\": {tensor: shard file}})",
                                   error).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise error(f"{folder / index} has no weight_map; expected a shard index naming each tensor's file")
            named = sorted(set(weight_map.values()))
            missing = [n for n in named if not (folder / n).is_file()]
            if missing:
                raise error(f"{folder / index} names shard {missing[0]}, which is not in {folder}; expected "
                            f"all {len(named)} shards it lists")
            return [folder / n for n in named]
    return None


def weight_file_names(folder: Path, error: type[Exception] = ModelLoadError) -> list[Path]:
    """The files holding a folder's weights: the index's shards, else every safetensors (else ``.bin``) file."""
    indexed = shard_index(folder, error)
    if indexed is not None:
        return indexed
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


class WeightFiles:
    """Lazy access to the tensors of a folder's safetensors or ``.bin`` shards; opening reads headers only.

    Every file is opened (and so checked) when the object is made; a file that cannot be read raises ``error``
    naming it. ``what`` says whose weights they should be, for that message.
    """

    def __init__(self, folder: Path, what: str, error: type[Exception] = ModelLoadError):
        self.folder, self.what, self.error = Path(folder), what, error
        self.files = weight_file_names(self.folder, error)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        for f in self.files:
            for key in self._handle(f).keys():
                self._where[key] = f

    def _handle(self, f: Path):
        if f not in self._open:
            try:
                if f.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._open[f] = safe_open(str(f), framework="pt", device="cpu")
                else:
                    try:  # zip-format checkpoints are mapped, not read
                        self._open[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                    except RuntimeError:
                        self._open[f] = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable shard means the same to the user
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                hint = next((h for words, h in _HINTS if words in first), None)
                raise self.error(f"{f} cannot be read ({first}{'; ' + hint if hint else ''}); expected complete "
                                 f"{self.what} weights") from None
        return self._open[f]

    def keys(self) -> list[str]:
        return list(self._where)

    def origin(self, key: str) -> str:
        return str(self._where[key])

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self._where[key])
        if isinstance(handle, dict):
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        handle = self._handle(self._where[key])
        if isinstance(handle, dict):
            return handle[key].dtype
        return _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype(), torch.float32)

    def get(self, key: str) -> torch.Tensor:
        handle = self._handle(self._where[key])
        return handle[key] if isinstance(handle, dict) else handle.get_tensor(key)


def _aliases(model: nn.Module) -> dict[str, set[str]]:
    """State-dict name -> every name of the same tensor (tied weights are stored once, under any of them)."""
    by_tensor: dict[int, set[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), set()).add(name)
    aliases = {name: by_tensor[id(tensor)] for name, tensor in named}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        group = aliases.get(target, {target}) | aliases.get(source, {source})
        for name in group:
            aliases[name] = group
    return aliases


def _model_names(model: nn.Module, stored: list[str], expected: dict[str, Any]) -> dict[str, str] | None:
    """Stored name -> the model's name for it, renamed as ``from_pretrained`` renames (transformers 5 saves LLaVA
    as ``language_model.model.*`` and loads it as ``model.language_model.*``); None when a key is not simply renamed
    (a converter fuses or splits tensors, so the stored shapes are not the model's) or has no place in the model."""
    try:  # transformers' own renaming tables (``conversion_mapping``); internal, so any change means "not checked"
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        prefix = getattr(model, "base_model_prefix", None) or None
        names = {}
        for key in stored:
            if key in expected:
                names[key] = key
                continue
            renamed, converter = rename_source_key(key, renamings, converters, prefix, expected)
            if converter is not None or renamed not in expected:
                return None
            names[key] = renamed
        return names
    except Exception:  # noqa: BLE001 - see above; transformers' loading report is the check then
        return None


def check_against_model(weights: WeightFiles, model: nn.Module, config_path: Path) -> bool:
    """Refuse, from the headers alone, weights whose shapes disagree with ``model`` or that lack one it needs.

    ``model`` is the one the config describes, on the ``meta`` device. The check applies when every stored
    name is one of the model's, directly or renamed as transformers renames while loading; it returns False,
    checking nothing, for a folder in a naming that is not a plain renaming (fused or split tensors, quantized
    ``absmax`` companions, a layer the config does not describe): ``loader`` then refuses from transformers'
    loading report. Keys the model declares it may lack (``_keys_to_ignore_on_load_missing``) and tied copies
    of a stored tensor are not required.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = weights.keys()
    names = _model_names(model, stored, expected) if stored else None
    if names is None:
        return False
    for key, name in names.items():
        if weights.shape(key) != expected[name]:
            raise weights.error(f"{key} is {list(weights.shape(key))} in {weights.origin(key)} but {config_path} "
                                f"implies {list(expected[name])}; the config disagrees with the weights")
    aliases, have = _aliases(model), set(names.values())
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or ())]
    missing = [k for k in expected if not (aliases.get(k, {k}) & have) and not any(p.search(k) for p in ignore)]
    if missing:
        raise weights.error(f"{weights.folder} lacks {len(missing)} weight(s) {config_path} implies, e.g. "
                            f"{missing[0]}; expected every weight of the model (transformers would initialise "
                            "them at random)")
    return True
