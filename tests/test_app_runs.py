"""AppTests of the pages that read finished runs — Results, Compare, Export — against a run made by
the real pipeline on a tiny model (tests/app_support.make_run)."""
import json

import pytest

from tests.app_support import app, make_run, tiny_folder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A runtime store holding one finished run (layer-pruned, half the visual tokens kept)."""
    root = tmp_path_factory.mktemp("runs")
    original = tiny_folder(root)
    cache = root / "cache"
    run = make_run(cache, original, "tiny-layer30", keep_ratio=0.5)
    return {"cache": cache, "original": original, "run": run, "metrics": json.loads((run / "metrics.json").read_text())}


@pytest.fixture
def use_store(store, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(store["cache"]))
    return store


def test_results_table_and_charts_hold_the_measured_numbers(use_store):
    at = app(use_store["original"], "results")
    assert not at.exception and not at.error
    table = at.dataframe[-1].value  # the table of every finished run, after the shipped study's points
    assert list(table["kind"]) == ["original", "layerwise"]
    m = use_store["metrics"]
    assert table["accuracy"].tolist() == [m["original"]["accuracy"], m["compressed"]["accuracy"]]
    assert table["params"].tolist() == [m["original"]["params_total"], m["compressed"]["params_total"]]
    assert table.loc[1, "prefill speedup (measured)"] == pytest.approx(m["speedup"]["prefill"])
    # the shipped study's two fronts, then size, latency, per type, what-if vs measured
    assert len(at.get("plotly_chart")) == 6
    assert at.get("download_button")


def test_results_without_runs_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path))
    at = app("config:llava-1.5-7b", "results")
    assert not at.exception
    assert any("No finished runs yet" in i.value for i in at.info)


def test_compare_answers_both_models_and_shows_their_token_maps(use_store):
    at = app(use_store["original"], "compare")
    assert not at.exception and not at.error
    assert [m.label for m in at.metric] == ["Latency (answer, batch 1)"] * 2
    assert all(float(m.value.split()[0]) > 0 for m in at.metric)
    answers = [m.value for m in at.markdown if m.value.startswith("**Answer:**")]
    assert len(answers) == 2
    titles = " ".join(str(c.proto) for c in at.get("plotly_chart"))
    assert "50% kept" in titles  # the run prunes half the visual tokens: its map shows which


def test_compare_refuses_an_empty_question(use_store):
    at = app(use_store["original"], "compare")
    [question] = [t for t in at.text_input if t.label == "Question"]
    question.input("").run()
    assert not at.exception
    assert "question is empty" in at.error[0].value


def test_export_writes_the_folder_card_zip_and_snippet(use_store):
    at = app(use_store["original"], "export")
    at.text_input(key="export_name_tiny-layer30").input("tiny-export").run()
    [button] = [b for b in at.button if b.label == "Export"]
    button.click().run()
    assert not at.exception and not at.error
    folder = use_store["cache"] / "exports" / "tiny-export"
    assert (folder / "config.json").is_file() and (folder / "README.md").is_file()
    assert str(folder) in at.code[0].value and "from_pretrained" in at.code[0].value
    assert any("tiny-export" in m.value for m in at.markdown)  # the model card preview
    assert any("Checked: reloaded with plain transformers in a fresh process (fp32, the whole model in memory)"
               in c.value and "8 greedy tokens the same as the run's" in c.value for c in at.caption)
    assert at.get("download_button")
    again = app(use_store["original"], "export")
    again.text_input(key="export_name_tiny-layer30").input("tiny-export").run()
    assert [b for b in again.button if b.label == "Export"][0].disabled  # exists: overwrite must be ticked


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_export_refuses_a_name_that_leaves_the_folder(use_store, name):
    at = app(use_store["original"], "export")
    at.text_input(key="export_name_tiny-layer30").input(name).run()
    assert not at.exception
    assert "is not allowed" in at.error[0].value
