"""Convert the paper's original-format checkpoints into llava-hf folders (``LlavaForConditionalGeneration``).

    python -m compression convert path/to/llava-v1.5-7b --to llava-v1.5-7b-hf --vision-tower path/to/clip-vit-large-patch14-336
    python -m compression convert path/to/Bunny-v1_0-3B --to bunny-v1.0-3b-hf

Two source formats, each a :class:`SourceFormat` below:

- **LLaVA** as the haotian-liu/LLaVA repository saves it (``LlavaLlamaForCausalLM``): a Llama under ``model.*``
  and ``lm_head``, the projector under ``model.mm_projector.0/.2``, the CLIP tower under
  ``model.vision_tower.vision_tower.vision_model.*`` when it was saved at all (LLaVA-1.5 names
  ``openai/clip-vit-large-patch14-336`` in ``mm_vision_tower`` and loads it from the hub instead);
- **Bunny** (BAAI-DCAI/Bunny, ``bunny-phi``): Phi under ``model.*``, SigLIP under the same vision prefix, the same
  projector. Bunny feeds the projector the SigLIP output before its last layer (``hidden_states[-2]``; the first
  release deleted that layer and took ``[-1]``), so the last layer is dropped here and ``vision_feature_layer`` is -1.

The key mapping, the added ``<image>`` and ``<pad>`` tokens and the new embedding rows follow transformers'
``models/llava/convert_llava_weights_to_hf.py``: the rows for the new tokens (and, when the matrix must grow, the
padding up to a multiple of 64) are drawn from a normal with the old rows' mean and 1e-5 times their covariance.
Keys are written with the names ``LlavaForConditionalGeneration`` has in transformers 5
(``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.linear_1/2``, ``lm_head``).

Nothing is held twice: tensors are read lazily from the source shards (safetensors, or mmap-ed ``.bin``; opened and
checked by ``compression.models.checkpoint``, the loader's own header checks) and written
shard by shard into a temporary folder that is renamed to the destination only when complete. Every refusal is a
:class:`ConversionError` with one line naming the value and what was expected.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compression.models.checkpoint import WeightFiles, read_json

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
ROW_MULTIPLE = 64           # the public script pads the resized embeddings to a multiple of 64
NEW_ROW_COVARIANCE = 1e-5   # ... and samples the new rows from N(mean, 1e-5 * covariance) of the old rows
MAX_SHARD_BYTES = 2 * 1024 ** 3
VISION_PREFIX = "model.vision_tower.vision_tower."   # LLaVA's and Bunny's wrapper module around the HF tower
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"

# llava-hf/llava-1.5-7b-hf's chat template ("USER: <image>\n... ASSISTANT:"), comments left out.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

# Bunny's ``conv_bunny`` (bunny/conversation.py, SeparatorStyle.TWO): "SYSTEM USER: <image>\nq ASSISTANT: a<eos>".
BUNNY_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
BUNNY_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set first = 1 %}{% if messages[0]['content'] is string %}"
    "{{ messages[0]['content'] }}{% else %}{% for c in messages[0]['content'] %}{{ c['text'] }}{% endfor %}{% endif %}"
    "{% else %}{% set first = 0 %}{{ \"" + BUNNY_SYSTEM + "\" }}{% endif %}{{ ' ' }}"
    "{% for message in messages[first:] %}{% set parts = message['content'] if message['content'] is not string "
    "else [{'type': 'text', 'text': message['content']}] %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% for c in parts | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for c in parts | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}"
    "{% endfor %}{{ ' ' }}{% else %}{{ 'ASSISTANT: ' }}{% generation %}"
    "{% for c in parts | selectattr('type', 'equalto', 'text') %}{{ c['text'] }}{% endfor %}{{ '@EOS@' }}"
    "{% endgeneration %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

# Public configs of the towers the paper's checkpoints name, for when the checkpoint holds the tower's weights but
# neither --vision-tower nor the local hub cache has its config.json.
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(
        model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=768),
    "google/siglip-so400m-patch14-384": dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
IMAGE_STATS = {"clip_vision_model": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
               "siglip_vision_model": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])}
# Keys of a full CLIP / SigLIP checkpoint (text side, pooling head) that the vision tower does not keep.
_NOT_TOWER = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias", "head.")


class ConversionError(ValueError):
    """The source cannot be converted; the message is one line naming the value and what was expected."""


@dataclass(frozen=True)
class SourceFormat:
    """One original checkpoint layout and how it maps onto ``LlavaForConditionalGeneration``."""

    name: str
    title: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    text_model_type: str                 # the transformers config class of the language model
    vision_model_type: str               # the tower it was trained with
    vision_feature_layer: int | None     # fixed by the source code, or None: the config's mm_vision_select_layer
    drop_unused_vision_layers: bool      # write the tower only up to the layer whose output is used
    chat_template: str
    code: str                            # the public code the layout was read from


LLAVA = SourceFormat(
    name="llava", title="LLaVA (haotian-liu/LLaVA)", architectures=("LlavaLlamaForCausalLM",),
    model_types=("llava", "llava_llama"), text_model_type="llama", vision_model_type="clip_vision_model",
    vision_feature_layer=None, drop_unused_vision_layers=False, chat_template=LLAVA_HF_CHAT_TEMPLATE,
    code="haotian-liu/LLaVA llava/model/llava_arch.py; transformers models/llava/convert_llava_weights_to_hf.py")
BUNNY = SourceFormat(
    name="bunny-phi", title="Bunny (BAAI-DCAI/Bunny, bunny-phi)", architectures=("BunnyPhiForCausalLM",),
    model_types=("bunny-phi",), text_model_type="phi", vision_model_type="siglip_vision_model",
    vision_feature_layer=-2, drop_unused_vision_layers=True, chat_template=BUNNY_CHAT_TEMPLATE,
    code="BAAI-DCAI/Bunny bunny/model/bunny_arch.py, multimodal_encoder/siglip/siglip_encoder.py")
FORMATS = (LLAVA, BUNNY)


@dataclass
class ConversionReport:
    """What ``convert`` wrote (also saved as ``conversion.json`` in the folder)."""

    path: str
    source: str
    format: str
    language_model: str
    vision_tower: str
    vision_tower_from: str
    image_token_index: int
    pad_token_id: int
    vocab_rows_before: int
    vocab_rows_after: int
    initialised_rows: list[int]          # [start, stop): the rows drawn from the old rows' distribution
    vision_feature_layer: int
    vision_feature_select_strategy: str
    dtype: str
    shards: int
    follows: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- reading weights

def _weights(folder: Path, what: str) -> WeightFiles:
    """The source's weights, read through the loader's own header checks (``compression.models.checkpoint``)."""
    return WeightFiles(folder, what, error=ConversionError)


@dataclass
class _Planned:
    """One output tensor: where it comes from and its shape in the converted model."""

    target: str
    weights: WeightFiles
    key: str
    shape: tuple[int, ...]
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


# --------------------------------------------------------------------------------------------- the source

def _read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json(path, what, error=ConversionError)


def detect_format(raw: dict[str, Any], where: str = "config.json") -> SourceFormat:
    """The source format a checkpoint's ``config.json`` describes; refuses anything else in one line."""
    model_type, architectures = raw.get("model_type"), tuple(raw.get("architectures") or ())
    if "text_config" in raw and model_type == "llava":
        raise ConversionError(f"{where} is already a llava-hf config (LlavaForConditionalGeneration); load the folder "
                              "directly instead of converting it")
    for fmt in FORMATS:
        if set(architectures) & set(fmt.architectures) or (model_type in fmt.model_types and "mm_vision_tower" in raw):
            return fmt
    expected = "; ".join(f"{f.title}: architectures {f.architectures[0]}, model_type {f.model_types[0]!r}"
                         for f in FORMATS)
    raise ConversionError(f"{where} (model_type {model_type!r}, architectures {list(architectures)}) is not an "
                          f"original-format checkpoint this converter knows; expected {expected}")


