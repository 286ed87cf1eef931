"""Measured peak memory per pipeline stage, on the run's device.

On a GPU: ``torch.cuda.max_memory_allocated`` since the previous stage (the counter is reset after each
reading), so every stage has its own peak. On the CPU under Linux: the process's resident high-water mark
(``VmHWM`` in ``/proc/self/status``), cleared after each reading (``/proc/self/clear_refs``), so every stage
has its own peak there too. Elsewhere: ``getrusage``'s ``ru_maxrss``, which only grows (and on Linux even
carries the parent's peak across ``fork`` + ``exec``); a stage's figure is then an upper bound beyond the first
stage that reached it, and the record says so. A run's ``metrics.json`` keeps them under
``memory`` so that Results can show the memory plan's prediction beside what was measured.
"""
from __future__ import annotations

import resource
import sys
from typing import Any


def peak_rss_bytes() -> int:
    """This process's own peak resident set size since it started or since ``reset_peak_rss`` (Linux:
    ``VmHWM``; elsewhere ``ru_maxrss``: macOS reports bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Start a new peak: the high-water mark becomes the current resident set (Linux ``clear_refs`` 5).
    Returns whether it could (False elsewhere: peaks then only grow)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class StagePeaks:
    """``record(stage)`` after each stage; ``to_dict()`` for the run's metrics."""

    def __init__(self, hardware):
        import torch

        self.device = hardware.device
        self.gpu = hardware.is_gpu
        self.stages: dict[str, int] = {}
        self.per_stage = True
        if self.gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.per_stage = reset_peak_rss()

    def record(self, stage: str) -> int:
        import torch

        if self.gpu:
            value = int(torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            value = peak_rss_bytes()
            if self.per_stage:
                reset_peak_rss()
        self.stages[stage] = value
        return value

    def to_dict(self) -> dict[str, Any]:
        kind = ("torch.cuda.max_memory_allocated per stage" if self.gpu
                else "peak RSS of the process per stage (VmHWM, cleared between stages)" if self.per_stage
                else "peak RSS of the process up to the end of each stage (getrusage; grows only)")
        return {"device": self.device, "measure": kind, "peak_bytes": dict(self.stages)}
