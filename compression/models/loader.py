"""One loader for every model source, and the model's *anatomy*.

Sources (``load(source)``):

- ``reference``: the shipped ShapesVQA LLaVA (``compression/assets/reference``);
- a local Hugging Face folder (``config.json`` + safetensors + processor files);
- a hub id (``org/name``): read from the local Hugging Face cache; this machine has no hub;
- a ``config.json`` alone, or a shipped config name (``config:llava-1.5-7b``, ``config:bunny-v1.0-3b``):
  the model is built on the ``meta`` device, no weights, for what-if estimates only.

The anatomy says where things are — vision tower, projector, decoder layers, attention
q/k/v/o and MLP projections — and the sizes pruning needs (heads, KV heads, ``head_dim``,
per-layer widths, visual tokens per image). It follows transformers' own field names.

Supported: ``LlavaForConditionalGeneration`` with a Llama, Mistral, Qwen2, Phi or Gemma
language model and a CLIP or SigLIP vision tower.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from compression.paths import cache_dir
from compression.models.catalog import REFERENCE_PATH, shipped_configs

SUPPORTED_LANGUAGE = ("llama", "mistral", "qwen2", "phi", "gemma")
SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model")
SourceKind = Literal["reference", "local", "hub", "config"]

# Projection names per language backbone: attention q/k/v/o, MLP (gate, up, down); gate None = ungated.
_ATTENTION = {"phi": ("q_proj", "k_proj", "v_proj", "dense")}
_MLP = {"phi": (None, "fc1", "fc2")}
_DEFAULT_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_DEFAULT_MLP = ("gate_proj", "up_proj", "down_proj")


class ModelLoadError(ValueError):
    """The model source cannot be used; the message is one line naming the value and what was expected."""


@dataclass
class Anatomy:
    """Where the parts of a LLaVA-style model live, and the sizes that structural pruning needs.

    Module paths are dotted names relative to the ``LlavaForConditionalGeneration``.
    Per-layer lists (``heads_per_layer`` …) have one entry per decoder layer; they differ from
    layer to layer only in a non-uniformly pruned model.
    """

    language_model_type: str
    vision_model_type: str
    vision_tower: str
    projector: str
    language_model: str
    layers: str
    lm_head: str
    embed_tokens: str
    attention: str  # attribute of a decoder layer
    mlp: str
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    gate_proj: str | None
    up_proj: str
    down_proj: str
    num_layers: int
    hidden_size: int
    head_dim: int
    heads_per_layer: list[int]
    kv_heads_per_layer: list[int]
    intermediate_per_layer: list[int]
    visual_tokens: int
    image_size: int
    patch_size: int
    vocab_size: int
    image_token_index: int

    @property
    def num_attention_heads(self) -> int:
        return self.heads_per_layer[0]

    @property
    def num_key_value_heads(self) -> int:
        return self.kv_heads_per_layer[0]

    @property
    def gqa_group_size(self) -> int:
        """Query heads sharing one KV head (1 = multi-head attention)."""
        return self.heads_per_layer[0] // self.kv_heads_per_layer[0]

    @property
    def intermediate_size(self) -> int:
        return self.intermediate_per_layer[0]

    @property
    def uniform(self) -> bool:
        return len({(h, k, m) for h, k, m in zip(self.heads_per_layer, self.kv_heads_per_layer,
                                                  self.intermediate_per_layer)}) <= 1

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        attn = layer.get_submodule(self.attention)
        return {"q": getattr(attn, self.q_proj), "k": getattr(attn, self.k_proj),
                "v": getattr(attn, self.v_proj), "o": getattr(attn, self.o_proj)}

    def mlp_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        mlp = layer.get_submodule(self.mlp)
        out = {"up": getattr(mlp, self.up_proj), "down": getattr(mlp, self.down_proj)}
        if self.gate_proj:
            out["gate"] = getattr(mlp, self.gate_proj)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                 gqa_group_size=self.gqa_group_size, intermediate_size=self.intermediate_size, uniform=self.uniform)
        return d


@dataclass
class LoadedModel:
    """What ``load`` returns. ``processor`` is None and ``has_weights`` False for config-only sources."""

    model: nn.Module
    processor: Any
    anatomy: Anatomy
    name: str
    kind: SourceKind
    path: Path | None
    has_weights: bool
    fingerprint: str
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self):
        """How this model is prompted (``compression.models.prompting.PromptFormat``): its chat template,
        or the LLaVA-1.5 fallback when the processor has none."""
        from compression.models.prompting import prompt_format

        if self.processor is None:
            raise ModelLoadError(f"model {self.name} is config-only (no processor); it cannot be prompted")
        return prompt_format(self.processor, self.model.config)


def _widths(text_config) -> tuple[list[int], list[int], list[int]]:
    n = text_config.num_hidden_layers
    pruned = getattr(text_config, "pruned_widths", None)  # written by compression.methods.prune for non-uniform widths
    if pruned:
        return list(pruned["num_attention_heads"]), list(pruned["num_key_value_heads"]), list(pruned["intermediate_size"])
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    return [heads] * n, [kv] * n, [text_config.intermediate_size] * n


def anatomy_from_config(config) -> Anatomy:
    """The anatomy of a ``LlavaConfig``; raises ModelLoadError for unsupported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ("llava", "llava_pruned"):
        raise ModelLoadError(f"unsupported architecture {model_type!r}; supported: LLaVA (model_type 'llava') "
                             f"with language model {', '.join(SUPPORTED_LANGUAGE)} and vision tower CLIP or SigLIP")
    text, vision = config.text_config, config.vision_config
    if text.model_type not in SUPPORTED_LANGUAGE:
        raise ModelLoadError(f"unsupported architecture: language model {text.model_type!r}; "
                             f"supported: {', '.join(SUPPORTED_LANGUAGE)}")
    if vision.model_type not in SUPPORTED_VISION:
        raise ModelLoadError(f"unsupported architecture: vision tower {vision.model_type!r}; "
                             f"supported: {', '.join(SUPPORTED_VISION)}")
    heads, kv, inter = _widths(text)
    q, k, v, o = _ATTENTION.get(text.model_type, _DEFAULT_ATTENTION)
    gate, up, down = _MLP.get(text.model_type, _DEFAULT_MLP)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    patches = (vision.image_size // vision.patch_size) ** 2
    has_cls = vision.model_type == "clip_vision_model"
    drop_first = getattr(config, "vision_feature_select_strategy", "default") == "default"
    return Anatomy(
        language_model_type=text.model_type, vision_model_type=vision.model_type,
        vision_tower="model.vision_tower", projector="model.multi_modal_projector",
        language_model="model.language_model", layers="model.language_model.layers", lm_head="lm_head",
        embed_tokens="model.language_model.embed_tokens", attention="self_attn", mlp="mlp",
        q_proj=q, k_proj=k, v_proj=v, o_proj=o, gate_proj=gate, up_proj=up, down_proj=down,
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, head_dim=head_dim,
        heads_per_layer=heads, kv_heads_per_layer=kv, intermediate_per_layer=inter,
        visual_tokens=patches + int(has_cls) - int(drop_first), image_size=vision.image_size,
        patch_size=vision.patch_size, vocab_size=text.vocab_size, image_token_index=config.image_token_index)


def parameter_counts(model: nn.Module, anatomy: Anatomy) -> dict[str, int]:
    """Parameters by part: ``vision``, ``projector``, ``language`` (decoder, embeddings, head), ``total``.

    Shared (tied) tensors count once, as ``save_pretrained`` stores them once.
    """
    seen: set[int] = set()

    def count(module: nn.Module) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += _numel(p)
        return n

    vision = count(model.get_submodule(anatomy.vision_tower))
    projector = count(model.get_submodule(anatomy.projector))
    language = count(model.get_submodule(anatomy.language_model)) + count(model.get_submodule(anatomy.lm_head))
    rest = count(model)
    return {"total": vision + projector + language + rest, "vision": vision, "projector": projector,
            "language": language + rest}


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes 4-bit parameters are packed two to a byte; their logical size is in quant_state.
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return p.numel()


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer as stored (what a safetensors file holds, near enough)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for _, b in model.named_buffers())


