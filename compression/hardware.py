"""Where the studio computes and in which precision: chosen in one place, asked by every stage.

A recipe's ``hardware: {device, dtype}``, the CLI's ``--device`` / ``--dtype`` and the dashboard's sidebar
all resolve through :func:`resolve`:

- ``device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``. ``auto`` is the first GPU when one is
  visible (``torch.cuda``), else Apple's ``mps`` when present, else the CPU.
- ``dtype``: ``auto`` | ``bf16`` | ``fp16`` | ``fp32``. ``auto`` is bf16 on a GPU that supports it (fp16 on
  one that does not), fp32 on the CPU and on ``mps``. bf16 on the CPU is allowed on request: fast where the
  CPU has AVX-512 BF16 or AMX, emulated elsewhere (the AVX2-only EPYC this was last measured on runs bf16
  matmuls several times slower than fp32).

Asking for a device that is not there, or a precision the device lacks, is one line naming the value and
what is available (``device 'cuda': no GPU is visible; available: cpu``). The resolved pair is printed by
the CLI, recorded in a run's ``metrics.json`` and shown beside every measured figure.

Recovery trains in the chosen precision through Accelerate's ``mixed_precision`` while the trained weights
and the AdamW state stay fp32 (``compression.methods.recover``).
"""
from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Literal

DeviceName = str  # "auto", "cpu", "cuda", "cuda:N", "mps"
DtypeName = Literal["auto", "bf16", "fp16", "fp32"]
DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")
# the short names every figure uses, and torch's own names for them (also accepted on input)
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """``fp32`` / ``bf16`` / ``fp16`` (or torch's ``float32`` …) as a torch dtype."""
    import torch

    short = {v: k for k, v in TORCH_NAMES.items()}.get(name.lower(), name.lower())
    if short not in TORCH_NAMES:
        raise HardwareError(f"dtype {name!r}: expected one of {', '.join(TORCH_NAMES)}")
    return getattr(torch, TORCH_NAMES[short])


def dtype_name(dtype) -> str:
    """A torch dtype's short name (``bf16``), or torch's name for one without a short name."""
    text = str(dtype).replace("torch.", "")
    return {v: k for k, v in TORCH_NAMES.items()}.get(text, text)


class HardwareError(ValueError):
    """A device or precision this machine does not have; one line naming the value and what is available."""


@dataclass(frozen=True)
class Hardware:
    """A resolved device and precision. ``requested`` keeps what was asked (for the record)."""

    device: str                     # "cpu", "cuda:0", "mps"
    dtype_name: str                 # "fp32", "bf16", "fp16"
    requested: tuple[str, str] = ("auto", "auto")
    description: str = ""           # e.g. "NVIDIA H100 80GB HBM3" or the CPU's name

    @property
    def dtype(self):
        return torch_dtype(self.dtype_name)

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def mixed_precision(self) -> str:
        """Accelerate's ``mixed_precision`` for training in this precision (weights and AdamW state stay fp32)."""
        return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.dtype_name]

    @property
    def label(self) -> str:
        """``cpu, fp32`` / ``cuda:0 (NVIDIA H100), bf16``: what a measured figure was measured on."""
        where = f"{self.device} ({self.description})" if self.description and self.device != "cpu" else self.device
        return f"{where}, {self.dtype_name}"

    def to_dict(self) -> dict:
        return {"device": self.device, "dtype": self.dtype_name, "requested": {"device": self.requested[0],
                "dtype": self.requested[1]}, "description": self.description, "label": self.label}


def available_devices() -> list[str]:
    """Every device this process can compute on: ``cpu``, then ``cuda:0 .. cuda:N-1``, then ``mps``."""
    import torch

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def _supported_dtypes(device: str) -> list[str]:
    import torch

    if device.startswith("cuda"):
        index = int(device.split(":")[1])
        major, _ = torch.cuda.get_device_capability(index)
        return ["bf16", "fp16", "fp32"] if major >= 8 else ["fp16", "fp32"]  # bf16 tensor cores from Ampere on
    if device == "mps":
        return ["fp16", "fp32"]
    return ["bf16", "fp32"]  # fp16 matmuls on CPU are partial and slow: not offered


def resolve(device: DeviceName = "auto", dtype: DtypeName | str = "auto") -> Hardware:
    """The device and precision to use; raises :class:`HardwareError` (one line) for what is not there."""
    import torch

    requested = (str(device), str(dtype))
    available = available_devices()
    device = (device or "auto").strip().lower()
    # under `accelerate launch` each process computes on its own GPU: the LOCAL_RANK-th visible one
    local = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    if device == "auto":
        gpus = [d for d in available if d.startswith("cuda")]
        device = (gpus[local] if local < len(gpus) else gpus[0]) if gpus else "mps" if "mps" in available else "cpu"
    elif device == "cuda":
        device = f"cuda:{local}"
    if device.startswith("cuda") and device not in available:
        gpus = [d for d in available if d.startswith("cuda")]
        seen = f"{len(gpus)} GPU(s) are visible" if gpus else "no GPU is visible (torch.cuda.device_count() == 0)"
        raise HardwareError(f"device {requested[0]!r}: {seen}; available: {', '.join(available)}")
    if device not in available:
        raise HardwareError(f"device {requested[0]!r} is not available; expected auto or one of {', '.join(available)}")
    supported = _supported_dtypes(device)
    dtype = (dtype or "auto").strip().lower()
    aliases = {**{v: k for k, v in TORCH_NAMES.items()}, "half": "fp16"}
    dtype = aliases.get(dtype, dtype)
    if dtype == "auto":
        dtype = supported[0] if device.startswith("cuda") else "fp32"
    if dtype not in ("bf16", "fp16", "fp32"):
        raise HardwareError(f"dtype {requested[1]!r}: expected one of {', '.join(DTYPE_NAMES)}")
    if dtype not in supported:
        raise HardwareError(f"dtype {requested[1]!r}: {device} does not support {dtype}; available: "
                            f"{', '.join(supported)}")
    if device.startswith("cuda"):
        description = torch.cuda.get_device_name(int(device.split(":")[1]))
    else:
        import platform

        description = platform.processor() or platform.machine()
    return Hardware(device, dtype, requested, description)


def cpu() -> Hardware:
    """The CPU in fp32: what tests and the reference model default to."""
    return resolve("cpu", "fp32")


def device_memory(hw: Hardware) -> tuple[int, int]:
    """``(total, free)`` bytes of the device ``hw`` computes on: the GPU's (``torch.cuda.mem_get_info``), or
    the machine's RAM (total, and available to a new allocation) for the CPU and ``mps``."""
    if hw.is_gpu:
        import torch

        free, total = torch.cuda.mem_get_info(int(hw.device.split(":")[1]))
        return int(total), int(free)
    import psutil  # what compression.measure.memory.available_bytes reads too

    ram = psutil.virtual_memory()
    return int(ram.total), int(ram.available)
