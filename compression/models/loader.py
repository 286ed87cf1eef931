"""One loader for every model source; the model's *anatomy* comes from its family description.

Sources (``load(source)``):

- ``reference``: the shipped ShapesVQA LLaVA (``compression/assets/reference``);
- a local Hugging Face folder (``config.json`` + safetensors + processor files);
- a hub id (``org/name``): read from the local Hugging Face cache; this machine has no hub;
- a ``config.json`` alone, or a shipped config name (``config:llava-1.5-7b``, ``config:bunny-v1.0-3b``):
  the model is built on the ``meta`` device, no weights, for what-if estimates only.

The anatomy (``compression.models.anatomy``) says where things are — vision tower, projector, decoder
layers, attention q/k/v/o and MLP projections — and the sizes pruning needs (heads, KV heads,
``head_dim``, per-layer widths, visual tokens per image). It is built by the model's family description
(``compression.models.families``, registered by ``model_type``); the model class and the processor
(built without torchvision where the stock one needs it) come from there too.

A broken folder is refused in one line (``ModelLoadError``) naming the file and what was expected, before the
weights are read where the headers tell (``compression.models.checkpoint``: a truncated or corrupt safetensors
file, a shard the index names but the folder lacks, a config whose shapes disagree with the weights, a weight
the model needs that no file holds; missing tokenizer or image-processor files) and from transformers' loading
report after (the same, for folders in a naming transformers maps while loading): transformers itself would
initialise a missing or mis-shaped weight at random with a warning and go on.
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

from compression.models import families
from compression.models.anatomy import Anatomy, ModelLoadError  # noqa: F401 - re-exported
from compression.models.checkpoint import INDEX_FILES, WeightFiles, check_against_model, weight_file_names
from compression.models.catalog import CONFIGS_PATH, REFERENCE_PATH, shipped_configs  # noqa: F401 - re-exported
from compression.models.families import anatomy_from_config  # noqa: F401 - re-exported
from compression.models.families.processors import load_processor as _family_processor
from compression.paths import cache_dir

SourceKind = Literal["reference", "local", "hub", "config"]


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

    @property
    def hardware_label(self) -> str:
        """Where the weights are and in which precision, as measured figures say it: ``cpu, bf16``."""
        from compression.hardware import dtype_name

        p = next(self.model.parameters(), None)
        placement = self.extras.get("placement")
        if p is not None and placement and placement["offloaded"]:
            where = " + ".join(f"{w} ({n} modules)" for w, n in placement["modules"].items())
            return f"offloaded: {where}, {dtype_name(p.dtype)}"
        if p is None or p.device.type == "meta":
            return "config only"
        return f"{p.device}, {dtype_name(p.dtype)}"


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

    # the projector first: Qwen's merger lives inside its vision tower (``model.visual.merger``)
    projector = sum(_numel(p) for p in anatomy.projector_parameters(model) if id(p) not in seen)
    seen.update(id(p) for p in anatomy.projector_parameters(model))
    vision = count(model.get_submodule(anatomy.vision_tower))
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
    family = families.family_for(raw["model_type"])
    if raw["model_type"] == family.pruned_model_type:
        from compression.models.pruned import pruned_classes  # the project's own classes: no remote code needed

        return pruned_classes(family)[0].from_dict(raw)
    return AutoConfig.for_model(**raw)


def _model_class(config):
    family = families.family_for(config)
    if config.model_type == family.pruned_model_type:
        from compression.models.pruned import pruned_classes

        return pruned_classes(family)[1]
    return family.transformers_class("model")


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
    # a folder whose index names shards is a weights folder even when they are gone (refused, not what-if)
    has_weights = (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
                   or any((path / index).is_file() for index in INDEX_FILES))
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
         trust_remote_code: bool = False, offload: bool | Literal["auto"] = "auto",
         max_memory: dict[Any, int | str] | None = None, sequential: bool = False) -> LoadedModel:
    """Load a model, its processor and its anatomy from any supported source.

    ``device`` and ``dtype`` are where the weights go and in which precision (``compression.hardware.resolve``
    chooses them; ``dtype`` may be a torch dtype or a name: ``fp32``, ``bf16``, ``fp16``).

    ``trust_remote_code`` is passed to transformers only when the caller asks for it; folders
    written by ``compression.methods.prune`` load through this package's own classes without it.

    A model whose weights do not fit the device (``offload="auto"``: more than 90 % of its free memory), or
    any model when ``offload`` is True or ``max_memory`` is given, loads through Accelerate's big-model
    inference: ``device_map="auto"`` fills the device, then the CPU, then an offload folder on disk
    (``cache/offload/``), and moves each module's weights in for its forward pass. ``extras["placement"]``
    says where the parts went; it answers the same, only slower.
    ``sequential``: every weight stays on the ``meta`` device; ``extras["checkpoint"]``
    (``compression.models.shards.Checkpoint``) reads the parts outside the decoder layers when an analysis needs
    them and one decoder layer at a time (``compression.methods.sequential``); plans and streaming surgery need
    no weights at all. For models larger than memory.
    """
    if isinstance(dtype, str):
        from compression.hardware import torch_dtype

        dtype = torch_dtype(dtype)
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
    # everything cheap first (files present, headers whole and agreeing with the config, the processor), so a
    # broken folder is refused before gigabytes are read
    _check_processor_files(path)
    _check_weight_files(config, path)
    processor = load_processor(path, trust_remote_code, families.family_for(config))
    if sequential:
        model, checkpoint = load_skeleton(config, path, device, dtype, read_parts=False)
        return LoadedModel(model, processor, anatomy, name, kind, path, True, fingerprint_folder(path),
                           {"checkpoint": checkpoint, "dtype": model.dtype, "device": device})
    placement = _placement(path, device, dtype, offload, max_memory)
    model = _load_weights(config, path, device, dtype, trust_remote_code, placement)
    if getattr(config, "quantization_config", None):
        from compression.models.bnb_cpu import prepare_bnb_for_cpu  # bitsandbytes' fast 4-bit CPU kernel needs aligned sizes

        prepare_bnb_for_cpu(model)
    model.eval()
    loaded = LoadedModel(model, processor, anatomy, name, kind, path, True, fingerprint_folder(path))
    if placement:
        device_map = getattr(model, "hf_device_map", {})
        where = list(device_map.values())
        away = ("cpu", "disk") if device != "cpu" else ("disk",)  # what each forward pass brings back in
        loaded.extras["placement"] = {
            "offloaded": any(str(w) in away for w in where),
            "modules": {str(w): where.count(w) for w in dict.fromkeys(where)},
            "weights_bytes": placement["weights_bytes"], "max_memory": placement["max_memory"],
            "offloaded_bytes": _offloaded_bytes(model, device_map, away, placement["weights_bytes"])}
    return loaded


def _offloaded_bytes(model: torch.nn.Module, device_map: dict, away: tuple[str, ...], weights_bytes: int) -> int:
    """Bytes of the weights placed off the compute device (the modules ``device_map`` puts in ``away``), at the
    loaded precision: what every forward pass moves in again."""
    total_params = sum(p.numel() for p in model.parameters()) or 1
    moved = 0
    for name, w in device_map.items():
        if str(w) in away:
            module = model.get_submodule(name) if name else model
            moved += sum(p.numel() for p in module.parameters())
    return int(weights_bytes * min(1.0, moved / total_params))


def _weights_bytes(path: Path, dtype: torch.dtype) -> int:
    """The weights' bytes once loaded in ``dtype``: from the safetensors headers (``measure.memory.weight_bytes``,
    no tensor read), else the files' sizes."""
    from compression.measure import memory

    files = weight_file_names(path)
    if files and all(f.suffix == ".safetensors" for f in files):
        return memory.weight_bytes(path, dtype)
    return sum(f.stat().st_size for f in files)


