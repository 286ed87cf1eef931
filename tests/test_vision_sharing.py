"""Distillation with one frozen vision tower for teacher and student (``compression.methods.vision_sharing``):
the same losses, gradients and weights as two towers, half the tower's forward calls, one copy of its weights;
the teacher under ``inference_mode`` and in the run's half precision. Tiny random models of the families'
real structure (``tests/families.py``)."""
import copy

import pytest
import torch
from torch import nn

from compression import hardware, models
from compression.methods import importance, prune, recover, vision_sharing
from compression.models import parameter_counts
from tests.families import BUILDERS
from tests.tiny import write_llava_dataset

STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    data = write_llava_dataset(tmp_path_factory.mktemp("data"), n=6)
    return importance.calibration_selection({"path": str(data)}, n=4).records


@pytest.fixture(scope="module")
def loaded_of(tmp_path_factory):
    built: dict = {}

    def get(name):
        if name not in built:
            built[name] = models.load(str(BUILDERS[name](tmp_path_factory.mktemp(name) / "model")))
        return built[name]
    return get


def _units(model: nn.Module, anatomy) -> list[nn.Module]:
    """The frozen vision modules whose outputs are cached: each listed module, or each layer of a listed ModuleList."""
    modules = [model.get_submodule(path) for path in anatomy.frozen_vision]
    return [unit for m in modules for unit in (m if isinstance(m, nn.ModuleList) else [m])]


def _frozen_leaves(model: nn.Module, anatomy) -> list[nn.Module]:
    """The modules with weights inside the cached units (a unit's own hooks run even when its output is reused):
    each call of one is the tower computing."""
    return [m for unit in _units(model, anatomy) for m in unit.modules()
            if m is not unit and not list(m.children()) and list(m.parameters(recurse=False))]


def _count_calls(*models_and_anatomies) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1
    for model, anatomy in models_and_anatomies:
        for module in _frozen_leaves(model, anatomy):
            module.register_forward_hook(hook)
    return calls


