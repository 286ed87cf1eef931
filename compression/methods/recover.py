"""Recovery training after pruning: SFT on a small data fraction, optionally distilled from the original.

Follows Huang et al., "Investigating Structural Pruning and Recovery Techniques for Compressing
MLLMs" (arXiv 2507.20749; code ``YiranHuangIrene/VLMCompression``):

- supervised finetuning on the user's records, prompted with the model's own chat template, with the
  loss on the assistant turns only (every turn of a multi-turn conversation; the prompt, image tokens and
  padding are labelled -100);
- what is trained (``mode``): the projector only; LoRA on the language model's linear layers plus
  the projector (merged into the weights afterwards, so the result is a plain model); or the
  whole language model plus the projector. The vision tower stays frozen, as in LLaVA stage 2;
- distillation from the original model (the *teacher*, frozen): logits KL at temperature tau
  scaled by tau^2 (Hinton et al.), and/or hidden-state MSE on the last hidden state and on
  chosen teacher -> student layer pairs (for layer-pruned students the pairs are explicit);
  ``loss = (1 - alpha) * CE + alpha * KD``.

Distillation memory: the teacher runs first, under ``torch.inference_mode`` (no autograd state), in the chosen
half precision when the hardware's is bf16 / fp16, so its transient activations are gone before the student's,
kept for the backward pass, are made; and it uses the student's frozen vision tower
(``compression.methods.vision_sharing``): one copy of those weights, one forward of the tower per batch, whose
output the student reuses.

Written on HF Accelerate, so one loop runs on CPU, on one GPU, or under ``accelerate launch``
across GPUs and nodes (DDP; FSDP2 with ``configs/accelerate_fsdp.yaml`` for ``mode="full"``) and
across CPU processes over gloo (DDP, or FSDP2 with ``configs/accelerate_fsdp_cpu.yaml``): the launch
config chooses, ``compression.methods.distributed`` builds the matching ``Accelerator``.
``batch_size`` is the *global* batch: each process takes its share of every batch, so the
optimisation is the same whatever the number of processes. The sample order is a seeded
permutation per epoch, which makes resuming from a checkpoint (every ``checkpoint_every``
steps: model, optimizer, scheduler, step) land on exactly the batch where training stopped.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compression.data.records import Record
from compression.methods import distributed, vision_sharing
from compression.models import Anatomy
from compression.models.prompting import PromptFormat, supervised_tokens, training_inputs

Mode = Literal["none", "projector", "lora", "full"]
Distillation = Literal["none", "logits", "hidden", "hidden+logits"]
Progress = Callable[[int, int, float], None]


@dataclass
class RecoveryConfig:
    mode: Mode = "projector"
    distillation: Distillation = "none"
    temperature: float = 2.0            # paper default tau
    alpha: float = 0.5                  # weight of the KD term
    # teacher hidden_states index -> student hidden_states index; None: last hidden state only.
    hidden_layers: dict[int, int] | None = None
    epochs: int = 1
    learning_rate: float = 1e-4         # ~1e-4: 5e-4 hurt lightly pruned tiny models (shared notes)
    batch_size: int = 16                # global batch
    seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 32
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50
    checkpoint_dir: Path | None = None  # None: no checkpoints, no resume
    max_steps: int | None = None
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~30 % slower
    share_vision: bool = True  # distilling: the teacher uses the student's frozen vision tower (vision_sharing)

    def __post_init__(self) -> None:
        if self.mode not in ("none", "projector", "lora", "full"):
            raise ValueError(f"recovery mode {self.mode!r}; expected 'none', 'projector', 'lora' or 'full'")
        if self.distillation not in ("none", "logits", "hidden", "hidden+logits"):
            raise ValueError(f"distillation {self.distillation!r}; expected 'none', 'logits', 'hidden' "
                             "or 'hidden+logits'")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha {self.alpha} must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature {self.temperature} must be > 0")


@dataclass
class RecoveryResult:
    model: nn.Module                    # the trained student, LoRA merged, unwrapped
    steps: int                          # optimizer steps in total (including those before a resume)
    resumed_from: int                   # 0 when training started fresh
    seconds: float                      # wall time of this call's training loop
    losses: list[float] = field(default_factory=list)  # per step of this call, mean over processes
    supervised_tokens: int = 0          # tokens with a loss in this call, summed over processes


# ----------------------------------------------------------------------------------------- data

def encode_for_training(prompt: PromptFormat, records: list[Record]) -> dict[str, torch.Tensor]:
    """Teacher-forcing tensors for a batch of records, in the model's own prompt format, right-padded.

    ``labels`` is -100 everywhere except on the tokens of every assistant turn (multi-turn included) and
    the template's end-of-turn tokens (``compression.models.prompting.training_inputs``). Text-only
    records carry no image inputs. Shapes: ``input_ids``, ``attention_mask``, ``labels`` `[B, T]`.
    """
    return training_inputs(prompt, records)


def batch_schedule(n_samples: int, batch_size: int, epochs: int, seed: int,
                   max_steps: int | None = None) -> list[list[int]]:
    """Global batches of sample indices, one per optimizer step: a seeded permutation per epoch,
    the last incomplete batch dropped (unless the set is smaller than one batch)."""
    per_epoch = max(1, n_samples // batch_size)
    steps: list[list[int]] = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n_samples).tolist()
        steps += [order[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
    return steps[:max_steps] if max_steps else steps


# ----------------------------------------------------------------------------------------- losses

def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """`[B, T-1]` bool: positions whose logits predict an answer token (logits at t predict t+1)."""
    return labels[:, 1:] != -100


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens. `logits` `[B, T, V]`, `labels` `[B, T]`."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def logits_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                   temperature: float = 2.0) -> torch.Tensor:
    """``tau^2 * mean over masked positions of KL(softmax(t / tau) || softmax(s / tau))``.

    `student_logits`, `teacher_logits` `[B, T, V]`; `mask` `[B, T]` bool. The tau^2 factor keeps
    the gradient scale independent of tau (Hinton et al., 2015).
    """
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def hidden_kd_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                   mapping: dict[int, int], mask: torch.Tensor) -> torch.Tensor:
    """Mean over the ``teacher -> student`` pairs of the MSE between hidden states on attended tokens.

    `*_hidden` are ``output_hidden_states`` tuples (index 0 = embeddings); `mask` `[B, T]` bool.
    The hidden size is never pruned, so teacher and student states compare directly.
    """
    losses = [F.mse_loss(student_hidden[s][mask].float(), teacher_hidden[t][mask].float())
              for t, s in mapping.items()]
    return torch.stack(losses).mean()


def layer_mapping(teacher_layers: int, layers_removed: list[int] | None = None,
                  hidden_layers: dict[int, int] | Literal["kept"] | None = None) -> dict[int, int]:
    """The teacher -> student ``hidden_states`` index pairs for hidden-state KD.

    ``None``: the last hidden state only. ``"kept"``: every decoder layer the student kept,
    paired with the same layer in the teacher (``layers_removed`` are teacher layer indices);
    the last state (after the final norm in both) is always paired with the last.
    An explicit mapping is checked against both models' depths.
    """
    removed = sorted(set(layers_removed or []))
    student_layers = teacher_layers - len(removed)
    if hidden_layers is None:
        return {teacher_layers: student_layers}
    if hidden_layers == "kept":
        kept = [i for i in range(teacher_layers) if i not in removed]
        mapping = {t + 1: s + 1 for s, t in enumerate(kept[:-1])}
        mapping[teacher_layers] = student_layers
        return mapping
    for t, s in hidden_layers.items():
        if not 0 <= t <= teacher_layers:
            raise ValueError(f"hidden_layers teacher layer {t} out of range; expected 0..{teacher_layers}")
        if not 0 <= s <= student_layers:
            raise ValueError(f"hidden_layers student layer {s} out of range; expected 0..{student_layers}")
    return dict(hidden_layers)


# ----------------------------------------------------------------------------------------- modes

def lora_target_pattern(anatomy: Anatomy) -> str:
    """Regex over module names selecting every linear layer of the language model's decoder."""
    names = [anatomy.q_proj, anatomy.k_proj, anatomy.v_proj, anatomy.o_proj, anatomy.up_proj, anatomy.down_proj]
    names += [anatomy.gate_proj] if anatomy.gate_proj else []
    return (rf"(.*\.)?{re.escape(anatomy.layers)}\.\d+\.({re.escape(anatomy.attention)}|{re.escape(anatomy.mlp)})"
            rf"\.({'|'.join(map(re.escape, names))})")


