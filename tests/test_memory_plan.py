"""The memory plan before launch: counts that must equal what recovery really trains, and a suggestion that fits."""
import pytest

from compression.measure import memory_plan
from compression.methods import prune, recover
from compression.models import load
from compression.runs.recipe import Recipe


@pytest.mark.parametrize("mode", ["projector", "lora", "full"])
def test_trainable_parameters_equal_what_recovery_trains(mode):
    import copy

    loaded = load("reference")
    shapes = memory_plan.Shapes.of(loaded)
    model = recover.prepare_trainable(copy.deepcopy(loaded.model), loaded.anatomy, mode, lora_r=8)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory_plan._trainable(shapes, mode, 8) == trained


def test_a_pruned_students_shapes_follow_the_plan():
    loaded = load("config:llava-1.5-7b")
    plan = prune.make_plan(loaded, "layer", ratio=0.3)
    before, after = memory_plan.Shapes.of(loaded), memory_plan.Shapes.of(loaded, plan)
    assert after.layers == before.layers - len(plan.layers_removed)
    assert before.params_total - after.params_total == plan.params_before - plan.params_after


def test_7b_full_recovery_does_not_fit_80gb_and_the_suggestion_does():
    loaded = load("config:llava-1.5-7b")
    recipe = Recipe.from_dict({"model": "reference", "recovery": {"mode": "full", "distillation": "hidden",
                                                                  "batch_size": 4}})
    out = memory_plan.plan_for_recipe(loaded, recipe, 80 * 2**30, "bf16")
    rec = out["stages"]["recover"]
    params = memory_plan.Shapes.of(loaded).params_total
    # AdamW's two fp32 moments and fp32 gradients of the language model + projector: 12 bytes each
    assert rec["optimizer"] == 2 * rec["gradients"] and rec["gradients"] > 0.95 * 4 * params
    assert rec["teacher"] > 2 * params  # the bf16 teacher's weights, plus its logits and hidden states
    assert out["fits"] is False and out["suggestion"].startswith("recovery.mode: lora")
    lora = Recipe.from_dict({"model": "reference", "recovery": {"mode": "lora", "distillation": "hidden",
                                                                "batch_size": 4}})
    again = memory_plan.plan_for_recipe(loaded, lora, 80 * 2**30, "bf16")
    assert again["fits"] is True and again["peak_bytes"] < 0.9 * 80 * 2**30
    # the evaluation stage is the bf16 weights plus a small KV cache and activations
    assert 2 * params < out["stages"]["evaluate"]["total"] < 2.1 * params


def test_the_distilling_teacher_is_counted_without_the_vision_tower_it_shares():
    loaded = load("config:llava-1.5-7b")
    shapes = memory_plan.Shapes.of(loaded)
    assert shapes.params_vision == 303_507_456  # CLIP ViT-L/14-336 without its projection head
    args = (shapes, shapes, "lora", "hidden", "bf16", 4, 640)
    shared, separate = memory_plan.recovery_peak(*args), memory_plan.recovery_peak(*args, shared_vision=False)
    assert separate["teacher"] - shared["teacher"] == 2 * shapes.params_vision  # bf16: 0.57 GiB less
    assert {k: v for k, v in shared.items() if k not in ("teacher", "total")} == {
        k: v for k, v in separate.items() if k not in ("teacher", "total")}


