"""bitsandbytes 4-bit layers on the CPU: which shapes its AVX512-BF16 NF4 kernel takes, and turning the
fast path off per layer for the rest (needed when loading a saved nf4 folder; see shared notes:
``AssertionError: N must be divisible by block_n``). A loading-time helper, so it lives with the loader.
"""
from __future__ import annotations

from torch import nn

NF4_BLOCK_SIZE = 64  # bitsandbytes' default 4-bit block size
CPU_NF4_BLOCK_N = 32  # output rows per tile in bitsandbytes' AVX512-BF16 NF4 kernel


def nf4_cpu_kernel_fits(in_features: int, out_features: int) -> bool:
    """Whether bitsandbytes' AVX512-BF16 NF4 kernel accepts this shape (else it raises at the first forward)."""
    return out_features % CPU_NF4_BLOCK_N == 0 and in_features % NF4_BLOCK_SIZE == 0


def prepare_bnb_for_cpu(model: nn.Module) -> list[str]:
    """Turn off the AVX512-BF16 NF4 fast path on layers whose shape it cannot take; returns their names.

    Call after loading a saved nf4 model (``models.load`` of a folder with a ``quantization_config``).
    """
    import bitsandbytes as bnb

    disabled = []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and not nf4_cpu_kernel_fits(module.in_features, module.out_features):
            module.support_avx512bf16_for_cpu = False
            disabled.append(name)
    return disabled