def _check_multimodal_fields(fmt: SourceFormat, raw: dict[str, Any], where: str) -> None:
    """Refuse the variants ``LlavaForConditionalGeneration`` cannot represent, naming the field."""
    # LLaVA's projector builder defaults to 'linear' when the field is absent, Bunny's to 'mlp2x_gelu'.
    projector = raw.get("mm_projector_type", "linear" if fmt is LLAVA else "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConversionError(f"{where}: mm_projector_type {projector!r} cannot be converted; expected 'mlp2x_gelu' "
                              "(llava-hf's projector is linear_1 -> GELU -> linear_2)")
    if raw.get("mm_use_im_start_end"):
        raise ConversionError(f"{where}: mm_use_im_start_end is true (<im_start>/<im_end> around the image); "
                              "expected false, as in LLaVA-1.5: llava-hf has no such tokens")
    merge = raw.get("mm_patch_merge_type", "flat")
    aspect = str(raw.get("image_aspect_ratio") or "square")
    if merge != "flat" or aspect.startswith("anyres"):
        raise ConversionError(f"{where}: mm_patch_merge_type {merge!r} / image_aspect_ratio {aspect!r} is LLaVA-NeXT's "
                              "any-resolution layout; expected 'flat' and 'pad' (LLaVA-1.5, Bunny-v1.0)")
    if raw.get("use_s2"):
        raise ConversionError(f"{where}: use_s2 is true (multi-scale S2 features); expected false")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise ConversionError(f"{where}: mm_vision_select_feature {feature!r}; expected 'patch' or 'cls_patch'")
    if fmt.vision_feature_layer is None and not isinstance(raw.get("mm_vision_select_layer"), int):
        raise ConversionError(f"{where}: mm_vision_select_layer is {raw.get('mm_vision_select_layer')!r}; expected "
                              "the vision layer whose output feeds the projector (LLaVA-1.5: -2)")


