"""Export: safetensors only, model card, zip, names sanitised, refuses to overwrite, and the export
reloads with plain transformers in a fresh process (plain class, or trust_remote_code for
non-uniform widths) with the run's logits."""
import json
import os
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from compression.runs import export
from compression.runs import pipeline
from compression.runs.recipe import Recipe
from tests.tiny import save_tiny


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch, one_thread):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the fresh processes that check an export, too


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs of a tiny model: layer-pruned (uniform) and width-pruned in part of the
    layers (non-uniform widths), no recovery: cheap, and both loading paths are covered."""
    root = tmp_path_factory.mktemp("runs")
    folder = save_tiny(root / "tiny")
    made = {}
    for name, prune in [("uniform", {"method": "layer", "ratio": 0.3}),
                        ("nonuniform", {"method": "width", "ratio": 0.3, "layer_range": [1, 3]})]:
        recipe = Recipe.from_dict({"name": name, "model": str(folder), "prune": prune,
                                   "data": {"calibration": "shapes", "eval": {"source": "shapes", "samples": 4}}})
        old = os.environ.get("COMPRESSION_CACHE")
        os.environ["COMPRESSION_CACHE"] = str(root / "cache")
        try:
            pipeline.run_recipe(recipe, root / name)
        finally:
            if old is None:
                os.environ.pop("COMPRESSION_CACHE", None)
            else:
                os.environ["COMPRESSION_CACHE"] = old
        made[name] = root / name
    return made


@pytest.mark.parametrize("kind, remote_code", [("uniform", False), ("nonuniform", True)])
def test_export_reloads_in_a_fresh_process_and_carries_everything(runs, tmp_path, kind, remote_code):
    out = export.export_run(runs[kind], tmp_path / f"export-{kind}")  # checks the reload itself
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "processor_config.json",
            "recipe.yaml", "metrics.json", "README.md"} <= files
    assert not [f for f in files if f.endswith(export.PICKLE_SUFFIXES)]
    assert ("modeling_llava_pruned.py" in files) == remote_code
    # prompted with the LLaVA-1.5 fallback (no chat template of its own): the export ships it, so any tool
    # built on transformers prompts it exactly as it was measured
    assert "chat_template.jinja" in files
    from transformers import AutoProcessor

    from compression.data.records import single_turn

    rendered = AutoProcessor.from_pretrained(out).apply_chat_template(single_turn("how many shapes are there ?"),
                                                                      add_generation_prompt=True, tokenize=False)
    assert rendered == "USER: <image>\nhow many shapes are there ? ASSISTANT:"
    card = (out / "README.md").read_text()
    assert "| accuracy |" in card and "| parameters |" in card
    assert "Accuracy (exact match) on 4 records of ShapesVQA (test)" in card and "no chat template" in card
    assert ("trust_remote_code=True" in card) == remote_code
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['compressed']['params_total']:,}" in card
    zipped = export.zip_path_for(out)
    assert zipped is not None
    with zipfile.ZipFile(zipped) as z:
        assert f"{out.name}/model.safetensors" in z.namelist()


def test_a_changed_export_fails_the_fresh_process_check(runs, tmp_path):
    out = export.export_run(runs["uniform"], tmp_path / "good", make_zip=False, verify=False)
    weights = load_file(out / "model.safetensors")
    key = next(k for k in weights if "lm_head" in k)
    weights[key] = weights[key] + 0.1
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    difference, _ = export.verify_export(runs["uniform"] / "model", out, remote_code=False)
    assert difference > 1e-2


def test_refuses_to_overwrite_unless_asked(runs, tmp_path):
    first = export.export_run(runs["uniform"], tmp_path / "same", verify=False)
    (first / "marker").write_text("old")
    with pytest.raises(ValueError, match="already exists"):
        export.export_run(runs["uniform"], tmp_path / "same", verify=False)
    again = export.export_run(runs["uniform"], tmp_path / "same", overwrite=True, verify=False)
    assert not (again / "marker").exists()


@pytest.mark.parametrize("name", ["../escape", "a/../../b", ".hidden", "", "x" * 101, "bad name", "a\\b", "..",
                                  "name\x00"])
def test_names_that_could_escape_are_refused(name):
    with pytest.raises(ValueError):
        export.sanitize_name(name)


def test_destinations_and_runs_resolve_safely(runs, tmp_path):
    from compression.paths import cache_dir

    assert export.resolve_destination("my-model_v1.0") == cache_dir() / "exports" / "my-model_v1.0"
    with pytest.raises(ValueError, match="contains '..'"):
        export.resolve_destination(str(tmp_path / ".." / "elsewhere"))
    with pytest.raises(ValueError, match="contains '..'"):
        export.resolve_destination("../../etc")
    with pytest.raises(ValueError, match="not a finished run folder"):
        export.resolve_run("no-such-run")
    with pytest.raises(ValueError, match="contains '..'"):
        export.resolve_run("..")
    assert export.resolve_run(str(runs["uniform"])) == runs["uniform"]


def test_a_model_bigger_than_its_check_budget_is_checked_offloaded(runs, tmp_path):
    """Each side of the check keeps at most the budget's weights in memory: the run's model through the studio's
    offloaded loader, the export through plain transformers' device_map="auto" with max_memory and an offload
    folder. The answer is the same as the whole model's, and a changed export still fails."""
    out = export.export_run(runs["uniform"], tmp_path / "good", make_zip=False, verify=False)
    whole, offloaded = {}, {}
    assert export.verify_export(runs["uniform"] / "model", out, False, budget=None, details=whole) == (0.0, True)
    difference, same = export.verify_export(runs["uniform"] / "model", out, False, budget=100_000, details=offloaded)
    assert difference == 0.0 and same
    assert whole["reload_where"] == ["cpu"] and "disk" in offloaded["reload_where"]
    assert offloaded["budget_bytes"] == 100_000 and offloaded["new_tokens"] == whole["new_tokens"] >= 1
    weights = load_file(out / "model.safetensors")
    key = next(k for k in weights if "lm_head" in k)
    save_file({**weights, key: weights[key] + 0.1}, out / "model.safetensors", metadata={"format": "pt"})
    assert export.verify_export(runs["uniform"] / "model", out, False, budget=100_000)[0] > 1e-2


