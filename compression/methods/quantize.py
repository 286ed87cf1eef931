"""Quantization of the language model: real bitsandbytes int8 / nf4, and simulated WxAy fake quantization.

- **Real** (``quantize_model``): every decoder linear layer (attention q/k/v/o, MLP gate/up/down) becomes a
  bitsandbytes ``Linear8bitLt`` (LLM.int8(), Dettmers et al., arXiv 2208.07339; outlier threshold 6.0) or
  ``Linear4bit`` NF4 (QLoRA, Dettmers et al., arXiv 2305.14314). The vision tower, projector, embeddings
  and ``lm_head`` stay in floating point, as transformers' ``BitsAndBytesConfig`` does by default.
  bitsandbytes 0.50 runs both on CPU. Its AVX512-BF16 NF4 kernel needs ``out_features % 32 == 0`` and
  ``in_features % 64 == 0`` (the NF4 block size); layers that do not fit (pruned widths) fall back to the
  generic CPU path, per layer (``prepare_bnb_for_cpu``).
- **Simulated** (``fake_quantize``): weights quantize-dequantized per group of ``group`` input channels,
  asymmetric min-max (RTN); activations entering each decoder linear quantize-dequantized per token,
  asymmetric min-max over the channels. The W4A4 / W8A8 setting of QAPruner (arXiv 2604.02816) studies.
  Reversible: the returned handle restores the weights and removes the hooks.
- **Saving** (``save_quantized``): ``save_pretrained`` with the ``quantization_config`` transformers writes,
  plus ``quantization.json`` saying the format and where it loads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from compression.models import Anatomy
from compression.models.families.processors import save_processor
# loading-time helpers live with the loader; re-exported here for the quantization API
from compression.models.bnb_cpu import (CPU_NF4_BLOCK_N, NF4_BLOCK_SIZE, nf4_cpu_kernel_fits,  # noqa: F401
                                        prepare_bnb_for_cpu)

QuantFormat = Literal["int8", "nf4"]
FORMATS: tuple[str, ...] = ("int8", "nf4")
# Not quantized (LLaVA's names; other families' come from their description, ``Anatomy.skip_quantization``):
# transformers' bnb integration matches these as prefixes of module names.
SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r} is unknown; expected one of {', '.join(FORMATS)}")


def decoder_linears(model: nn.Module, anatomy: Anatomy) -> dict[str, tuple[nn.Module, str, nn.Module]]:
    """Every decoder linear layer: ``{dotted name: (parent module, attribute, linear)}``."""
    out = {}
    for i, layer in enumerate(anatomy.decoder_layers(model)):
        for part in (anatomy.attention, anatomy.mlp):
            parent = layer.get_submodule(part)
            for attribute, child in parent.named_children():
                if isinstance(child, nn.Linear) or _is_bnb_linear(child):
                    out[f"{anatomy.layers}.{i}.{part}.{attribute}"] = (parent, attribute, child)
    return out


def _is_bnb_linear(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


# ------------------------------------------------------------------------------------------ real (bitsandbytes)

def bnb_config(fmt: QuantFormat, skip: list[str] | None = None, compute_dtype: torch.dtype = torch.float32):
    """The ``BitsAndBytesConfig`` matching ``quantize_model(fmt)``; written into the saved config.

    ``skip``: module-name prefixes kept in floating point (the vision tower, projector(s) and ``lm_head``
    of the model's family; default LLaVA's)."""
    from transformers import BitsAndBytesConfig

    _check_format(fmt)
    skip = list(skip or SKIP_MODULES)
    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=False, llm_int8_skip_modules=skip)


def _to_bnb(linear: nn.Linear, fmt: QuantFormat, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weights, quantized where the layer lives (the CPU or its GPU),
    computing in ``compute_dtype`` (the model's precision)."""
    import bitsandbytes as bnb

    device = linear.weight.device
    weight = linear.weight.data.detach().to("cpu", torch.float32).clone()
    has_bias = linear.bias is not None
    if fmt == "int8":
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                  has_fp16_weights=False, threshold=6.0)
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                compute_dtype=compute_dtype, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=new)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data.detach().to("cpu", compute_dtype).clone(), requires_grad=False)
    # .to(device) is what makes bitsandbytes quantize the weight, on that device
    return new.to(device).eval()


@torch.no_grad()
def quantize_model(model: nn.Module, anatomy: Anatomy, fmt: QuantFormat = "int8") -> nn.Module:
    """Replace the decoder linear layers by bitsandbytes int8 / nf4 layers, in place; returns the model.

    The model must be in floating point; its layers are quantized where they are (the CPU, or its GPU) and
    compute in the model's precision. Only the CPU path runs on this project's machines (no GPU).
    """
    _check_format(fmt)
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError("the model is already quantized (its config has a quantization_config); "
                         "quantize the floating-point model")
    linears = decoder_linears(model, anatomy)
    if any(_is_bnb_linear(child) for _, _, child in linears.values()):
        raise ValueError("the model already holds bitsandbytes layers; quantize the floating-point model")
    if fake_quantized(model):
        raise ValueError("the model is fake-quantized; call .remove() on its FakeQuantHandle first")
    compute_dtype = next(model.parameters()).dtype
    on_cpu = True
    for parent, attribute, linear in linears.values():
        if linear.weight.device.type not in ("cpu", "cuda"):
            raise ValueError(f"bitsandbytes quantizes on the CPU or a CUDA GPU; the weights are on {linear.weight.device}")
        on_cpu = on_cpu and linear.weight.device.type == "cpu"
        setattr(parent, attribute, _to_bnb(linear, fmt, compute_dtype))
    if fmt == "nf4" and on_cpu:
        prepare_bnb_for_cpu(model)
    model.config.quantization_config = bnb_config(fmt, anatomy.skip_quantization, compute_dtype)
    return model