def test_7b_on_24gb_full_finetuning_does_not_fit_and_the_advisor_says_lora_with_the_numbers():
    from ui import advice

    loaded = load("config:llava-1.5-7b")
    plan = prune.make_plan(loaded, "layer", ratio=0.3)
    gpu = 24 * 2**30
    fit = memory_plan.recovery_choice(loaded, gpu, "bf16", "none", batch_size=4, plan=plan)
    peaks = {(o["mode"], o["gradient_checkpointing"]): o["peak_bytes"] / 2**30 for o in fit["options"]}
    # layer-pruned 30 % (5.04 B parameters left), SFT, batch 4 of 640 tokens, bf16: full finetuning's fp32 gradients
    # and AdamW moments alone are 12 bytes for each of the 4.7 B trained parameters; LoRA's are a few MB
    assert peaks["full", False] == pytest.approx(79.2, abs=0.05) and peaks["full", True] == pytest.approx(72.7, abs=0.05)
    assert peaks["lora", False] == pytest.approx(18.2, abs=0.05) and fit["budget_bytes"] == int(0.9 * gpu)
    assert fit["choice"]["mode"] == "lora" and not fit["choice"]["gradient_checkpointing"]

    heavy = advice.Advice("layer", "full", "none", 0.05, "The paper's reason.")
    fitted = advice.fit_to_device(heavy, loaded, gpu, "bf16", plan=plan, batch_size=4, device_label="rtx-4090")
    assert (fitted.recovery_mode, fitted.gradient_checkpointing) == ("lora", False)
    assert fitted.reason == ("The paper's reason. Memory: full finetuning is predicted to peak at 79.2 GiB (72.7 GiB "
                             "with gradient checkpointing), more than rtx-4090 (24.0 GiB, 90% of it usable: 21.6 GiB); "
                             "LoRA at 18.2 GiB fits (estimated: bf16, batch 4 of 640 tokens).")
    assert advice.recipe_for("reference", 0.3, fitted)["recovery"] == {"mode": "lora", "distillation": "none"}
    # with hidden-state KD the bf16 teacher (its 13.2 GiB less the shared 0.57 GiB tower) comes on top: on 24 GB only
    # LoRA with gradient checkpointing would be left, and at batch 16 not even that
    kd = advice.Advice("layer", "full", "hidden", 0.05, "R.")
    at_48 = advice.fit_to_device(kd, loaded, 48 * 2**30, "bf16", plan=plan, batch_size=4)
    assert (at_48.recovery_mode, at_48.gradient_checkpointing) == ("lora", False) and "LoRA at 31.6 GiB fits" in at_48.reason
    at_24 = advice.fit_to_device(kd, loaded, gpu, "bf16", plan=plan, batch_size=16)
    assert at_24.recovery_mode == "full" and "use several GPUs (FSDP)" in at_24.reason
    assert "even LoRA with gradient checkpointing at 32.0 GiB" in at_24.reason
    small = advice.fit_to_device(heavy, loaded, 24 * 2**30, "bf16", plan=plan, batch_size=16)
    assert (small.recovery_mode, small.gradient_checkpointing) == ("lora", True)
    assert advice.recipe_for("reference", 0.3, small)["recovery"]["gradient_checkpointing"] is True
    assert small.summary.endswith("gradient checkpointing on")
    # full finetuning that fits is left alone; other modes are never changed
    assert advice.fit_to_device(heavy, loaded, 200 * 2**30, "bf16", plan=plan, batch_size=4) == heavy
    light = advice.Advice("layer", "projector", "none", 0.05, "R.")
    assert advice.fit_to_device(light, loaded, 2**30, "bf16") == light
    assert advice.fit_to_device(heavy, loaded, None, "bf16") == heavy


def test_a_recipe_of_eight_processes_is_planned_per_gpu():
    """FSDP (auto for full finetuning) shards the student's weights, gradients and AdamW state over the
    processes; DDP (LoRA) keeps a replica each; both split the global batch."""
    loaded = load("config:llava-1.5-7b")
    raw = {"model": "reference", "recovery": {"mode": "full", "distillation": "hidden", "batch_size": 16}}
    one = memory_plan.plan_for_recipe(loaded, Recipe.from_dict(raw), 80 * 2**30, "bf16")["stages"]["recover"]
    eight = memory_plan.plan_for_recipe(loaded, Recipe.from_dict({**raw, "hardware": {"processes": 8}}),
                                        80 * 2**30, "bf16")
    rec = eight["stages"]["recover"]
    assert rec["optimizer"] == pytest.approx(one["optimizer"] / 8, rel=1e-6)
    assert rec["gradients"] == pytest.approx(one["gradients"] / 8, rel=1e-6)
    assert rec["activations"] == pytest.approx(one["activations"] / 8, rel=1e-6)  # 2 samples per GPU instead of 16
    assert one["weights"] / 8 < rec["weights"] < one["weights"] / 8 * 1.2  # + one decoder layer gathered
    # the teacher is replicated, and under FSDP it keeps its own vision tower (the student's is sharded)
    shapes = memory_plan.Shapes.of(loaded)
    args = (shapes, shapes, "full", "hidden", "bf16", 16, 640)
    sharded = memory_plan.recovery_peak(*args, processes=8, fsdp=True)["teacher"]
    replicas = memory_plan.recovery_peak(*args, processes=8, fsdp=False)["teacher"]
    assert sharded - replicas == shapes.params_vision * 2 > 0
    assert one["total"] > 80 * 2**30 and eight["fits"] is True
    ddp = memory_plan.plan_for_recipe(loaded, Recipe.from_dict(
        {**raw, "recovery": {**raw["recovery"], "mode": "lora"}, "hardware": {"processes": 8, "parallelism": "ddp"}}),
        80 * 2**30, "bf16")["stages"]["recover"]
    lora_one = memory_plan.plan_for_recipe(loaded, Recipe.from_dict(
        {**raw, "recovery": {**raw["recovery"], "mode": "lora"}}), 80 * 2**30, "bf16")["stages"]["recover"]
    assert ddp["weights"] == lora_one["weights"] and ddp["optimizer"] == lora_one["optimizer"]
    assert ddp["activations"] == pytest.approx(lora_one["activations"] / 8, rel=1e-6)