def prepare_trainable(model: nn.Module, anatomy: Anatomy, mode: Mode, lora_r: int = 16,
                      lora_alpha: int = 32) -> nn.Module:
    """Freeze everything but what ``mode`` trains; for ``lora`` return the peft-wrapped model."""
    model.requires_grad_(False)
    if mode == "none":
        return model
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                            target_modules=lora_target_pattern(anatomy), bias="none")
        model = get_peft_model(model, config)
        for p in anatomy.projector_parameters(model.base_model.model):
            p.requires_grad_(True)
        return model
    for p in anatomy.projector_parameters(model):  # the family's projector / merger (Qwen: inside the vision tower)
        p.requires_grad_(True)
    if mode == "full":
        model.get_submodule(anatomy.language_model).requires_grad_(True)
        model.get_submodule(anatomy.lm_head).requires_grad_(True)
    return model


def finish_model(model: nn.Module) -> nn.Module:
    """Merge LoRA adapters into the weights (``merge_and_unload``) and leave a plain, frozen model."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------- loop

def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:  # linear warm-up, then cosine to zero (paper code: cosine)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


def read_checkpoint_step(checkpoint_dir: Path | None) -> int:
    """The optimizer step a checkpoint folder was written at (0: none)."""
    if checkpoint_dir is None or not (checkpoint_dir / "step.json").is_file():
        return 0
    return int(json.loads((checkpoint_dir / "step.json").read_text())["step"])


def recover(student: nn.Module, anatomy: Anatomy, prompt: PromptFormat, samples: list[Record], config: RecoveryConfig,
            teacher: nn.Module | None = None, progress: Progress | None = None, accelerator=None,
            log: Callable[[str], None] | None = None, hardware=None) -> RecoveryResult:
    """Train ``student`` on ``samples`` (records, prompted in ``prompt``, the model's format) as ``config`` says;
    returns the trained, merged model.

    ``teacher`` is required for distillation. ``progress(step, total, loss)`` is called on the
    main process after every optimizer step. If ``config.checkpoint_dir`` holds a checkpoint,
    training resumes from it. ``accelerator``: by default the one the ``accelerate launch`` config
    asks for (``distributed.launched_accelerator``), on ``hardware`` (``compression.hardware.Hardware``) when
    given. Every process returns the full trained model.

    Precision: a student loaded in bf16 / fp16 trains its trainable parameters in fp32 (master weights, and
    so fp32 AdamW state) under Accelerate's ``mixed_precision`` autocast; the frozen rest stays in the loaded
    precision. The teacher runs under ``inference_mode`` in the half precision of ``mixed_precision`` (an fp32
    teacher is cast in place). The trained model comes back in the precision it was loaded in.

    Distilling with ``config.share_vision`` (not under FSDP), the teacher is given the student's frozen vision
    modules (``vision_sharing.share_frozen_vision``) and keeps them after training: both models then hold the
    same, unchanged tower.
    """
    log = log or (lambda msg: None)
    if config.mode == "none":
        return RecoveryResult(finish_model(student), 0, 0, 0.0)
    if config.distillation != "none" and teacher is None:
        raise ValueError(f"distillation {config.distillation!r} needs the teacher (the original model)")
    if "hidden" in config.distillation and not config.hidden_layers:
        raise ValueError("hidden-state distillation needs a layer mapping (recover.layer_mapping)")
    accelerator = (distributed.enable_cpu_fsdp(accelerator) if accelerator is not None
                   else distributed.launched_accelerator(hardware))
    distributed.check_accelerator(accelerator)
    world = accelerator.num_processes
    if config.batch_size < world:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the {world} processes; "
                         f"expected at least one sample per process")
    log(f"recovery on {world} process(es): {accelerator.distributed_type.value}, backend "
        f"{accelerator.state.backend or 'none'}, device {accelerator.device}")
    torch.manual_seed(config.seed)
    schedule = batch_schedule(len(samples), config.batch_size, config.epochs, config.seed, config.max_steps)
    total = len(schedule)

    student.train()
    loaded_dtype = next(student.parameters()).dtype
    if config.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.mode == "lora":  # frozen embeddings: the checkpointed blocks' inputs must carry gradients
            student.enable_input_require_grads()
    model = prepare_trainable(student, anatomy, config.mode, config.lora_r, config.lora_alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # fp32 master weights (and so fp32 optimizer state); autocast computes in half
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(max(1, round(config.warmup_ratio * total)), total))
    fsdp = distributed.is_fsdp(accelerator)
    if fsdp:
        distributed.restrict_wrap_to_present_classes(accelerator.state.fsdp_plugin, model)
    # FSDP leaves only shards in the module; a weightless (meta) copy receives the gathered weights.
    template = distributed.FullModelTemplate(model) if fsdp else None
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # Each process takes its share of one global batch (accelerate's split_batches case): one
    # schedule step per optimizer step. The default steps it once per process, so under N processes
    # the learning rate ran through warm-up and cosine N times too fast.
    scheduler.split_batches = True
    shared = None
    if teacher is not None and config.distillation != "none":
        teacher = _frozen_teacher(teacher, accelerator, log)
        if config.share_vision and not fsdp:
            shared = vision_sharing.share_frozen_vision(teacher, student, anatomy)
            log(shared if isinstance(shared, str) else shared.describe())
            shared = None if isinstance(shared, str) else shared
        elif config.share_vision:
            log("vision tower not shared: FSDP shards the student's modules in place")
    start = read_checkpoint_step(config.checkpoint_dir)
    if start:
        accelerator.load_state(str(config.checkpoint_dir))
        log(f"resumed from the checkpoint at step {start}/{total}")

    started = time.time()
    try:
        losses, supervised = _train(model, teacher, optimizer, scheduler, accelerator, prompt, samples, schedule, config,
                                    start, progress, shared)
    finally:
        if shared is not None:
            shared.remove()
    seconds = time.time() - started
    accelerator.wait_for_everyone()
    if fsdp:
        model = distributed.gather_full_model(accelerator, model, template)
    else:
        model = accelerator.unwrap_model(model)
    supervised = int(accelerator.reduce(torch.tensor(supervised, device=accelerator.device), reduction="sum").item())
    model = finish_model(model)
    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    return RecoveryResult(model.to(loaded_dtype), total, start, seconds, losses, supervised)


def _frozen_teacher(teacher: nn.Module, accelerator, log: Callable[[str], None]) -> nn.Module:
    """The teacher on the training device, frozen, in eval mode, and in the half precision the run computes in
    (``accelerator.mixed_precision`` bf16 / fp16): an fp32 teacher is cast in place, which halves its bytes."""
    teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    current = next(teacher.parameters()).dtype
    if half is not None and current == torch.float32:
        log(f"teacher cast from fp32 to {half} (the run's mixed precision)")
        teacher = teacher.to(half)
    return teacher


def _train(model, teacher, optimizer, scheduler, accelerator, prompt, samples, schedule, config, start, progress,
           shared) -> tuple[list[float], int]:
    """The optimizer steps ``start..`` of ``schedule``; returns the per-step losses and this process's answer tokens."""
    world, rank, total = accelerator.num_processes, accelerator.process_index, len(schedule)
    use_logits = config.distillation in ("logits", "hidden+logits")
    use_hidden = config.distillation in ("hidden", "hidden+logits")
    mapping = config.hidden_layers or {}
    losses: list[float] = []
    supervised = 0  # answer tokens this process trained on (this call)
    for step in range(start, total):
        batch = encode_for_training(prompt, [samples[i] for i in schedule[step][rank::world]])
        supervised += supervised_tokens(batch)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        t_out = None
        if use_logits or use_hidden:
            # the teacher first: its activations are freed before the student's (kept for the backward) exist,
            # and with a shared tower it computes the image features the student then reuses
            with torch.inference_mode():
                t_out = teacher(**batch, output_hidden_states=use_hidden, use_cache=False)
        out = model(**batch, output_hidden_states=use_hidden, use_cache=False)
        ce = answer_cross_entropy(out.logits, labels)
        loss = ce
        if t_out is not None:
            kd = torch.zeros((), device=ce.device)
            if use_logits:
                kd = kd + logits_kd_loss(out.logits[:, :-1], t_out.logits[:, :-1], answer_positions(labels),
                                         config.temperature)
            if use_hidden:
                kd = kd + hidden_kd_loss(out.hidden_states, t_out.hidden_states, mapping,
                                         batch["attention_mask"].bool())
            loss = (1 - config.alpha) * ce + config.alpha * kd
        del t_out
        optimizer.zero_grad()
        accelerator.backward(loss)
        if config.max_grad_norm:
            # The prepared model's parameters: FSDP replaced the ones in `params` (they get no
            # gradients), and FSDP1 clips with its own sharded norm only for exactly this list.
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        losses.append(mean_loss)
        done = step + 1
        if progress is not None and accelerator.is_main_process:
            progress(done, total, mean_loss)
        if config.checkpoint_dir is not None and done % config.checkpoint_every == 0 and done < total:
            save_checkpoint(accelerator, config.checkpoint_dir, done)
        if shared is not None:
            shared.clear()
    return losses, supervised


def save_checkpoint(accelerator, checkpoint_dir: Path, step: int) -> None:
    """Model, optimizer, scheduler and RNG state via ``accelerator.save_state``, then ``step.json``;
    written beside the old checkpoint and swapped in, so a kill never leaves half a checkpoint."""
    tmp = checkpoint_dir.with_name(checkpoint_dir.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        old = checkpoint_dir.with_name(checkpoint_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if checkpoint_dir.exists():
            os.replace(checkpoint_dir, old)
        os.replace(tmp, checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