def _text_config(fmt: SourceFormat, raw: dict[str, Any]):
    """The language model's config from the flat original config: only the fields its class knows."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[fmt.text_model_type]
    known = set(cls().to_dict()) | {"rope_theta", "rope_scaling", "partial_rotary_factor", "pretraining_tp"}
    drop = {"architectures", "model_type", "auto_map", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
    return cls(**{k: v for k, v in raw.items() if k in known and k not in drop})


# --------------------------------------------------------------------------------------------- the vision tower

def _tower_key(key: str) -> str | None:
    """A vision tower key relative to the tower (``embeddings.…``, ``encoder.layers.…``), None when not kept."""
    key = key[len("vision_model."):] if key.startswith("vision_model.") else key
    return None if key.startswith(_NOT_TOWER) else key


def _local_snapshot(name: str | None) -> Path | None:
    """The folder ``mm_vision_tower`` names: a local path, or the hub id's snapshot in the local cache (offline)."""
    if not name:
        return None
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if name.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache, whatever the reason
        return None


@dataclass
class _Vision:
    config: Any
    weights: WeightFiles
    keys: dict[str, str]           # key relative to the tower -> key in ``weights``
    image_mean: list[float]
    image_std: list[float]
    came_from: str


def _vision_tower(fmt: SourceFormat, raw: dict[str, Any], src: Path, weights: WeightFiles,
                  vision_tower: str | Path | None) -> _Vision:
    from transformers import AutoConfig, CLIPVisionConfig, SiglipVisionConfig

    name = raw.get("mm_vision_tower")
    in_checkpoint = {k: key for key in weights.keys() if key.startswith(VISION_PREFIX)
                     and (k := _tower_key(key[len(VISION_PREFIX):])) is not None}
    if vision_tower is not None:
        folder = Path(vision_tower).expanduser()
        if not (folder / "config.json").is_file():
            raise ConversionError(f"--vision-tower {vision_tower} is not a folder with config.json; expected a local "
                                  f"copy of the vision tower ({name or 'its hub id'})")
    else:
        folder = _local_snapshot(name)
    if folder is None and not in_checkpoint:
        raise ConversionError(f"{src} holds no vision tower weights ({VISION_PREFIX}*) and its mm_vision_tower "
                              f"{name!r} is not in the local Hugging Face cache; pass --vision-tower DIR, a local "
                              "folder of that model")
    if folder is not None:
        try:
            loaded = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"{folder}/config.json cannot be read ({str(e).splitlines()[0]}); expected a CLIP "
                                  "or SigLIP config") from None
        config, came_from = getattr(loaded, "vision_config", loaded), str(folder)
    elif name in KNOWN_VISION_TOWERS:
        facts = dict(KNOWN_VISION_TOWERS[name])
        kind = facts.pop("model_type")
        config = (CLIPVisionConfig if kind == "clip_vision_model" else SiglipVisionConfig)(**facts)
        came_from = f"{src} (config: the public {name} config)"
    else:
        raise ConversionError(f"{src} holds the vision tower's weights but its config is unknown (mm_vision_tower "
                              f"{name!r}); pass --vision-tower DIR, a local folder with that tower's config.json")
    if config.model_type != fmt.vision_model_type:
        raise ConversionError(f"vision tower {came_from} is {config.model_type!r}; {fmt.title} checkpoints use "
                              f"{fmt.vision_model_type!r}")
    if in_checkpoint:
        tower_weights, keys = weights, in_checkpoint
        if folder is not None:
            came_from = f"{src} (config: {folder})"
    else:
        tower_weights = _weights(folder, "vision tower")
        if not tower_weights.keys():
            raise ConversionError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin) and {src} holds no "
                                  "vision tower; expected the tower's weights in one of them")
        keys = {k: key for key in tower_weights.keys() if (k := _tower_key(key)) is not None}
    mean, std = IMAGE_STATS[config.model_type]
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        pre = _read_json(folder / "preprocessor_config.json", "an image processor config")
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    return _Vision(config, tower_weights, keys, list(mean), list(std), came_from)


