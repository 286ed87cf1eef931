"""Measured peak memory per pipeline stage, on the run's device.

On a GPU: ``torch.cuda.max_memory_allocated`` since the previous stage (the counter is reset after each
reading), so every stage has its own peak. On the CPU: the process's peak resident set so far
(``getrusage``'s ``ru_maxrss``), which only grows; a stage's own figure is therefore an upper bound
beyond the first stage that reached it, and the record says so. A run's ``metrics.json`` keeps them under
``memory`` so that Results can show the memory plan's prediction beside what was measured.
"""
from __future__ import annotations

import resource
import sys
from typing import Any


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class StagePeaks:
    """``record(stage)`` after each stage; ``to_dict()`` for the run's metrics."""

    def __init__(self, hardware):
        import torch

        self.device = hardware.device
        self.gpu = hardware.is_gpu
        self.stages: dict[str, int] = {}
        if self.gpu:
            torch.cuda.reset_peak_memory_stats(self.device)

    def record(self, stage: str) -> int:
        import torch

        if self.gpu:
            value = int(torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            value = peak_rss_bytes()
        self.stages[stage] = value
        return value

    def to_dict(self) -> dict[str, Any]:
        kind = ("torch.cuda.max_memory_allocated per stage" if self.gpu
                else "peak RSS of the process up to the end of each stage (getrusage; grows only)")
        return {"device": self.device, "measure": kind, "peak_bytes": dict(self.stages)}
