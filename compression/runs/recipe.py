"""A recipe: everything one compression run does, validated, stored as YAML.

prune -> recover on a small data fraction -> (optionally) quantize and prune visual tokens ->
evaluate. Defaults follow Huang et al., "Investigating Structural Pruning and Recovery
Techniques for Compressing MLLMs" (arXiv 2507.20749): 5 % of the training data, logits KD
at temperature 2 scaled by tau^2, hidden-state MSE on the last layer ("SFT + L2 KD").
Visual-token pruning follows QAPruner (arXiv 2604.02816).

Every validation error is one line naming the field and the expected value, e.g.
``recipe field recovery.mode: got 'lorax'; expected one of 'none', 'projector', 'lora', 'full'``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PruneMethod = Literal["none", "layer", "width"]
RecoveryMode = Literal["none", "projector", "lora", "full"]
Distillation = Literal["none", "logits", "hidden", "hidden+logits"]
QuantizeFormat = Literal["none", "int8", "nf4"]

# Scorers each pruning paradigm accepts (the names of compression.methods.importance, kept here so a recipe
# validates without importing torch): block influence (or the loss when a layer is removed) ranks
# whole layers; first-order Taylor, activation magnitude (Minitron) and weight magnitude rank heads
# and neurons. Visual-token scorers (compression.methods.tokens.RECIPE_SCORERS): QAPruner's hybrid of a
# semantic score (FastV attention or text similarity) and the quantization score, fused by alpha.
LAYER_SCORERS = ("block_influence", "removal_loss")
WIDTH_SCORERS = ("taylor", "activation", "magnitude")
TOKEN_SCORERS = ("attention", "similarity", "quantization", "random")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the field and the expected value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PruneSpec(_Strict):
    method: PruneMethod = "none"
    ratio: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of language-model parameters to remove
    scorer: str | None = None                  # None: block_influence for layer, taylor for width
    layer_range: tuple[int, int] | None = None  # [first, last) layers eligible; None: paper default
    servable: bool = False                      # width: every layer alike (plain transformers), TP sizes kept
    neuron_multiple: Literal["auto"] | int = "auto"  # width: kept neurons a multiple of this (auto: 128 for 7B layers)

    @model_validator(mode="after")
    def _check(self) -> "PruneSpec":
        if self.method == "none":
            return self
        allowed = LAYER_SCORERS if self.method == "layer" else WIDTH_SCORERS
        if self.scorer is None:
            self.__dict__["scorer"] = allowed[0]
        elif self.scorer not in allowed:
            raise _field_error("scorer", self.scorer, f"one of {_quoted(allowed)} for method {self.method!r}")
        if self.ratio <= 0:
            raise _field_error("ratio", self.ratio, f"a fraction in (0, 1) when method is {self.method!r}")
        if self.layer_range is not None and not 0 <= self.layer_range[0] < self.layer_range[1]:
            raise _field_error("layer_range", list(self.layer_range), "[first, last) with 0 <= first < last")
        if self.neuron_multiple != "auto" and (self.neuron_multiple < 32 or self.neuron_multiple % 32):
            raise _field_error("neuron_multiple", self.neuron_multiple, "auto or a multiple of 32 (32, 64, 128)")
        return self


class RecoverySpec(_Strict):
    mode: RecoveryMode = "none"
    distillation: Distillation = "none"
    temperature: float = Field(2.0, gt=0.0)       # logits KD temperature tau (loss scaled by tau^2)
    alpha: float = Field(0.5, ge=0.0, le=1.0)     # loss = (1 - alpha) * CE + alpha * KD
    # Hidden-state KD pairs, teacher layer -> student layer (hidden_states indices: 0 = embeddings,
    # i = output of decoder layer i). None: the last hidden state only. "kept": every layer the
    # student kept, matched to the same layer in the teacher (for layer-pruned students).
    hidden_layers: dict[int, int] | Literal["kept"] | None = None
    epochs: int = Field(1, ge=1, le=100)
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    batch_size: int = Field(16, ge=1, le=4096)    # global batch, split across processes
    seed: int = Field(0, ge=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    checkpoint_every: int = Field(50, ge=1)       # steps between resumable checkpoints
    max_steps: int | None = Field(None, ge=1)     # cap on optimizer steps (None: epochs decide)
    gradient_checkpointing: bool = False          # recompute activations in the backward (less memory)

    @field_validator("hidden_layers", mode="before")
    @classmethod
    def _hidden_layers(cls, v: Any) -> Any:
        if v is None or v == "kept":
            return v
        ok = isinstance(v, dict) and all(isinstance(k, (int, str)) and str(k).lstrip("-").isdigit()
                                         and isinstance(x, int) for k, x in v.items())
        if not ok:
            raise ValueError("expected a mapping {teacher_layer: student_layer} of integers, 'kept' or null")
        return {int(k): x for k, x in v.items()}

    @model_validator(mode="after")
    def _check(self) -> "RecoverySpec":
        if self.distillation != "none" and self.mode == "none":
            raise _field_error("distillation", self.distillation, "'none' when mode is 'none' (nothing is trained)")
        return self


class VisualTokensSpec(_Strict):
    keep_ratio: float = Field(1.0, gt=0.0, le=1.0)  # fraction of visual tokens kept (1 = no pruning)
    scorer: str = "attention"
    alpha: float = Field(0.7, ge=0.0, le=1.0)       # QAPruner: S = alpha * semantic + (1 - alpha) * quantization

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str) -> str:
        if v not in TOKEN_SCORERS:
            raise ValueError(f"expected one of {_quoted(TOKEN_SCORERS)}")
        return v


Metric = Literal["auto", "exact_match", "multiple_choice", "yes_no"]
SourceValue = str | dict[str, Any]  # a path string, 'shapes', or {path, image_root, columns, split}


class DataUse(_Strict):
    """One step's data: a source and how much of it. Written as a mapping ``{source, samples | fraction, ...}``,
    or as the bare source (a string or a ``{path, image_root, columns, split}`` mapping)."""

    source: SourceValue
    samples: int | None = Field(None, ge=1, le=10_000_000)   # the first N records (eval) / a random N (else)
    fraction: float | None = Field(None, gt=0.0, le=1.0)     # a seeded random fraction of the source
    on_error: Literal["refuse", "skip"] = "refuse"           # a bad record stops the run, or is skipped and counted
    metric: Metric = "auto"                                   # eval: chosen from the data's fields unless set
    max_new_tokens: int = Field(16, ge=1, le=4096)            # eval: generation length

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str) or (isinstance(v, dict) and "source" not in v and "path" in v):
            return {"source": v}
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: Any) -> Any:
        from compression.data.sources import SourceSpec

        try:
            spec = SourceSpec.parse(v)
        except ValueError as e:
            raise ValueError(str(e)) from None
        return spec.__class__(_absolute(spec.path), spec.image_root and _absolute(spec.image_root), spec.columns,
                              spec.split).to_value()

    @model_validator(mode="after")
    def _check(self) -> "DataUse":
        if self.samples is not None and self.fraction is not None:
            raise _field_error("fraction", self.fraction, "either samples or fraction, not both")
        return self


class DataSpec(_Strict):
    """The data each step reads (``compression.data.sources``). The reference model defaults to the built-in
    ShapesVQA (calibration and training from its train split, evaluation from its test split); any other
    model must name ``train`` (when recovery trains) and ``eval``: nothing is ever scored on shapes silently."""

    calibration: DataUse | None = None   # importance scores; default: the train source
    train: DataUse | None = None         # recovery; default fraction 0.05 (the paper's headline)
    eval: DataUse | None = None          # accuracy of the original and the compressed model; default 500 records


class HardwareSpec(_Strict):
    """Where the run computes and in which precision (``compression.hardware.resolve``). ``auto``: the first
    GPU in bf16 where one is present and supports it, else the CPU in fp32. Whether the device exists is
    checked when the run starts (a recipe written on a GPU machine runs on the CPU with ``--device cpu``)."""

    device: str = "auto"   # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # processes > 1: the job runner takes that many slots (GPUs) and runs the recipe under
    # `accelerate launch --num_processes N` (compression.runs.launch): recovery data- or fully-sharded
    # parallel, evaluation split across the processes
    processes: int = Field(1, ge=1, le=64)
    parallelism: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: FSDP for full finetuning, DDP otherwise
    # the kernels the original and the compressed model are timed on (compression.models.kernels):
    # eager = PyTorch's own; onednn = CPU linears on pre-packed weights, as a CPU deployment runs them
    kernels: Literal["eager", "onednn"] = "eager"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        v = v.strip().lower()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return v


DEFAULT_CALIBRATION_SAMPLES = 10   # the paper: Taylor on 10 samples
DEFAULT_TRAIN_FRACTION = 0.05      # the paper's headline setting
DEFAULT_EVAL_SAMPLES = 500


class Recipe(_Strict):
    name: str | None = None
    model: str = "reference"
    prune: PruneSpec = PruneSpec()
    recovery: RecoverySpec = RecoverySpec()
    quantize: QuantizeFormat = "none"
    visual_tokens: VisualTokensSpec = VisualTokensSpec()
    data: DataSpec = DataSpec()
    hardware: HardwareSpec = HardwareSpec()

    @model_validator(mode="after")
    def _data_for_model(self) -> "Recipe":
        """Fill the reference model's ShapesVQA defaults; refuse a user model without its own data."""
        d = self.data
        if self.model == "reference":
            train = d.train or DataUse(source="shapes")
            calibration = d.calibration or DataUse(source=train.source)
            evaluation = d.eval or DataUse(source="shapes")
        else:
            trains = self.recovery.mode != "none"
            if trains and d.train is None:
                raise _field_error("data.train", None, f"a data source for recovery of {self.model!r} (e.g. "
                                   "data: {train: {source: my/train.json, fraction: 0.05}}); shapes are only the "
                                   "reference model's data")
            if d.eval is None:
                raise _field_error("data.eval", None, f"a data source to evaluate {self.model!r} on (e.g. data: "
                                   "{eval: {source: my/test.json, samples: 500}})")
            train, evaluation = d.train, d.eval
            calibration = d.calibration or (DataUse(source=train.source) if train is not None else None)
            needs_data = self.prune.method != "none" and self.prune.scorer != "magnitude"
            if needs_data and calibration is None:
                raise _field_error("data.calibration", None, "a data source for the importance scores (or "
                                   "data.train, which calibration then uses)")
        if train is not None and train.samples is None and train.fraction is None:
            train = train.model_copy(update={"fraction": DEFAULT_TRAIN_FRACTION})
        if calibration is not None and calibration.samples is None and calibration.fraction is None:
            calibration = calibration.model_copy(update={"samples": DEFAULT_CALIBRATION_SAMPLES})
        if evaluation.samples is None and evaluation.fraction is None:
            evaluation = evaluation.model_copy(update={"samples": DEFAULT_EVAL_SAMPLES})
        self.__dict__["data"] = DataSpec.model_construct(calibration=calibration, train=train, eval=evaluation)
        return self

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected 'reference', a model folder, 'config:<name>' or a hub id")
        return _absolute(v.strip()) if v.strip() != "reference" else "reference"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _safe_name(v):
            raise ValueError("expected a plain name: letters, digits, '.', '_' or '-', not starting with '.'")
        return v

    # ------------------------------------------------------------------ YAML

    @classmethod
    def from_dict(cls, raw: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(raw, dict):
            raise RecipeError(f"{source}: got a {type(raw).__name__}; expected a mapping of recipe fields")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise RecipeError(one_line(e, source)) from None

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "Recipe":
        """A recipe from YAML text or a ``.yaml`` file path."""
        source = "recipe"
        text = text_or_path
        if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                               and text_or_path.endswith((".yaml", ".yml"))):
            path = Path(text_or_path)
            if not path.is_file():
                raise RecipeError(f"recipe file {path} does not exist; expected a YAML recipe (see recipes/)")
            source, text = f"recipe {path.name}", path.read_text()
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise RecipeError(f"{source} is not valid YAML{line}; expected 'key: value' lines") from None
        return cls.from_dict(raw or {}, source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude_none=False)
        for role, use in list(d["data"].items()):
            if use is None:
                del d["data"][role]
        if d["prune"]["layer_range"] is not None:
            d["prune"]["layer_range"] = list(d["prune"]["layer_range"])
        return d

    @property
    def compresses(self) -> bool:
        return self.prune.method != "none" or self.quantize != "none" or self.visual_tokens.keep_ratio < 1