def _placement(path: Path, device: str, dtype, offload, max_memory) -> dict[str, Any] | None:
    """Accelerate's big-model placement (``from_pretrained`` keyword arguments, and what was decided), or None
    for the plain path: everything on ``device``."""
    if offload is False and max_memory is None:
        return None
    from compression.measure import memory

    needed = _weights_bytes(path, dtype)
    if max_memory is None:
        free = memory.available_bytes(device)
        if offload == "auto" and needed <= 0.9 * free:
            return None
        cpu_free = memory.available_bytes("cpu")
        if device.startswith("cuda"):
            index = int(device.split(":")[1]) if ":" in device else 0
            max_memory = {index: int(0.9 * free), "cpu": int(0.8 * cpu_free)}
        else:
            max_memory = {"cpu": int(0.8 * cpu_free)}
    folder = cache_dir() / "offload" / hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return {"device_map": "auto", "max_memory": max_memory, "offload_folder": str(folder), "weights_bytes": needed}


def load_skeleton(config, path: Path, device: str = "cpu", dtype: torch.dtype | str | None = torch.float32,
                  read_parts: bool = True):
    """``(model, checkpoint)``: the model built on ``meta`` (accelerate's ``init_empty_weights``; buffers real),
    its stored keys bound to module names, and every tensor outside the decoder layers and the LM head read
    from the shards (``read_parts=False``: nothing read, every tensor on ``meta``). ``dtype`` None keeps the stored precision."""
    from accelerate import init_empty_weights

    from compression.models.shards import Checkpoint, load_parts

    if getattr(config, "quantization_config", None):
        raise ModelLoadError(f"{path} is quantized ({config.quantization_config.get('quant_method', '?')}); "
                             "sequential analysis and streaming surgery read floating-point shards")
    checkpoint = Checkpoint(path)
    dtype = checkpoint.dtype if dtype is None else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    with init_empty_weights(include_buffers=False):
        model = _model_class(config)._from_config(config, dtype=dtype)
    model.tie_weights()  # as from_pretrained does: a tied head is the embeddings' tensor, saved once
    model.eval()
    checkpoint.bind(model)
    if read_parts:
        anatomy = anatomy_from_config(config)
        load_parts(model, checkpoint, anatomy, dtype, device, skip=(anatomy.lm_head,))
    return model, checkpoint


