"""AppTest of the Importance page: scores from compression.methods.importance, the budget's removals marked."""
import pytest

from tests.app_support import app, tiny_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return tiny_folder(tmp_path_factory.mktemp("importance"))


def test_layer_and_unit_importance_with_the_budget_marked(tiny):
    at = app(tiny, "importance", importance_samples=8, importance_scorer="magnitude", budget={"ratio": 0.3})
    assert not at.exception and not at.error and not at.warning
    charts = at.get("plotly_chart")
    assert len(charts) == 3  # layers, heads, neurons
    from compression.methods import importance
    from compression import models
    from compression.methods import prune

    loaded = models.load(tiny)
    calibration = importance.calibration_selection("shapes", 8)  # the page's records: a seeded subset
    layers = importance.cached_importance(loaded, "layers", "block_influence", calibration)  # read back
    plan = prune.make_plan(loaded, "layer", ratio=0.3, scores=layers)
    removed = ", ".join(map(str, plan.layers_removed))
    assert any(f"removes layers {removed} (lowest block influence)" in c.value for c in at.caption)
    lowest = layers.sort_values("score")["layer"].head(len(plan.layers_removed))
    assert set(lowest) == set(plan.layers_removed)
    width = [c.value for c in at.caption if c.value.startswith("A widthwise prune")]
    assert width and "removes 0 heads" not in width[0]


def test_sorting_and_scorer_switch_rerun_without_errors(tiny):
    at = app(tiny, "importance", importance_samples=8, importance_scorer="magnitude")
    at.toggle(key="importance_sort").set_value(True).run()
    at.selectbox(key="importance_scorer").set_value("activation").run()
    assert not at.exception and not at.error
    assert any("activation score" in str(c.proto) for c in at.get("plotly_chart"))


def test_config_only_model_is_told_it_needs_weights():
    at = app("config:bunny-v1.0-3b", "importance")
    assert not at.exception
    assert any("config-only" in i.value for i in at.info)
    assert not at.get("plotly_chart")
