"""The process group recovery trains in, as ``accelerate launch`` asked for it: DDP or FSDP, on GPUs or CPUs.

Recovery (``compression.methods.recover``) never takes a parallelism argument: the accelerate config
chooses (``configs/accelerate_fsdp.yaml`` on GPUs, ``configs/accelerate_fsdp_cpu.yaml`` for two CPU
processes, ``configs/accelerate_cpu_2proc.yaml`` or ``--multi_gpu`` for DDP). This module turns that
choice into a working ``Accelerator`` and fills the gaps accelerate 1.15 leaves on CPU and in LLaVAs:

- **No GPU, several processes.** ``Accelerator()`` joins the process group only on an accelerator
  device; on a CPU-only machine every launched process silently trains alone (``DistributedType.NO``,
  one process each). ``Accelerator(cpu=True)`` joins them over gloo (``MULTI_CPU``).
- **FSDP on CPU.** accelerate switches to ``DistributedType.FSDP`` only when the process group sits on
  an accelerator (``AcceleratorState.__init__`` tests ``MULTI_GPU``, ``MULTI_XPU``, ... but not
  ``MULTI_CPU``), and drops the FSDP plugin otherwise: ``prepare()`` would wrap the model in DDP, with
  no error. torch's FSDP2 (``fully_shard``) itself runs on CPU with gloo, so :func:`enable_cpu_fsdp`
  makes the switch accelerate would have made: it attaches the plugin (built from the ``FSDP_*``
  variables that ``accelerate launch`` exports from ``fsdp_config``) and records ``FSDP`` in *both*
  state objects. ``AcceleratorState`` re-copies ``PartialState``'s fields each time one is built
  (``prepare()`` builds some), so without the second write the state reverts to ``MULTI_CPU`` after
  ``prepare()``: the model is sharded, but ``get_state_dict`` returns shards. accelerate records its
  own choice the same way (``PartialState._shared_state["distributed_type"] = ...``). Only FSDP2:
  FSDP1 on CPU needs a CUDA-like device for ``sync_module_states`` and segfaults gathering an
  offloaded full state dict (torch 2.13).
- **The wrap list.** ``TRANSFORMER_BASED_WRAP`` takes the class names from ``model._no_split_modules``;
  ``LlavaForConditionalGeneration`` lists classes its vision-only tower lacks (``CLIPTextEmbeddings``,
  ``SiglipTextEmbeddings``, ...), and accelerate raises "Could not find the transformer layer class
  CLIPTextEmbeddings in the model." :func:`restrict_wrap_to_present_classes` keeps the ones present.
- **The trained weights.** FSDP leaves only shards in the module; :func:`gather_full_model` fills a
  weightless (meta) copy with the full weights on every process, and puts back the non-persistent
  buffers (rotary ``inv_freq``, CLIP ``position_ids``) that no state dict carries.

Checked with torch 2.13 and accelerate 1.15: on CPU (2 processes, gloo; ``tests/test_recover.py``).
The GPU path is the same code with ``nccl``; it has not been run here (no GPU).
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def launched_world_size() -> int:
    """Processes ``accelerate launch`` / torchrun started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def has_accelerator_device() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def process_group(hardware=None) -> tuple[int, int]:
    """``(rank, world size)`` of the processes ``accelerate launch`` started, joined into one process group
    (accelerate's ``PartialState``: nccl on GPUs, gloo on the CPU) if recovery has not joined them already;
    ``(0, 1)`` when run directly. For work split across the processes outside training (evaluation)."""
    world = launched_world_size()
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        from accelerate import PartialState

        cpu = not has_accelerator_device() or (hardware is not None and hardware.device == "cpu")
        PartialState(cpu=cpu)
    return dist.get_rank(), dist.get_world_size()