# ---------------------------------------------------------------------------- one-line errors

def _quoted(values) -> str:
    return ", ".join(repr(v) for v in values)


def _safe_name(name: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}", name)) and ".." not in name


def _field_error(field: str, value: Any, expected: str) -> ValueError:
    # A model validator's error has no location of its own; the field name travels in the message.
    got = "missing" if value is None else f"got {value!r}"
    return ValueError(f"@{field}@ {got}; expected {expected}")


def _absolute(path: str) -> str:
    """A relative path that exists from here, made absolute: a background job runs from the repository root."""
    p = Path(path).expanduser()
    return str(p.resolve()) if not p.is_absolute() and p.exists() else path


_EXPECTED = {
    "greater_than": "a number > {gt}",
    "greater_than_equal": "a number >= {ge}",
    "less_than": "a number < {lt}",
    "less_than_equal": "a number <= {le}",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "string_type": "a string",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping of fields",
    "tuple_type": "a list [first, last]",
    "too_short": "a list [first, last]",
    "too_long": "a list [first, last]",
}


def one_line(error: ValidationError, source: str = "recipe") -> str:
    """Pydantic's errors as one line: ``recipe field a.b: got X; expected Y`` (several joined by '; ')."""
    parts = []
    seen = set()
    for err in error.errors():
        field = ".".join(str(x) for x in err["loc"] if isinstance(x, str) and not x.startswith(("function-",
                                                                                                 "literal[", "dict[")))
        msg = err.get("msg", "")
        kind = err["type"]
        value = err.get("input")
        if kind == "value_error" and "@" in msg:  # from _field_error: "@field@ got ...; expected ..."
            inner, rest = msg.split("@", 2)[1:]
            field = ".".join(filter(None, [field, inner]))
            text = f"{source} field {field}:{rest}"
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            text = f"{source} field {field}: got {value!r}; expected {expected.replace(' or ', ', ')}"
        elif kind == "extra_forbidden":
            parent = _parent_fields(err["loc"][:-1])
            text = (f"{source} field {field}: unknown key; expected one of {_quoted(parent)}" if parent
                    else f"{source} field {field}: unknown key")
        elif kind in _EXPECTED:
            text = f"{source} field {field}: got {value!r}; expected {_EXPECTED[kind].format(**err.get('ctx', {}))}"
        elif kind == "value_error":
            text = f"{source} field {field}: got {value!r}; {msg.removeprefix('Value error, ')}"
        else:
            text = f"{source} field {field}: got {value!r}; {msg.lower()}"
        if field not in seen:  # a union reports once per member; the first says enough
            seen.add(field)
            parts.append(text)
    return "; ".join(parts)


def _parent_fields(loc) -> list[str]:
    model: Any = Recipe
    for key in loc:
        field = model.model_fields.get(key) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if hasattr(model, "model_fields") else []