def fingerprint_folder(path: Path) -> str:
    """Content identity of a model folder: its config plus weight files' names, sizes and first bytes."""
    h = hashlib.sha1()
    h.update((path / "config.json").read_bytes() if (path / "config.json").is_file() else b"")
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _read_config(path: Path):
    from transformers import AutoConfig

    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e.msg}); expected a Hugging Face config.json") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelLoadError(f"{path} has no 'model_type'; expected a Hugging Face config.json")
    if raw["model_type"] == "llava_pruned":
        from compression.models.pruned import LlavaPrunedConfig  # the project's own class: no remote code needed

        return LlavaPrunedConfig.from_dict(raw)
    if raw["model_type"] != "llava":
        raise ModelLoadError(f"unsupported architecture {raw['model_type']!r}; supported: LLaVA (model_type "
                             f"'llava') with language model {', '.join(SUPPORTED_LANGUAGE)} and vision tower CLIP or SigLIP")
    return AutoConfig.for_model(**raw)


def _model_class(config):
    if config.model_type == "llava_pruned":
        from compression.models.pruned import LlavaPrunedForConditionalGeneration

        return LlavaPrunedForConditionalGeneration
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def model_from_config(config, device: str = "meta") -> nn.Module:
    """Build the model with no weights (meta device): for counts and what-if estimates."""
    with torch.device(device):
        return _model_class(config)._from_config(config)


