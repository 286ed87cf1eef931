"""Which CPU kernels an inference forward runs on: PyTorch's eager linears, or oneDNN with pre-packed weights.

``eager`` (the default) is what ``model(**inputs)`` does: on the CPU, an fp32 ``nn.Linear`` is a BLAS GEMM
that lays out (packs) the weight for its inner loop on every call. That work depends on the weight, not on
the number of rows, so a GEMM loses efficiency as the sequence gets shorter: measured on a 2-core AVX2 EPYC,
a 4096 -> 11008 fp32 linear ran at 87 GFLOPS on 589 rows, 56 on 157 and 37 on 85 (``benchmarks/bench_scale.py``
measures and writes the machine's own figures). Visual-token pruning leaves exactly such short sequences, so under eager
kernels its prefill speedup falls well short of its FLOP ratio for reasons that have nothing to do with
the method.

``onednn`` packs each linear's weight once into oneDNN's blocked layout (``torch.ops.mkldnn``, the layout
PyTorch's own inductor uses when it freezes a model for the CPU) and runs every multi-row call on it; the
same linear then ran at 101, 105 and 92 GFLOPS on those row counts. Single-row calls (decoding, and the
last-position LM head of a prefill) stay on the eager kernel, which is as fast or faster for one row. The
packed copy is extra memory, one more copy of every packed linear's weight, for as long as it is in use:
:func:`packed` checks it against the free memory before packing and restores the models on exit.

Inference only: a call that needs gradients runs on the eager module. The output equals eager's to float
rounding (relative 1e-6 in fp32: a different summation order).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from compression.measure.memory import available_bytes

KERNELS: tuple[str, ...] = ("eager", "onednn")


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """fp32 always; bf16 where oneDNN has a bf16 path on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if bf16 is not None and bf16() else (torch.float32,)


class KernelError(ValueError):
    """Kernels this machine or model cannot run: one line naming the value and what is expected."""


def check_name(name: str) -> str:
    if name not in KERNELS:
        raise KernelError(f"kernels {name!r}: expected one of {', '.join(KERNELS)}")
    return name


def onednn_problem() -> str | None:
    """Why oneDNN pre-packed linears cannot run on this PyTorch build, or None when they can."""
    if not torch.backends.mkldnn.is_available():
        return "kernels 'onednn': this PyTorch build has no oneDNN (torch.backends.mkldnn is not available)"
    for op in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(torch.ops.mkldnn, op):
            return f"kernels 'onednn': this PyTorch build lacks torch.ops.mkldnn.{op}"
    return None


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose multi-row calls run on a oneDNN-packed copy of its weight.

    It keeps the original module (``.eager``): single-row and gradient-needing calls run there, and
    :func:`packed` puts it back in place on exit.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.eager = linear
        with torch.no_grad():
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_calls = 0  # calls that ran on the packed weight (the rest ran on ``eager``)

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight (shapes, dtype, device) sees the original
        return self.eager.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.eager.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= 1 or (torch.is_grad_enabled() and (x.requires_grad or self.eager.weight.requires_grad)) \
                or x.dtype != self.eager.weight.dtype:
            return self.eager(x)
        bias = self.eager.bias.detach() if self.eager.bias is not None else None
        self.packed_calls += 1
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, bias, "none", [], "")


def _skipped(model: nn.Module) -> set[int]:
    """Linears left eager: the output embeddings (one row per prefill with ``logits_to_keep=1``, and often
    tied to the input embeddings)."""
    out = getattr(model, "get_output_embeddings", lambda: None)()
    return {id(out)} if out is not None else set()


def packable_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """``(parent, attribute, linear)`` for every plain ``nn.Linear`` on the CPU in a :func:`packable_dtypes`
    precision that would be packed (quantized linears, which subclass ``nn.Linear``, meta tensors, the LM head
    and linears on a GPU are left as they are)."""
    skip = _skipped(model)
    dtypes = packable_dtypes()
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child) is nn.Linear and id(child) not in skip and child.weight.device.type == "cpu" \
                    and child.weight.dtype in dtypes and not child.weight.is_meta:
                found.append((parent, attr, child))
    return found


@dataclass
class PackReport:
    """What :func:`packed` packed: linears, the bytes of the packed copies, and the models it covered."""

    kernels: str
    linears: int = 0
    packed_bytes: int = 0
    models: int = 0
    notes: list[str] = field(default_factory=list)


@contextmanager
def packed(models: Iterable[nn.Module], kernels: str = "onednn",
           headroom: float = 0.9) -> Iterator[PackReport]:
    """Run the models on ``kernels`` inside the ``with`` block; put them back as they were on exit.

    ``eager`` does nothing. ``onednn`` replaces every packable linear (:func:`packable_linears`) with a
    :class:`PackedLinear`; a module shared by several models is packed once. Before packing it checks that
    the packed copies fit in ``headroom`` of the free memory, and raises :class:`KernelError` naming both
    figures when they do not (nothing is changed then).
    """
    check_name(kernels)
    report = PackReport(kernels=kernels)
    models = list(models)
    if kernels == "eager":
        yield report
        return
    problem = onednn_problem()
    if problem:
        raise KernelError(problem)
    sites: dict[int, list[tuple[nn.Module, str, nn.Linear]]] = {}
    seen_models: set[int] = set()
    for model in models:
        if id(model) in seen_models:
            continue
        seen_models.add(id(model))
        found = packable_linears(model)
        for parent, attr, linear in found:
            sites.setdefault(id(linear), []).append((parent, attr, linear))
        packable = {id(linear) for _, _, linear in found} | _skipped(model)
        left = sum(1 for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in packable)
        if left:
            report.notes.append(f"{left} linear(s) left eager (dtype, device or quantization not packable)")
    need = sum(entries[0][2].weight.numel() * entries[0][2].weight.element_size() for entries in sites.values())
    free = available_bytes("cpu")
    if need > headroom * free:
        raise KernelError(f"kernels 'onednn': the packed copies need {need / 2**30:.1f} GiB and "
                          f"{headroom * free / 2**30:.1f} GiB is free ({headroom:.0%} of the available memory); "
                          f"measure fewer models at once or use kernels 'eager'")
    swapped: list[tuple[nn.Module, str, nn.Linear]] = []
    try:
        for entries in sites.values():
            replacement = PackedLinear(entries[0][2])
            for parent, attr, linear in entries:
                setattr(parent, attr, replacement)
                swapped.append((parent, attr, linear))
        report.linears, report.packed_bytes, report.models = len(sites), need, len(seen_models)
        yield report
    finally:
        for parent, attr, linear in swapped:
            setattr(parent, attr, linear)