def quantization_format(model: nn.Module) -> str | None:
    """``int8``, ``nf4`` or None, read from the model's config."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    config = config if isinstance(config, dict) else config.to_dict()
    if config.get("load_in_8bit"):
        return "int8"
    if config.get("load_in_4bit"):
        return config.get("bnb_4bit_quant_type", "fp4")
    return config.get("quant_method")


def save_quantized(model: nn.Module, processor, out_dir: str | Path, fmt: QuantFormat) -> Path:
    """Write a Hugging Face folder of a ``quantize_model`` result; it loads with ``from_pretrained`` / ``models.load``.

    Written to a temporary folder beside ``out_dir``, then renamed; an existing ``out_dir`` is replaced.
    """
    import bitsandbytes as bnb

    _check_format(fmt)
    if quantization_format(model) != fmt:
        raise ValueError(f"the model is not {fmt}-quantized (its config says {quantization_format(model)!r}); "
                         f"run quantize_model(model, anatomy, {fmt!r}) first")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if processor is not None:
            save_processor(processor, tmp)
        note = {"format": fmt, "library": "bitsandbytes", "bitsandbytes_version": bnb.__version__,
                "quantized_modules": "decoder linear layers (attention q/k/v/o, MLP); vision tower, projector, "
                                     "embeddings and lm_head in floating point",
                "loads_on": "CPU (bitsandbytes >= 0.45 CPU backend) or CUDA GPU; transformers reads "
                            "quantization_config from config.json",
                "how_to_load": "compression.models.load(folder) or AutoModelForImageTextToText.from_pretrained(folder)"}
        (tmp / "quantization.json").write_text(json.dumps(note, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ------------------------------------------------------------------------------------------ simulated (fake quant)

def _check_bits(name: str, bits: int | None) -> None:
    if bits is not None and not 2 <= bits <= 16:
        raise ValueError(f"{name} {bits} must be between 2 and 16 (or None for floating point)")


def _quantize_dequantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest over the last dimension."""
    levels = 2 ** bits - 1
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / levels
    zero = torch.round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale


def fake_quantize_weight(weight: torch.Tensor, bits: int, group: int = 128) -> torch.Tensor:
    """Per-group asymmetric min-max fake quantization of ``weight`` ``[out, in]``: groups of ``group`` input channels
    per output row (a last, shorter group when ``in`` is not a multiple)."""
    _check_bits("w_bits", bits)
    if group < 1:
        raise ValueError(f"group {group} must be a positive number of channels")
    parts = torch.split(weight.float(), min(group, weight.shape[-1]), dim=-1)
    return torch.cat([_quantize_dequantize(p, bits) for p in parts], dim=-1).to(weight.dtype)


def fake_quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token asymmetric min-max fake quantization: one scale and zero point per token (over the channels)."""
    _check_bits("a_bits", bits)
    return _quantize_dequantize(x.float(), bits).to(x.dtype)


@dataclass
class FakeQuantHandle:
    """Undo for ``fake_quantize``: ``handle.remove()`` (or leave a ``with`` block) restores the model."""

    model: nn.Module
    w_bits: int | None
    a_bits: int | None
    group: int
    _weights: dict[str, tuple[nn.Module, torch.Tensor]] = field(default_factory=dict, repr=False)
    _hooks: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        with torch.no_grad():
            for module, original in self._weights.values():
                module.weight.copy_(original)
        for hook in self._hooks:
            hook.remove()
        self._weights.clear()
        self._hooks.clear()
        if getattr(self.model, "_fake_quant_handle", None) is self:
            del self.model._fake_quant_handle

    def __enter__(self) -> "FakeQuantHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def label(self) -> str:
        return f"W{self.w_bits or 16}A{self.a_bits or 16}"


def fake_quantized(model: nn.Module) -> bool:
    return getattr(model, "_fake_quant_handle", None) is not None


@torch.no_grad()
def fake_quantize(model: nn.Module, anatomy: Anatomy, w_bits: int | None, a_bits: int | None,
                  group: int = 128) -> FakeQuantHandle:
    """Simulate WxAy on the decoder linear layers (e.g. ``w_bits=4, a_bits=4``); reversible via the handle.

    ``None`` (or 16) for either leaves that side in floating point. The originals are kept on the
    handle, so memory grows by one copy of the decoder weights while it is active.
    """
    _check_bits("w_bits", w_bits)
    _check_bits("a_bits", a_bits)
    if fake_quantized(model):
        raise ValueError("the model is already fake-quantized; call .remove() on its handle first")
    handle = FakeQuantHandle(model, w_bits, a_bits, group)
    w_bits = None if w_bits == 16 else w_bits
    a_bits = None if a_bits == 16 else a_bits

    def quantize_input(module, args):
        return (fake_quantize_activation(args[0], a_bits), *args[1:])

    for name, (_, _, linear) in decoder_linears(model, anatomy).items():
        if _is_bnb_linear(linear):
            handle.remove()
            raise ValueError(f"{name} is a bitsandbytes layer; fake quantization needs the floating-point model")
        if w_bits is not None:
            handle._weights[name] = (linear, linear.weight.detach().clone())
            linear.weight.copy_(fake_quantize_weight(linear.weight, w_bits, group))
        if a_bits is not None:
            handle._hooks.append(linear.register_forward_pre_hook(quantize_input))
    model._fake_quant_handle = handle
    return handle