def gather_objects(value, hardware=None) -> list:
    """Every process's ``value``, in rank order, on every process (``all_gather_object``); ``[value]`` alone."""
    rank, world = process_group(hardware)
    if world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value, hardware=None):
    """Rank 0's ``value`` on every process (so that every rank takes the same branch)."""
    rank, world = process_group(hardware)
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launched_accelerator(hardware=None):
    """The ``Accelerator`` the launch config asked for; on a CPU-only machine with several processes,
    one that joins them over gloo (and shards with FSDP2 when the config says FSDP).

    ``hardware`` (``compression.hardware.Hardware``): the run's chosen device and precision. The CPU keeps
    training on the CPU even where a GPU is visible; a half precision becomes ``mixed_precision``."""
    from accelerate import Accelerator

    cpu = (launched_world_size() > 1 and not has_accelerator_device()) or (
        hardware is not None and hardware.device == "cpu" and has_accelerator_device())
    from accelerate.state import AcceleratorState

    kwargs = {"cpu": True} if cpu else {}
    if hardware is not None and hardware.mixed_precision != "no":
        kwargs["mixed_precision"] = hardware.mixed_precision
    # AcceleratorState is a process-wide singleton: a bf16 recovery earlier in this process would keep
    # autocasting a later fp32 one (and asking for another precision raises). Each recovery starts from the
    # launch's own state (the process group, PartialState, stays).
    AcceleratorState._reset_state(reset_partial_state=False)
    return enable_cpu_fsdp(Accelerator(**kwargs))


def check_accelerator(accelerator) -> None:
    """One clear error instead of N independent runs when the launcher started processes the
    accelerator does not see (``Accelerator()`` built on a machine without GPUs)."""
    world = launched_world_size()
    if world > 1 and accelerator.num_processes != world:
        raise ValueError(f"accelerate launch started {world} processes but the Accelerator sees "
                         f"{accelerator.num_processes}; on a machine without GPUs build it with "
                         "Accelerator(cpu=True), or pass none and recover builds it")


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def enable_cpu_fsdp(accelerator):
    """Switch a gloo (``MULTI_CPU``) accelerator to FSDP when the launch config asks for FSDP
    (``ACCELERATE_USE_FSDP``); a no-op otherwise. Returns ``accelerator``. See the module docstring."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU or not _env_flag("ACCELERATE_USE_FSDP"):
        return accelerator
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(f"fsdp_version {version} on CPU; expected fsdp_version: 2 (FSDP1 needs a GPU; "
                         "see configs/accelerate_fsdp_cpu.yaml)")
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ... from the launcher
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def restrict_wrap_to_present_classes(plugin, model: nn.Module) -> None:
    """For a transformer-based wrap without ``fsdp_transformer_layer_cls_to_wrap`` in the config, wrap
    the ``_no_split_modules`` classes that ``model`` contains (its decoder and vision encoder layers)
    instead of failing on those it lacks. ``plugin``: the accelerator's ``FullyShardedDataParallelPlugin``."""
    if os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        return  # the config named the classes: accelerate uses them as they are
    present = {type(module).__name__ for module in model.modules()}
    plugin.transformer_cls_names_to_wrap = [name for name in (getattr(model, "_no_split_modules", None) or [])
                                            if name in present]


class FullModelTemplate:
    """Taken before ``prepare()``: a weightless copy of the model and its non-persistent buffers."""

    def __init__(self, model: nn.Module):
        persistent = set(model.state_dict())
        self.buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()
                        if name not in persistent}
        self.model = copy.deepcopy(model).to("meta")


def gather_full_model(accelerator, prepared: nn.Module, template: FullModelTemplate) -> nn.Module:
    """The full trained model, on CPU, on every process, from an FSDP-prepared one.

    FSDP2: one tensor at a time is all-gathered (``DTensor.full_tensor``) and moved to host memory,
    so the device never holds more than one whole tensor; each process ends with the full model in
    host memory, as it held it before ``prepare()``. FSDP1 (GPU only): FSDP's own full state dict,
    offloaded to CPU on every rank. Tensors keep the dtype they had before ``prepare()``.
    """
    from torch.distributed.tensor import DTensor

    if accelerator.is_fsdp2:
        state = {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
                 for name, value in prepared.state_dict().items()}
    else:
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        with FullyShardedDataParallel.state_dict_type(prepared, StateDictType.FULL_STATE_DICT,
                                                      FullStateDictConfig(offload_to_cpu=True, rank0_only=False)):
            state = {name: value.detach().cpu() for name, value in prepared.state_dict().items()}
    model = template.model
    dtypes = {name: value.dtype for name, value in model.state_dict().items()}
    model.load_state_dict({name: value.to(dtypes[name]) for name, value in state.items()}, assign=True)
    for name, buffer in template.buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, buffer, persistent=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # assign=True gave tied weights (lm_head = embeddings) separate tensors
    return model