def _resolve(source: str) -> tuple[SourceKind, str, Path | None]:
    if source == "reference":
        return "reference", "reference", REFERENCE_PATH
    if source.startswith("config:"):
        name = source.split(":", 1)[1]
        configs = shipped_configs()
        if name not in configs:
            raise ModelLoadError(f"no shipped config {name!r}; available: {', '.join(configs) or 'none'}")
        return "config", source, configs[name]
    if source.startswith("run:"):
        source = str(cache_dir() / "runs" / source.split(":", 1)[1] / "model")
    path = Path(source).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise ModelLoadError(f"config file {path} does not exist; expected a Hugging Face config.json")
        return "config", str(path), path
    looks_like_hub_id = source.count("/") == 1 and all(source.split("/")) and not source.startswith((".", "~"))
    if looks_like_hub_id and not path.exists():
        return "hub", source, None
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist; expected 'reference', a Hugging Face model "
                             "folder with config.json, a config.json, 'config:<name>' or a hub id 'org/name'")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {path} has no config.json; expected a Hugging Face model folder")
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return ("local" if has_weights else "config"), str(path), path


def _hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the offline cache means the same thing to the user
        offline = os.environ.get("HF_HUB_OFFLINE", "unset")
        raise ModelLoadError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}); this machine cannot "
            f"download (HF_HUB_OFFLINE={offline}): download it where the hub is reachable, copy the cache, "
            "or pass the model folder") from None


def load(source: str, device: str = "cpu", dtype: torch.dtype | str = torch.float32,
         trust_remote_code: bool = False) -> LoadedModel:
    """Load a model, its processor and its anatomy from any supported source.

    ``trust_remote_code`` is passed to transformers only when the caller asks for it; folders
    written by ``compression.methods.prune`` load through this package's own classes without it.
    """
    kind, name, path = _resolve(source.strip())
    if kind == "hub":
        path = _hub_folder(name)
    config_path = path if path.suffix == ".json" else path / "config.json"
    if not config_path.is_file():
        if kind == "reference":
            raise ModelLoadError(f"the reference model is missing at {path}; train it with "
                                 "`python -m compression.models.reference`")
        raise ModelLoadError(f"{path} has no config.json; expected a Hugging Face model folder")
    config = _read_config(config_path)
    anatomy = anatomy_from_config(config)
    if kind == "config":
        model = model_from_config(config)
        return LoadedModel(model, None, anatomy, name, kind, path, False,
                           hashlib.sha1(config_path.read_bytes()).hexdigest()[:16])
    model = _load_weights(config, path, device, dtype, trust_remote_code)
    if getattr(config, "quantization_config", None):
        from compression.models.bnb_cpu import prepare_bnb_for_cpu  # bitsandbytes' fast 4-bit CPU kernel needs aligned sizes

        prepare_bnb_for_cpu(model)
    processor = load_processor(path, trust_remote_code)
    model.eval()
    return LoadedModel(model, processor, anatomy, name, kind, path, True, fingerprint_folder(path))


def _load_weights(config, path: Path, device: str, dtype, trust_remote_code: bool) -> nn.Module:
    kwargs = {"dtype": dtype, "device_map": device} if device != "cpu" else {"dtype": dtype}
    try:
        return _model_class(config).from_pretrained(path, config=config, trust_remote_code=trust_remote_code,
                                                    **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load weights from {path}: {first}") from None


def load_processor(path: Path, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load the processor from {path}: {first}; expected tokenizer and "
                             "processor files beside config.json") from None
