"""Measured peaks: each CPU stage has its own peak (Linux VmHWM, cleared between stages), not the process's
peak so far, and a child process's peak is its own, not its parent's."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compression.measure import peaks

ROOT = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="VmHWM / clear_refs are Linux's")


@linux_only
def test_each_cpu_stage_has_its_own_peak():
    from compression.hardware import resolve

    recorder = peaks.StagePeaks(resolve("cpu", "fp32"))
    big = np.ones(400_000_000 // 8)  # 400 MB touched
    del big
    first = recorder.record("big")
    small = np.ones(40_000_000 // 8)  # 40 MB
    del small
    second = recorder.record("small")
    assert first - second > 300e6  # the second stage does not inherit the first's peak
    assert "cleared between stages" in recorder.to_dict()["measure"]


@linux_only
def test_a_child_process_peak_is_its_own_not_its_parents():
    big = np.ones(600_000_000 // 8)  # the parent holds 600 MB while it starts the child
    code = ("import json, sys; sys.path.insert(0, %r); from compression.measure.peaks import peak_rss_bytes; "
            "print(json.dumps(peak_rss_bytes()))" % str(ROOT))
    child = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert peaks.peak_rss_bytes() > 600e6 and child < 300e6  # ru_maxrss would report the parent's 600 MB here
    del big
