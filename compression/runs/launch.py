"""A recipe across several processes: the ``accelerate launch`` command its ``hardware`` section asks for.

A recipe with ``hardware.processes: N`` (N > 1) runs as N processes of the same pipeline
(``compression.runs.pipeline``), one per GPU (or, on a machine without GPUs, N CPU processes over gloo):

- recovery trains data-parallel (DDP, accelerate's ``--multi_gpu`` torchrun launcher) or fully sharded (FSDP2,
  ``configs/accelerate_fsdp.yaml`` on GPUs, ``configs/accelerate_fsdp_cpu.yaml`` on the CPU). ``parallelism:
  auto`` takes FSDP for ``mode: full`` (the whole language model's weights, gradients and AdamW state are what
  must be sharded) and DDP for projector and LoRA recovery (small trainable parts; replicas are cheaper);
- evaluation is split: every process answers every N-th record and rank 0 gathers the answers
  (``compression.measure.evaluate.accuracy(split=True)``); rank 0 alone times latency and writes the run folder.

The job runner (``compression.runs.jobs``) gives such a job N slots and runs this command in its worker; by hand
the same is ``accelerate launch --num_processes N ... -m compression run recipe.yaml`` (README, "Scaling recovery
across GPUs"). Every process of one launch meets the others on its own free port, so that two launched jobs on
one machine never share a rendezvous.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from compression.runs.recipe import Recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def parallelism(recipe: Recipe) -> str:
    """``ddp`` or ``fsdp``: the recipe's choice, or for ``auto`` FSDP when the whole language model trains."""
    chosen = recipe.hardware.parallelism
    if chosen != "auto":
        return chosen
    return "fsdp" if recipe.recovery.mode == "full" else "ddp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(recipe: Recipe, target: list[str], gpus: bool, mixed_precision: str = "no",
                   port: int | None = None) -> list[str]:
    """``python -m accelerate.commands.launch ... -m <target>`` for ``recipe.hardware.processes`` processes.

    ``target``: the module and its arguments each process runs (``["compression", "worker", JOB]``);
    ``gpus``: whether the processes each take a GPU (else gloo on the CPU); ``mixed_precision``: accelerate's
    name for the recipe's precision (``no``, ``bf16``, ``fp16``)."""
    n = recipe.hardware.processes
    if n < 2:
        raise ValueError(f"hardware.processes {n}: a launch needs at least 2 processes; run it directly")
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if parallelism(recipe) == "fsdp":
        config = CONFIGS / ("accelerate_fsdp.yaml" if gpus else "accelerate_fsdp_cpu.yaml")
        command += ["--config_file", str(config)]
    else:
        # accelerate's torchrun launcher; without CUDA the processes join over gloo (`--cpu` would start one)
        command += ["--multi_gpu"]
    command += ["--num_processes", str(n), "--num_machines", "1", "--mixed_precision", mixed_precision,
                "--dynamo_backend", "no", "--main_process_port", str(port or free_port()), "-m", *target]
    return command