def test_a_pruned_model_folder_exports_as_well_as_a_run(runs, tmp_path):
    """What `prune --out` / `prune --streaming` writes (no run around it) exports and passes the same check; its
    card says what its pruning plan records."""
    out = export.export_run(runs["uniform"] / "model", tmp_path / "bare", make_zip=False)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "export_check.json"} <= files and "metrics.json" not in files
    assert json.loads((out / "export_check.json").read_text())["max_logit_difference"] <= 1e-4
    plan = json.loads((runs["uniform"] / "model" / "pruning_plan.json").read_text())
    card = (out / "README.md").read_text()
    assert "layerwise pruning of 30%" in card and f"{plan['params_after']:,}" in card


def test_the_check_loads_whole_up_to_a_quarter_of_free_memory():
    gb = 10 ** 9
    assert export.check_budget(4 * gb, 16 * gb) is None  # a quarter: whole
    assert export.check_budget(5 * gb, 16 * gb) == int(0.05 * 16 * gb)  # above: 5 % of the free memory
    assert export.check_budget(14 * gb, 2 * gb) == export.CHECK_BUDGET_MIN  # never under 256 MiB


def test_cli_export_json(runs, tmp_path, capsys):
    from compression.cli import main as cli

    assert cli.main(["export", str(runs["uniform"]), "--to", str(tmp_path / "cli-export"), "--json",
                     "--check-memory", "0.0001GB"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert Path(payload["path"]).is_dir() and payload["zip"].endswith("cli-export.zip")
    check = json.loads((Path(payload["path"]) / "export_check.json").read_text())
    assert payload["check"] == check and check["budget_bytes"] == 100_000 and "disk" in check["reload_where"]
    assert check["max_logit_difference"] <= 1e-4 and check["reload_peak_rss"] > 0
    assert "offloaded, at most 0.00 GB of weights in memory" in export.check_summary(payload["path"])
    assert cli.main(["export", str(runs["uniform"]), "--to", str(tmp_path / "other"), "--check-memory", "lots"]) == 2
    assert "--check-memory 'lots': expected auto, whole, or a size" in capsys.readouterr().err
    assert cli.main(["export", str(runs["uniform"]), "--to", str(tmp_path / "cli-export")]) == 2
    assert "already exists" in capsys.readouterr().err
