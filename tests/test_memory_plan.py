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