def _layers_in(keys, prefix: str = "encoder.layers.") -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _vision_layout(fmt: SourceFormat, raw: dict[str, Any], vision: _Vision) -> tuple[int, int]:
    """``(layers to write, vision_feature_layer)``; drops the tensors of the layers past the one used."""
    configured = vision.config.num_hidden_layers
    feature = fmt.vision_feature_layer if fmt.vision_feature_layer is not None else raw["mm_vision_select_layer"]
    stored = _layers_in(vision.keys)
    if not fmt.drop_unused_vision_layers:
        if stored != configured:
            raise ConversionError(f"the vision tower's weights ({vision.came_from}) hold {stored} layers but its config "
                                  f"says num_hidden_layers {configured}; expected them to agree")
        return configured, feature
    used = configured + 1 + feature if feature < 0 else feature  # hidden_states[0] is the embeddings
    if stored not in (configured, used):
        raise ConversionError(f"the vision tower's weights ({vision.came_from}) hold {stored} layers; its config says "
                              f"{configured}, of which {fmt.title} uses {used}: expected {configured} or {used}")
    for k in [k for k in vision.keys if (m := re.match(r"encoder\.layers\.(\d+)\.", k)) and int(m.group(1)) >= used]:
        del vision.keys[k]
    return used, -1


# --------------------------------------------------------------------------------------------- tokens and rows