def saved_dtype(folder: str | Path) -> str:
    """The precision a model folder's weights were saved in (its config's ``dtype``), as ``fp32`` / ``bf16`` /
    ``fp16``; ``fp32`` when the config does not say."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return "fp32"
    text = config.get("text_config") or {}
    from compression.hardware import TORCH_NAMES, dtype_name

    name = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype") or "float32"
    short = dtype_name(name)
    return short if short in TORCH_NAMES else "fp32"


# A tokenizer is one of these files (fast, sentencepiece, byte-level BPE, WordPiece, Mistral's tekken); the image
# processor's settings are preprocessor_config.json, or the image_processor entry of processor_config.json
# (what transformers 5's ``processor.save_pretrained`` writes).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")


def _check_processor_files(path: Path) -> None:
    """Refuse a folder without tokenizer or image-processor files, naming what is missing."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]}); "
                             "expected the model's tokenizer files beside config.json (processor.save_pretrained "
                             "writes them)")
    if (path / "preprocessor_config.json").is_file():
        return
    processor_config = path / "processor_config.json"
    if processor_config.is_file():
        try:
            if "image_processor" in json.loads(processor_config.read_text()):
                return
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{processor_config} is not valid JSON ({e.msg}); expected the processor's "
                                 "config as processor.save_pretrained writes it") from None
    raise ModelLoadError(f"{path} has no image processor config (preprocessor_config.json, or processor_config.json "
                         "with an image_processor entry); expected the files processor.save_pretrained writes")


def _check_weight_files(config, path: Path) -> None:
    """Headers only: every shard the index names present, every safetensors file whole and, for a folder in the
    model's own naming, every tensor shaped as the config implies and none the model needs absent."""
    files = weight_file_names(path)
    if not files or not all(f.suffix == ".safetensors" for f in files):
        return  # .bin checkpoints have no header to read; transformers' loading report is checked after
    weights = WeightFiles(path, _model_class(config).__name__)
    if not getattr(config, "quantization_config", None):  # quantized folders store packed shapes
        check_against_model(weights, model_from_config(config), path / "config.json")


def _load_weights(config, path: Path, device: str, dtype, trust_remote_code: bool,
                  placement: dict[str, Any] | None = None) -> nn.Module:
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    kwargs = {"dtype": dtype, "device_map": device} if device != "cpu" else {"dtype": dtype}
    if placement:
        kwargs.update({k: placement[k] for k in ("device_map", "max_memory", "offload_folder")})
    # transformers logs a "LOAD REPORT" table for missing / mismatched / unexpected keys and goes on; its
    # findings are refused below in one line instead
    report_logger = hf_logging.get_logger("transformers.modeling_utils")
    level = report_logger.level
    report_logger.setLevel(hf_logging.ERROR)
    try:
        model, info = _model_class(config).from_pretrained(
            path, config=config, trust_remote_code=trust_remote_code, output_loading_info=True,
            ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load weights from {path}: {first}") from None
    finally:
        report_logger.setLevel(level)
    problem = _loading_problem(info, path)
    if problem:
        del model  # nothing half-loaded is handed on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise ModelLoadError(problem)
    return model


def _loading_problem(info: dict[str, Any], path: Path) -> str | None:
    """One line for what transformers' loading report found, or None when every weight loaded as stored."""
    config = path / "config.json"
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, stored, wanted = mismatched[0]
        return (f"{key} is {list(stored)} in {path} but {config} implies {list(wanted)}; the config disagrees "
                f"with the weights ({len(mismatched)} tensor(s))")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        return (f"{path} lacks {len(missing)} weight(s) {config} implies, e.g. {missing[0]}; expected every weight "
                "of the model (transformers would initialise them at random)")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        return (f"{path} holds {len(unexpected)} weight(s) {config} has no place for, e.g. {unexpected[0]}; the "
                "config disagrees with the weights (a layer count or module the config does not describe)")
    return None


def load_processor(path: Path, trust_remote_code: bool = False, family: "families.Family | None" = None):
    """The processor of a model folder, through its family's processor builder (``families.processors``)."""
    if family is None:
        family = families.family_for(_read_config(path / "config.json"))
    try:
        return _family_processor(family, path, trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load the processor from {path}: {first}; expected tokenizer and "
                             "processor files beside config.json") from None
