"""AppTest of the Budget & what-if page, and the paper's decision flow behind its advice."""
import pytest

from tests.app_support import app, tiny_folder
from ui import advice


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return tiny_folder(tmp_path_factory.mktemp("budget"))


def metric_values(at) -> list[tuple[str, str, str]]:
    return [(m.label, m.value, m.delta) for m in at.metric]


def test_both_paradigms_are_estimated_side_by_side(tiny):
    at = app(tiny, "budget", budget={"ratio": 0.3})
    assert not at.exception and not at.error
    params = [(v, d) for label, v, d in metric_values(at) if label == "Parameters"]
    assert len(params) == 2  # layerwise and widthwise
    for _, delta in params:
        assert float(delta.rstrip("%")) < 0  # both remove parameters
    from compression import models
    from compression.methods import prune

    loaded = models.load(tiny)
    plan = prune.make_plan(loaded, "layer", ratio=0.3)
    assert any(f"removes {len(plan.layers_removed)} of 8 decoder layers" in c.value for c in at.caption)
    assert any("Estimated" in c.value for c in at.caption)  # every figure says what it is
    assert at.session_state["budget"]["ratio"] == 0.3


def test_advice_follows_the_budget_and_compute(tiny):
    at = app(tiny, "budget")
    at.slider(key="budget_ratio").set_value(0.1).run()
    assert "layerwise pruning, then projector-only finetuning" in at.success[0].value
    at.radio(key="budget_compute").set_value("none").run()
    assert at.success[0].value.startswith("**widthwise pruning, no recovery")


def test_prefill_button_carries_the_advice_to_the_compress_form(tiny):
    at = app(tiny, "budget")
    at.slider(key="budget_ratio").set_value(0.25).run()
    [button] = [b for b in at.button if b.label.startswith("Prefill")]
    button.click().run()
    assert not at.exception
    assert at.title[0].value == "Compress"
    from compression.runs.recipe import Recipe

    raw = at.session_state["advised_recipe"]  # a raw recipe: the data is the user's to name on Compress
    recipe = Recipe.from_dict({**raw, "data": {"train": "shapes", "eval": "shapes"}})
    assert (recipe.prune.method, recipe.prune.ratio, recipe.recovery.distillation) == ("layer", 0.25, "hidden")
    assert recipe.model == tiny and "train" not in raw["data"]
    assert at.selectbox[0].value == "layer"  # the form shows the advice


def test_config_only_model_gets_estimates_but_no_launch():
    at = app("config:llava-1.5-7b", "budget")
    assert not at.exception and not at.error
    params = [v for label, v, _ in metric_values(at) if label == "Parameters"]
    assert len(params) == 2 and all(v.endswith(" B") for v in params)  # billions, from the config alone
    assert not [b for b in at.button if b.label.startswith("Prefill")]


def test_infeasible_target_size_is_a_message(tiny):
    at = app(tiny, "budget")
    at.radio(key="budget_mode").set_value("target size").run()
    at.number_input(key="budget_target_mb").set_value(0.001).run()
    assert not at.exception
    assert len(at.error) == 1 and at.error[0].value.startswith("Infeasible budget")


@pytest.mark.parametrize("ratio, compute, method, mode, kd", [
    (0.10, "some", "layer", "projector", "none"),
    (0.25, "some", "layer", "lora", "hidden"),
    (0.25, "plenty", "layer", "full", "hidden"),
    (0.50, "some", "width", "lora", "hidden"),
    (0.25, "none", "width", "none", "none"),
])
def test_decision_flow_of_the_paper(ratio, compute, method, mode, kd):
    a = advice.decision_flow(ratio, 0.05, compute)
    assert (a.method, a.recovery_mode, a.distillation) == (method, mode, kd)
    from compression.runs.recipe import Recipe

    recipe = Recipe.from_dict(advice.recipe_for("reference", ratio, a))
    assert recipe.data.train.fraction == a.data_fraction and recipe.data.eval.source == "shapes"
    assert (recipe.prune.method, recipe.recovery.mode) == (method, mode)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1])
def test_decision_flow_refuses_a_ratio_outside_0_1(ratio):
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        advice.decision_flow(ratio)
