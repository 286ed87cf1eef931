"""Recipe schema: defaults from the paper, one-line errors naming field and expected value, YAML round trip."""
from pathlib import Path

import pytest

from compression.runs.recipe import LAYER_SCORERS, WIDTH_SCORERS, Recipe, RecipeError

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_defaults_follow_the_paper():
    r = Recipe.from_yaml("prune: {method: layer, ratio: 0.3}\nrecovery: {mode: full, distillation: hidden}\n")
    assert r.data.train.fraction == 0.05 and r.data.calibration.samples == 10 and r.data.eval.samples == 500
    assert r.data.train.source == r.data.eval.source == "shapes"  # the reference model's own data
    assert r.recovery.temperature == 2.0
    assert r.prune.scorer == "block_influence"
    assert Recipe.from_yaml("prune: {method: width, ratio: 0.3}\n").prune.scorer == "taylor"
    assert r.quantize == "none" and r.visual_tokens.keep_ratio == 1.0
    assert r.prune.servable is False
    assert Recipe.from_yaml("prune: {method: width, ratio: 0.3, servable: true}\n").prune.servable is True


@pytest.mark.parametrize("text, field, expected", [
    ("recovery: {mode: lorax}", "recovery.mode", "'none', 'projector', 'lora', 'full'"),
    ("recovery: {distillation: kl}", "recovery.distillation", "'hidden+logits'"),
    ("data: {train: {source: shapes, fraction: 0}}", "data.train.fraction", "> 0"),
    ("data: {train: {source: shapes, fraction: 1.5}}", "data.train.fraction", "<= 1"),
    ("data: {train: {source: shapes, fraction: 0.1, samples: 5}}", "data.train.fraction", "either samples or"),
    ("data: {eval: {source: shapes, metric: bleu}}", "data.eval.metric", "'multiple_choice'"),
    ("data: {eval: {source: {path: x.json, colour: red}}}", "data.eval.source", "image_root"),
    ("data: {test: shapes}", "data.test", "'eval'"),
    ("model: /my/llava\nrecovery: {mode: full}\ndata: {eval: my.json}", "data.train", "a data source for recovery"),
    ("model: /my/llava\nprune: {method: layer, ratio: 0.3}", "data.eval", "a data source to evaluate"),
    ("recovery: {epochs: 1.5}", "recovery.epochs", "an integer"),
    ("recovery: {alpha: -0.1}", "recovery.alpha", ">= 0"),
    ("recovery: {hidden_layers: all}", "recovery.hidden_layers", "'kept'"),
    ("recovery: {mode: none, distillation: logits}", "recovery.distillation", "'none' when mode is 'none'"),
    ("prune: {method: depth}", "prune.method", "'none', 'layer', 'width'"),
    ("prune: {method: layer, ratio: 0.3, scorer: taylor}", "prune.scorer", "'block_influence'"),
    ("prune: {method: width, ratio: 0}", "prune.ratio", "a fraction in (0, 1)"),
    ("prune: {method: width, ratio: 1}", "prune.ratio", "< 1"),
    ("prune: {method: width, ratio: 0.3, layer_range: [5, 2]}", "prune.layer_range", "0 <= first < last"),
    ("prune: {ration: 0.3}", "prune.ration", "'ratio'"),
    ("quantize: int4", "quantize", "'none', 'int8', 'nf4'"),
    ("visual_tokens: {keep_ratio: 0}", "visual_tokens.keep_ratio", "> 0"),
    ("visual_tokens: {scorer: magic}", "visual_tokens.scorer", "'attention'"),
    ("data: {eval: {source: shapes, samples: zero}}", "data.eval.samples", "an integer"),
    ("name: ../escape", "name", "a plain name"),
    ("colour: red", "colour", "'recovery'"),
])
def test_every_error_is_one_line_naming_field_and_expected_value(text, field, expected):
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml(text + "\n")
    message = str(e.value)
    assert "\n" not in message
    assert f"field {field}:" in message, message
    assert expected in message, message


def test_non_mapping_and_bad_yaml_are_one_line():
    for text, expected in [("- a\n- b\n", "expected a mapping"), ("prune: [\n", "not valid YAML at line")]:
        with pytest.raises(RecipeError, match=expected.replace("(", r"\(")):
            Recipe.from_yaml(text)
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_yaml(Path("/nonexistent/recipe.yaml"))


def test_yaml_round_trip_is_exact():
    r = Recipe.from_dict({"name": "w30", "model": "reference",
                          "prune": {"method": "width", "ratio": 0.3, "layer_range": [3, 7]},
                          "recovery": {"mode": "lora", "distillation": "hidden+logits", "hidden_layers": {8: 6, 4: 3},
                                       "alpha": 0.7, "seed": 3},
                          "quantize": "int8", "visual_tokens": {"keep_ratio": 0.5, "scorer": "similarity"}})
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r
    assert again.recovery.hidden_layers == {8: 6, 4: 3}
    assert again.prune.layer_range == (3, 7)


def test_a_user_model_names_its_data_and_calibration_follows_training(tmp_path):
    train, test = tmp_path / "train.json", tmp_path / "test.json"
    r = Recipe.from_yaml(f"model: /my/llava\nprune: {{method: width, ratio: 0.3}}\nrecovery: {{mode: lora}}\n"
                         f"data:\n  train: {{source: {train}, fraction: 0.004}}\n"
                         f"  eval: {{source: {{path: {test}, image_root: {tmp_path}}}, samples: 50}}\n")
    assert r.data.calibration.source == str(train) and r.data.calibration.samples == 10
    assert r.data.train.fraction == 0.004  # kept as given, not rounded
    assert r.data.eval.source == {"path": str(test), "image_root": str(tmp_path)}
    assert Recipe.from_yaml(r.to_yaml()) == r
    # magnitude needs no data: a prune-only recipe names only what it evaluates on
    assert Recipe.from_yaml(f"model: /my/llava\nprune: {{method: width, ratio: 0.3, scorer: magnitude}}\n"
                            f"data: {{eval: {test}}}\n").data.calibration is None


def test_relative_paths_are_resolved_where_the_recipe_is_read(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    r = Recipe.from_yaml("model: reference\ndata: {eval: data/test.json}\n")
    assert r.data.eval.source == str(tmp_path / "data" / "test.json")  # a job runs from the repository root


def test_scorer_names_match_the_importance_module():
    from compression.methods import importance

    assert set(LAYER_SCORERS) == set(importance.LAYER_METHODS)
    assert set(WIDTH_SCORERS) == set(importance.UNIT_METHODS)


def test_shipped_recipes_validate_and_comment_every_key():
    files = sorted(RECIPES.glob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        recipe = Recipe.from_yaml(path)
        assert recipe.name == path.stem
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped and not stripped.startswith("#") and ":" in stripped:
                assert "#" in stripped, f"{path.name}:{number} has a key without a comment: {stripped}"