def _distil(loaded, records, share: bool, **config):
    """``STEPS`` steps of full finetuning with hidden + logits KD of a layer-pruned student; the gradients of every
    step, the vision tower's calls and the trained student."""
    teacher = copy.deepcopy(loaded.model)
    plan = prune.make_plan((teacher, loaded.anatomy), "layer", ratio=0.2)
    student, anatomy = prune.apply_plan(copy.deepcopy(teacher), loaded.anatomy, plan)
    calls = _count_calls((teacher, anatomy), (student, anatomy))
    grads: list[dict[str, torch.Tensor]] = []

    def keep_gradients(step, total, loss):  # called after optimizer.step(): the step's gradients are still there
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    settings = dict(mode="full", distillation="hidden+logits", batch_size=2, epochs=2, max_steps=STEPS,
                    learning_rate=1e-3, share_vision=share,
                    hidden_layers=recover.layer_mapping(loaded.anatomy.num_layers, plan.layers_removed, "kept"))
    settings.update(config)
    lines: list[str] = []
    result = recover.recover(student, anatomy, loaded.prompt, records, recover.RecoveryConfig(**settings),
                             teacher=teacher, progress=keep_gradients, log=lines.append)
    return result, teacher, grads, calls[0], lines


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "gemma3", "qwen3_vl"])
def test_shared_tower_gives_the_same_losses_and_gradients_with_one_forward_and_one_copy(name, loaded_of, records):
    loaded = loaded_of(name)
    alone, alone_teacher, alone_grads, alone_calls, _ = _distil(loaded, records, share=False)
    shared, shared_teacher, shared_grads, shared_calls, lines = _distil(loaded, records, share=True)
    assert any(line.startswith("vision tower shared by teacher and student") for line in lines)

    assert len(shared.losses) == STEPS and shared.losses == pytest.approx(alone.losses, rel=1e-6, abs=1e-7)
    assert len(shared_grads) == len(alone_grads) == STEPS
    for step, (a, b) in enumerate(zip(alone_grads, shared_grads)):
        assert a.keys() == b.keys() and len(a) > 10
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-7, msg=f"step {step}: {n}")
    for (n, a), b in zip(alone.model.state_dict().items(), shared.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=n)

    # one forward of the frozen tower per batch (the teacher's, reused by the student), not two
    one_forward = _count_calls((loaded.model, loaded.anatomy))
    batch = recover.encode_for_training(loaded.prompt, records[:2])
    batch.pop("labels")
    with torch.no_grad():
        loaded.model(**batch)
    assert one_forward[0] > 0
    assert alone_calls == 2 * STEPS * one_forward[0] and shared_calls == STEPS * one_forward[0]

    # the teacher's own vision weights are gone: it holds the student's modules
    vision_bytes = parameter_counts(loaded.model, loaded.anatomy)["vision"] * 4  # fp32
    assert vision_bytes > 0
    together_alone = vision_sharing.unique_parameter_bytes(alone_teacher, alone.model)
    together_shared = vision_sharing.unique_parameter_bytes(shared_teacher, shared.model)
    assert together_alone - together_shared == vision_bytes
    for path in loaded.anatomy.frozen_vision:
        assert shared_teacher.get_submodule(path) is shared.model.get_submodule(path)
        assert alone_teacher.get_submodule(path) is not alone.model.get_submodule(path)
    # and the shared tower is still the original's, weight for weight
    original = dict(loaded.model.named_parameters())
    for path in loaded.anatomy.frozen_vision:
        for n, p in shared.model.get_submodule(path).named_parameters():
            assert torch.equal(p, original[f"{path}.{n}"]), n


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_familys_frozen_vision_is_untrained_and_is_the_tower_without_its_projector(name, loaded_of):
    loaded = loaded_of(name)
    model, anatomy = loaded.model, loaded.anatomy
    frozen = {id(p) for path in anatomy.frozen_vision for p in model.get_submodule(path).parameters()}
    projector = {id(p) for p in anatomy.projector_parameters(model)}
    assert frozen and not frozen & projector
    # together they are the tower's parameters that are not the projector's: what the memory plan subtracts
    frozen_count = sum(p.numel() for path in anatomy.frozen_vision for p in model.get_submodule(path).parameters())
    assert frozen_count == parameter_counts(model, anatomy)["vision"]
    for mode in ("projector", "lora", "full"):
        trained = recover.prepare_trainable(copy.deepcopy(model), anatomy, mode, lora_r=4)
        base = trained.base_model.model if mode == "lora" else trained
        assert not any(p.requires_grad for path in anatomy.frozen_vision
                       for p in base.get_submodule(path).parameters()), mode


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_family_shares_its_tower_with_the_same_outputs_and_one_forward(name, loaded_of, records):
    loaded = loaded_of(name)
    teacher, student = (copy.deepcopy(loaded.model).requires_grad_(False) for _ in range(2))
    calls = _count_calls((teacher, loaded.anatomy), (student, loaded.anatomy))
    batch = recover.encode_for_training(loaded.prompt, records[:2])
    batch.pop("labels")
    with torch.no_grad():
        expected = teacher(**batch, output_hidden_states=True)  # before sharing: its own tower
    one_forward, calls[0] = calls[0], 0
    shared = vision_sharing.share_frozen_vision(teacher, student, loaded.anatomy)
    assert isinstance(shared, vision_sharing.SharedVision), shared
    with torch.inference_mode():
        t_out = teacher(**batch, output_hidden_states=True)
    s_out = student(**batch, output_hidden_states=True)  # grad mode: the reused features must be normal tensors
    # the teacher computed each unit, the student reused each: the tower's layers ran once for both
    assert shared.computed == shared.reused >= len(_units(student, loaded.anatomy))
    assert one_forward > 0 and calls[0] == one_forward
    for out in (t_out, s_out):
        torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    shared.remove()
    assert not any("forward" in m.__dict__ for m in student.modules())


def test_towers_that_differ_are_not_shared(loaded_of):
    loaded = loaded_of("llava")
    teacher, student = (copy.deepcopy(loaded.model).requires_grad_(False) for _ in range(2))
    with torch.no_grad():
        next(student.get_submodule(loaded.anatomy.vision_tower).parameters()).add_(1e-3)
    reason = vision_sharing.share_frozen_vision(teacher, student, loaded.anatomy)
    assert isinstance(reason, str) and "differs between teacher and student" in reason and "different values" in reason
    assert teacher.get_submodule(loaded.anatomy.vision_tower) is not student.get_submodule(loaded.anatomy.vision_tower)
    assert not any("forward" in m.__dict__ for m in student.modules())


def test_teacher_runs_under_inference_mode_in_the_runs_half_precision(loaded_of, records):
    loaded = loaded_of("llava")
    seen: list[tuple[bool, torch.dtype]] = []
    teacher = copy.deepcopy(loaded.model)  # fp32, as loaded
    teacher.get_submodule(loaded.anatomy.lm_head).register_forward_hook(
        lambda module, args, out: seen.append((torch.is_inference_mode_enabled(), out.dtype)))
    student = copy.deepcopy(loaded.model).to(torch.bfloat16)
    config = recover.RecoveryConfig(mode="projector", distillation="logits", batch_size=2, max_steps=2)
    lines: list[str] = []
    recover.recover(student, loaded.anatomy, loaded.prompt, records, config, teacher=teacher,
                    hardware=hardware.resolve("cpu", "bf16"), log=lines.append)
    assert seen == [(True, torch.bfloat16)] * 2
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert "teacher cast from fp32 to torch.bfloat16 (the run's mixed precision)" in lines
    # both in bf16 now: the student's tower (frozen, kept in bf16) is the teacher's
    assert any(line.startswith("vision tower shared") for line in lines), lines
