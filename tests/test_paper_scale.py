"""benchmarks/paper_scale: its sweep spec renders, validates and plans on the shipped LLaVA-1.5-7B config
(every budget feasible), with the model and data paths as parameters, never written into the spec."""
import importlib.util
from pathlib import Path

import pytest

from compression.runs import sweep

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def paper_scale():
    spec = importlib.util.spec_from_file_location("paper_scale_run", ROOT / "benchmarks/paper_scale/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recipe_validates_and_plans_on_the_7b_config(paper_scale, tmp_path, monkeypatch):
    for env, _ in paper_scale.PARAMETERS.values():
        monkeypatch.delenv(env, raising=False)
    args = type("Args", (), dict(model="config:llava-1.5-7b", train_json=str(tmp_path / "mix665k.json"),
                                 image_folder=str(tmp_path / "images"), eval_data=str(tmp_path / "test.json"),
                                 eval_image_folder=None, eval_samples=500))()
    spec = paper_scale.spec_for(args)
    points = spec.points()
    assert len(points) == 12
    grid = {(p.recipe.prune.method, p.recipe.prune.ratio, p.recipe.recovery.mode) for p in points}
    assert grid == {(m, r, rec) for m in ("layer", "width") for r in (0.15, 0.3, 0.45) for rec in ("none", "full")}
    for p in points:
        r = p.recipe
        assert r.model == "config:llava-1.5-7b" and r.data.eval.samples == 500
        assert r.data.train.fraction == 0.05 and r.data.train.source["path"] == str(tmp_path / "mix665k.json")
        assert "image_root" not in r.data.eval.source  # an empty parameter leaves the file's own folder
        if r.recovery.mode == "full":
            assert r.recovery.distillation == "hidden" and r.recovery.learning_rate == 2e-5
    sweep.check_budgets(points)  # planned on the config: raises if a budget is not feasible


def test_a_missing_path_is_one_line(paper_scale, monkeypatch):
    for env, _ in paper_scale.PARAMETERS.values():
        monkeypatch.delenv(env, raising=False)
    with pytest.raises(SystemExit, match=r"--train-json \(or \$PAPER_TRAIN_JSON\) is required"):
        paper_scale.main(["grid", "--model", "config:llava-1.5-7b", "--eval-data", "x.json"])