def _add_tokens(tokenizer) -> tuple[int, int, int]:
    """Add ``<image>`` and a dedicated ``<pad>`` as the public script does; ``(image id, pad id, size before)``."""
    from tokenizers import AddedToken

    before = len(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    pad = tokenizer.pad_token
    # LLaVA trains with pad = unk; Phi-2 has none: both get their own <pad>, as llava-hf's folders do.
    if pad is None or pad in {tokenizer.unk_token, tokenizer.eos_token, tokenizer.bos_token}:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id, before


class _NewRows:
    """The new embedding / lm_head rows: N(mean, 1e-5 * covariance) of the old embedding rows, seeded."""

    def __init__(self, weights: WeightFiles, embed_key: str, rows: int, initialise: tuple[int, int], seed: int = 0):
        self.weights, self.embed_key, self.rows, self.initialise, self.seed = weights, embed_key, rows, initialise, seed
        self._tril: tuple[torch.Tensor, torch.Tensor] | None = None

    def _distribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tril is None:
            old = self.weights.get(self.embed_key).float()
            mean = old.mean(0)
            centred = old - mean
            covariance = NEW_ROW_COVARIANCE * (centred.T @ centred) / old.shape[0]
            # a covariance from fewer rows than dimensions is singular: a jitter far below its scale makes it PD
            jitter = 1e-6 * covariance.diagonal().mean().clamp_min(1e-12)
            eye = torch.eye(covariance.shape[0])
            tril, info = torch.linalg.cholesky_ex(covariance + jitter * eye)
            if info:
                tril = torch.diag((covariance.diagonal() + jitter).sqrt())
            self._tril = (mean, tril)
        return self._tril

    def __call__(self, tensor: torch.Tensor, salt: int = 0) -> torch.Tensor:
        start, stop = self.initialise
        if stop <= start:
            return tensor
        mean, tril = self._distribution()
        out = torch.empty((self.rows, tensor.shape[1]), dtype=tensor.dtype)
        keep = min(tensor.shape[0], self.rows)
        out[:keep] = tensor[:keep]
        generator = torch.Generator().manual_seed(self.seed + salt)
        noise = torch.randn((stop - start, mean.shape[0]), generator=generator)
        out[start:stop] = (mean + noise @ tril.T).to(tensor.dtype)
        return out


# --------------------------------------------------------------------------------------------- the plan

def _language_target(key: str) -> str | None:
    """Original language-model / projector key -> llava-hf (transformers 5) key; None for keys with no place."""
    if key.endswith(".rotary_emb.inv_freq"):  # buffers old checkpoints saved; recomputed by the model
        return None
    for old, new in (("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
                     ("model.mm_projector.2.", "model.multi_modal_projector.linear_2.")):
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("lm_head."):
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key  # unknown: reported as unexpected by the shape check


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor ``LlavaForConditionalGeneration(config)`` holds, by its transformers name (built on meta)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_against_model(expected: dict[str, tuple[int, ...]], planned: list[_Planned], src: Path) -> None:
    """Every tensor the config implies is planned with the shape it implies, and nothing else."""
    by_target = {p.target: p for p in planned}
    for p in planned:
        if p.target not in expected:
            raise ConversionError(f"{p.key} ({p.weights.origin(p.key)}) has no place in LlavaForConditionalGeneration "
                                  f"(would be {p.target}); expected only the language model, projector and tower")
        if expected[p.target] != p.shape:
            raise ConversionError(f"{p.key} is {list(p.shape)} in {p.weights.origin(p.key)} but the config implies "
                                  f"{list(expected[p.target])} for {p.target}; the config disagrees with the weights")
    missing = [k for k in expected if k not in by_target]
    if missing:
        raise ConversionError(f"{src} lacks {len(missing)} weight(s) the config implies, e.g. {missing[0]}; expected a "
                              "complete checkpoint (a LoRA or projector-only one must be merged with its base first)")


# --------------------------------------------------------------------------------------------- writing

def _write_shards(planned: list[_Planned], folder: Path, dtype: torch.dtype, max_shard_bytes: int) -> int:
    """Write the planned tensors shard by shard (one shard in memory at a time); returns the shard count."""
    from safetensors.torch import save_file

    from compression.models.shards import plan_shards, shard_file_names

    size = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards([(p, math.prod(p.shape) * size) for p in planned], max_shard_bytes) or [[]]
    names = shard_file_names(len(shards))
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {}
        for p in shard:
            tensor = p.weights.get(p.key)
            if p.transform is not None:
                tensor = p.transform(tensor)
            tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
            tensors[p.target] = tensor.contiguous()
            weight_map[p.target] = name
            total += tensor.numel() * tensor.element_size()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return len(shards)


def _image_processor(vision: _Vision, pad: bool):
    """LLaVA-1.5 and Bunny pad the image to a square of the mean colour, then the tower's own resize."""
    from transformers import LlavaImageProcessor, SiglipImageProcessor

    size = vision.config.image_size
    if vision.config.model_type == "siglip_vision_model" and not pad:
        return SiglipImageProcessor(size={"height": size, "width": size}, image_mean=vision.image_mean,
                                    image_std=vision.image_std, resample=3)
    return LlavaImageProcessor(do_pad=pad, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                               image_mean=vision.image_mean, image_std=vision.image_std, resample=3)


def _dtype(name: str, default: torch.dtype) -> torch.dtype:
    if name == "auto":
        return default
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in choices:
        raise ConversionError(f"dtype {name!r} is not one of auto, {', '.join(choices)}")
    return choices[name]


def _open_source(src: Path) -> tuple[dict[str, Any], SourceFormat, WeightFiles]:
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} has no config.json; expected an original LLaVA or Bunny checkpoint folder")
    raw = _read_json(src / "config.json", "the checkpoint's config")
    fmt = detect_format(raw, str(src / "config.json"))
    _check_multimodal_fields(fmt, raw, str(src / "config.json"))
    weights = _weights(src, fmt.title)
    if not weights.keys():
        raise ConversionError(f"{src} has no weights (*.safetensors or pytorch_model*.bin); expected the checkpoint's")
    if (src / "adapter_config.json").is_file() and not any(k.startswith("model.layers.") for k in weights.keys()):
        raise ConversionError(f"{src} is a LoRA adapter; merge it into its base model first, then convert")
    if EMBED not in weights.keys():
        raise ConversionError(f"{src} has no {EMBED}; expected the language model's weights")
    return raw, fmt, weights


def _tokenizer(src: Path, text_config):
    """The checkpoint's own tokenizer (the text config tells AutoTokenizer its family: the source's model_type is
    unknown to transformers)."""
    from transformers import AutoTokenizer

    if not any((src / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise ConversionError(f"{src} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json); expected the "
                              "tokenizer the checkpoint was trained with beside config.json")
    if (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").is_file() \
            and importlib.util.find_spec("sentencepiece") is None:
        # transformers 5 reads a bare SentencePiece model only through the sentencepiece package
        raise ConversionError(f"{src}/tokenizer.model needs the sentencepiece package to be read (pip install "
                              "sentencepiece), or a tokenizer.json beside it")
    try:
        return AutoTokenizer.from_pretrained(src, config=text_config)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here; all mean "unreadable tokenizer"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"the tokenizer in {src} cannot be read: {first}") from None


@dataclass
class _Vocabulary:
    image_token_index: int
    pad_token_id: int
    rows_before: int
    rows_after: int
    initialise: tuple[int, int]


def _vocabulary(tokenizer, weights: WeightFiles, text_config, where: str) -> _Vocabulary:
    """Add the tokens; the embedding matrix grows (to a multiple of 64) only when the tokenizer outgrows it."""
    rows_before = weights.shape(EMBED)[0]
    if text_config.vocab_size != rows_before:
        raise ConversionError(f"{where} says vocab_size {text_config.vocab_size} but {EMBED} has {rows_before} rows; "
                              "the config disagrees with the weights")
    image_id, pad_id, tokens_before = _add_tokens(tokenizer)
    size = len(tokenizer)
    rows_after = rows_before if size <= rows_before else math.ceil(size / ROW_MULTIPLE) * ROW_MULTIPLE
    initialise = (tokens_before, rows_after if rows_after > rows_before else size)
    return _Vocabulary(image_id, pad_id, rows_before, rows_after, initialise)


def _llava_config(fmt: SourceFormat, raw: dict[str, Any], text, vision: _Vision, vocabulary: _Vocabulary,
                  dtype: torch.dtype):
    """The ``LlavaConfig`` of the converted model (``vision.keys`` is cut to the layers it keeps)."""
    from transformers import LlavaConfig

    layers, feature_layer = _vision_layout(fmt, raw, vision)
    vision_config = copy.deepcopy(vision.config)
    vision_config.num_hidden_layers = layers
    if vision_config.model_type == "siglip_vision_model":
        vision_config.vision_use_head = False  # the pooling head is never used by a LLaVA
    if raw.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ConversionError(f"config.json says mm_hidden_size {raw['mm_hidden_size']} but the vision tower "
                              f"({vision.came_from}) has hidden_size {vision_config.hidden_size}; expected them to agree")
    is_clip = vision_config.model_type == "clip_vision_model"
    strategy = "full" if not is_clip or raw.get("mm_vision_select_feature") == "cls_patch" else "default"
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    text.vocab_size, text.pad_token_id, text.tie_word_embeddings = vocabulary.rows_after, vocabulary.pad_token_id, False
    config = LlavaConfig(text_config=text, vision_config=vision_config, image_token_index=vocabulary.image_token_index,
                         image_seq_length=patches + int(is_clip) - int(strategy == "default"),
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                         projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
                         pad_token_id=vocabulary.pad_token_id)
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    return config


def _plan(weights: WeightFiles, vision: _Vision, vocabulary: _Vocabulary, expected: dict[str, tuple[int, ...]],
          seed: int) -> list[_Planned]:
    new_rows = _NewRows(weights, EMBED, vocabulary.rows_after, vocabulary.initialise, seed)
    planned: list[_Planned] = []
    for key in weights.keys():
        target = None if key.startswith(VISION_PREFIX) else _language_target(key)
        if target is None:
            continue
        shape, transform = weights.shape(key), None
        if key in (EMBED, HEAD):
            shape = (vocabulary.rows_after,) + shape[1:]
            transform = functools.partial(new_rows, salt=int(key == HEAD))  # one sample stream per matrix
        planned.append(_Planned(target, weights, key, shape, transform))
    if HEAD not in weights.keys():  # a tied checkpoint: the head starts as the embeddings (the script clones them)
        planned.append(_Planned(HEAD, weights, EMBED, (vocabulary.rows_after,) + weights.shape(EMBED)[1:],
                                functools.partial(new_rows, salt=1)))
    # the tower's own names under model.vision_tower (transformers 5.23 has no ``vision_model.`` level in memory)
    prefix = "model.vision_tower.vision_model." if any(k.startswith("model.vision_tower.vision_model.")
                                                      for k in expected) else "model.vision_tower."
    for rel, key in vision.keys.items():
        planned.append(_Planned(prefix + rel, vision.weights, key, vision.weights.shape(key)))
    return planned


def _processor(fmt: SourceFormat, raw: dict[str, Any], tokenizer, vision: _Vision, config):
    from transformers import LlavaProcessor

    template = fmt.chat_template.replace("@EOS@", (tokenizer.eos_token or "").replace("'", "\\'"))
    pad_images = str(raw.get("image_aspect_ratio") or "") == "pad"
    return LlavaProcessor(image_processor=_image_processor(vision, pad_images), tokenizer=tokenizer,
                          patch_size=config.vision_config.patch_size,
                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                          num_additional_image_tokens=int(config.vision_config.model_type == "clip_vision_model"),
                          chat_template=template, image_token=IMAGE_TOKEN)


def _publish(tmp: Path, to: Path) -> None:
    """Make the finished folder visible in one rename (an old destination, with --overwrite, goes after)."""
    if to.exists():
        old = to.parent / f".{to.name}.replaced-{os.getpid()}"
        os.replace(to, old)
        os.replace(tmp, to)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, to)


def convert(src: str | Path, to: str | Path, vision_tower: str | Path | None = None, dtype: str = "auto",
            overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES, seed: int = 0) -> ConversionReport:
    """Convert an original LLaVA or Bunny checkpoint folder ``src`` into a llava-hf folder ``to``.

    ``vision_tower``: a local folder of the CLIP / SigLIP model the checkpoint names in ``mm_vision_tower``; needed
    when the checkpoint holds no tower weights and the hub cache has no copy (its config is read even when the
    checkpoint holds the weights, which then win). ``dtype``: ``auto`` keeps the language model's. Everything is
    checked (formats, fields, tokenizer, tower, every tensor's shape) before anything is written.
    """
    from transformers import GenerationConfig

    src, to = Path(src).expanduser(), Path(to).expanduser()
    if to.exists() and not overwrite and (not to.is_dir() or any(to.iterdir())):
        raise ConversionError(f"destination {to} already exists; expected a new folder (or --overwrite)")
    raw, fmt, weights = _open_source(src)
    text = _text_config(fmt, raw)
    tokenizer = _tokenizer(src, text)
    vocabulary = _vocabulary(tokenizer, weights, text, str(src / "config.json"))
    vision = _vision_tower(fmt, raw, src, weights, vision_tower)
    out_dtype = _dtype(dtype, weights.dtype(EMBED))
    config = _llava_config(fmt, raw, text, vision, vocabulary, out_dtype)
    expected = _expected_shapes(config)
    planned = _plan(weights, vision, vocabulary, expected, seed)
    _check_against_model(expected, planned, src)
    from compression.models import anatomy_from_config

    anatomy_from_config(config)  # the studio's loader accepts what is written
    processor = _processor(fmt, raw, tokenizer, vision, config)
    generation = (GenerationConfig.from_pretrained(src) if (src / "generation_config.json").is_file() else
                  GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id))
    generation.pad_token_id = vocabulary.pad_token_id
    report = ConversionReport(
        path=str(to), source=str(src), format=fmt.name, language_model=fmt.text_model_type,
        vision_tower=config.vision_config.model_type, vision_tower_from=vision.came_from,
        image_token_index=vocabulary.image_token_index, pad_token_id=vocabulary.pad_token_id,
        vocab_rows_before=vocabulary.rows_before, vocab_rows_after=vocabulary.rows_after,
        initialised_rows=list(vocabulary.initialise), vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        dtype=str(out_dtype).removeprefix("torch."), shards=0, follows=fmt.code)
    kept, configured = config.vision_config.num_hidden_layers, vision.config.num_hidden_layers
    if kept < configured:
        report.notes.append(f"vision tower cut to its first {kept} of {configured} layers (the source feeds the "
                            f"projector hidden_states[{fmt.vision_feature_layer}])")

    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.parent / f".{to.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        report.shards = _write_shards(planned, tmp, out_dtype, max_shard_bytes)
        config.save_pretrained(tmp)
        generation.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps(report.to_dict(), indent=1))
        _publish(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
