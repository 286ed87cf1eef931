"""One frozen vision tower for teacher and student while distilling: one copy of its weights, one forward per batch.

Structural pruning touches only the language model, and recovery never trains the vision tower (LLaVA stage 2;
``compression.methods.recover``), so the student's tower is the teacher's, weight for weight. Distilling the
usual way (a frozen teacher beside the student, as in Hinton et al. 2015 and the paper's code,
``YiranHuangIrene/VLMCompression``) nevertheless holds two copies of it and runs it twice per batch. Here:

- **weights**: the teacher is given the student's module objects for the frozen part (the family's
  ``frozen_vision``: the whole tower; for Qwen the patch embedding and blocks before the trainable merger), after a
  check that both hold equal tensors; the teacher's own copy is then freed. The sharing stays after training:
  both models keep pointing at the same, unchanged, frozen modules.
- **compute**: each shared module (each layer of a shared ``ModuleList``) caches its output for the step. The first
  call (the teacher's, which runs first) computes it, outside ``inference_mode`` and without autograd, so the
  student may keep it for its backward pass; a later call with equal inputs (tensors compared by value) takes it
  instead of recomputing, and the entry is dropped. ``clear`` empties the cache after every step; a call that
  finds no equal entry just computes, so a mismatch costs time, never correctness.

The shared modules are put in ``eval`` mode (one module serves both models, and the teacher is in eval mode; the
supported towers have no dropout, so this changes nothing numerically). Not used under FSDP, which shards the
student's modules in place.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compression.models import Anatomy


def _same(a: Any, b: Any) -> bool:
    """Equal call arguments: tensors by value (and shape, dtype, device), containers item by item."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # an object without a usable ==: not known to be equal
        return False


def _fresh(output: Any) -> Any:
    """A shallow copy of a ``ModelOutput`` (or dict), so that one model setting a field (LLaVA writes its projected
    features into ``pooler_output``) does not change what the other reads; tensors and tuples are not copied."""
    return copy.copy(output) if isinstance(output, dict) else output


@dataclass
class SharedVision:
    """The shared modules of one distillation run and their output cache; ``computed`` / ``reused`` count calls."""

    paths: tuple[str, ...]
    shared_bytes: int                        # the teacher's vision weights that are no longer held twice
    computed: int = 0
    reused: int = 0
    _entries: list = field(default_factory=list)
    _wrapped: list = field(default_factory=list)

    def describe(self) -> str:
        return (f"vision tower shared by teacher and student ({', '.join(self.paths)}): "
                f"{self.shared_bytes / 2**20:.1f} MiB of weights held once, its output computed once per batch")

    def clear(self) -> None:
        """Forget this step's outputs (called after every optimizer step)."""
        self._entries.clear()

    def remove(self) -> None:
        """Stop caching (the weights stay shared)."""
        self.clear()
        for module, previous in self._wrapped:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._wrapped.clear()

    def _wrap(self, module: nn.Module) -> None:
        previous = module.__dict__.get("forward")
        inner = module.forward

        def forward(*args, **kwargs):
            for i, (owner, args_seen, kwargs_seen, output) in enumerate(self._entries):
                if owner is module and _same(args_seen, args) and _same(kwargs_seen, kwargs):
                    del self._entries[i]  # each output serves one later call: then its memory goes
                    self.reused += 1
                    return _fresh(output)
            # outside inference_mode: the teacher runs under it, and the student must be able to save this output
            # for its backward pass; no autograd: the module is frozen
            with torch.inference_mode(False), torch.no_grad():
                output = inner(*args, **kwargs)
            self._entries.append((module, args, kwargs, _fresh(output)))
            self.computed += 1
            return output

        module.forward = forward
        self._wrapped.append((module, previous))


def _why_not_identical(a: nn.Module, b: nn.Module) -> str | None:
    """None when the two modules hold the same tensors by name, shape, dtype, device and value; else why not."""
    ta = dict(a.named_parameters()) | dict(a.named_buffers())
    tb = dict(b.named_parameters()) | dict(b.named_buffers())
    if ta.keys() != tb.keys():
        return "their tensor names differ"
    for name, x in ta.items():
        y = tb[name]
        if (x.shape, x.dtype, x.device) != (y.shape, y.dtype, y.device):
            return f"{name}: {tuple(x.shape)} {x.dtype} {x.device} vs {tuple(y.shape)} {y.dtype} {y.device}"
        if not torch.equal(x, y):
            return f"{name} holds different values"
    return None


def share_frozen_vision(teacher: nn.Module, student: nn.Module, anatomy: Anatomy) -> SharedVision | str:
    """Give ``teacher`` the student's frozen vision modules (``anatomy.frozen_vision``) and cache their outputs.

    Both are the unwrapped ``...ForConditionalGeneration`` models (not the peft / DDP wrappers), on one device.
    Returns the :class:`SharedVision`, or one line saying why nothing was shared (a module missing, trainable or
    not identical), in which case both models are left as they were.
    """
    pairs = []
    for path in anatomy.frozen_vision:
        try:
            mine, theirs = student.get_submodule(path), teacher.get_submodule(path)
        except AttributeError:
            return f"vision tower not shared: {path} is missing from the teacher or the student"
        if mine is theirs:
            continue  # already shared (a second recovery with the same teacher)
        if any(p.requires_grad for p in mine.parameters()):
            return f"vision tower not shared: the student trains {path}"
        reason = _why_not_identical(mine, theirs)
        if reason:
            return f"vision tower not shared: {path} differs between teacher and student ({reason})"
        pairs.append((path, mine, theirs))
    shared_bytes = 0
    for path, mine, theirs in pairs:
        shared_bytes += sum(p.numel() * p.element_size() for p in theirs.parameters())
        teacher.set_submodule(path, mine)
    shared = SharedVision(tuple(anatomy.frozen_vision), shared_bytes)
    for path in anatomy.frozen_vision:
        module = student.get_submodule(path).eval()
        for unit in (module if isinstance(module, nn.ModuleList) else [module]):
            shared._wrap(unit)
    return shared


def unique_parameter_bytes(*models: nn.Module) -> int:
    """Bytes of the distinct parameter tensors of ``models`` together (a tensor two models share counts once)."""
    seen: dict[tuple, int] = {}
    for model in models:
        for p in model.parameters():
            seen[(p.device, p.data_ptr())] = p.numel() * p.element_size()
    return sum(seen.values())
