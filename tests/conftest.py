import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# transformers attaches its log handler to sys.stderr on first use; done here, before any test's capsys
# swaps stderr, a later test never writes to a closed capture stream ("I/O operation on closed file")
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.get_logger("transformers")

# under pytest-xdist (.ci/test: -n auto) each worker gets its share of the cores, so the workers do not fight
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _workers > 1:
    import torch  # noqa: E402

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own runtime store, so tests never see each other's jobs or results."""
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def reference_path():
    from compression.models.reference import REFERENCE_PATH

    if not (REFERENCE_PATH / "model.safetensors").is_file():
        pytest.fail(f"the shipped reference model is missing at {REFERENCE_PATH}")
    return REFERENCE_PATH


@pytest.fixture
def one_thread():
    """One torch thread for the test: two shared cores, and one thread per test process is several times faster
    than two fighting (workers and launched processes get theirs from OMP_NUM_THREADS)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quiet_workers(monkeypatch, one_thread):
    """For tests that start job workers: workers inherit one thread each (2 shared cores), fast heartbeats and
    one job at a time; afterwards no worker is left behind."""
    import signal

    from compression.runs import jobs

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("COMPRESSION_HEARTBEAT_S", "0.3")
    monkeypatch.setenv("COMPRESSION_MAX_JOBS", "1")
    yield
    for process in list(jobs._children.values()):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    jobs._children.clear()
