"""AppTests of sweeps in the dashboard: the shipped study on a fresh clone's Results page, the
budget question answered by the front or by the paper's decision flow (and saying which), the
Compress page's Sweep section (estimate, one-line bad input, launch, cancel as a group), and a
finished sweep's front whose chosen run is the one Compare and Export open."""
import time

import pytest

from compression.runs import jobs, studies, sweep
from tests.app_support import app, tiny_folder

SHIPPED = "reference-grid"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return tiny_folder(tmp_path_factory.mktemp("sweep-ui"))


def test_a_fresh_clone_shows_the_shipped_study_with_its_command(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path))  # nothing run here yet
    at = app("reference", "results")
    assert not at.exception and not at.error
    assert at.selectbox(key="results_sweep").value == f"study:{SHIPPED}"
    study = next(s for s in studies.shipped() if s["name"] == SHIPPED)
    assert any(f"Shipped study `{SHIPPED}`" in i.value for i in at.info)
    assert study["command"] in [c.value for c in at.code]
    assert any(study["rerun"] in c.value for c in at.caption)
    charts = " ".join(str(c.proto) for c in at.get("plotly_chart"))
    assert len(at.get("plotly_chart")) == 2 and "Pareto front" in charts and "what-if estimate" in charts
    assert any("No finished runs yet" in i.value for i in at.info)  # the section below: nothing run here
    answer = next(m.value for m in at.markdown if m.value.startswith("**Answered from"))
    best = sweep.best_within(sweep.points(study["runs"]), max_size_bytes=0.8 * study["originals"][0]["size_bytes"])
    assert answer.startswith(f"**Answered from the measured front of shipped study {SHIPPED}.** `{best['name']}`")
    at.slider(key=f"budget_size_shipped study {SHIPPED}").set_value(0.3).run()
    answer = next(m.value for m in at.markdown if m.value.startswith("**Answered from"))
    assert "No measured run fits" in answer


def test_the_budget_question_falls_back_to_the_papers_decision_flow(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path))
    at = app("config:llava-1.5-7b", "results")  # the shipped study measured another model
    assert not at.exception and not at.error
    answer = next(m.value for m in at.markdown if m.value.startswith("**Answered from"))
    assert answer.startswith("**Answered from the paper's decision flow (no measured sweep of this model).**")
    assert "layerwise pruning" in answer  # 20 % removed with some training: layerwise + SFT + L2 KD


ADVISED = {"prune": {"method": "layer", "ratio": 0.3}, "recovery": {"mode": "lora", "distillation": "hidden"},
           "data": {"train": {"source": "shapes", "fraction": 0.05}}}  # the form's training data: shapes


def test_the_sweep_section_estimates_refuses_bad_input_in_one_line_and_launches_a_group(tiny):
    at = app(tiny, "compress", advised_recipe=ADVISED)
    assert not at.exception
    # the default grid asks widthwise 40 % of a model whose eligible layers hold less: refused before launch
    assert [e.value.split(":")[0] for e in at.error] == ["sweep point 11 (width · 0.4 · none)"]
    assert "ratio 0.4 is more than layers [3, 7) can give" in at.error[0].value
    at.multiselect(key="sweep_ratios").set_value([0.15, 0.3]).run()
    assert not at.error
    assert any(m.value.startswith("**8 runs**, about **") for m in at.markdown)
    assert any(c.value.startswith(f"Estimate {tiny}: default: no finished run") for c in at.caption)

    at.multiselect(key="sweep_methods").set_value([]).run()
    assert [e.value for e in at.error] == ["sweep axis prune.method is empty; expected a list of one or more values"]
    assert not any(b.label == "Launch sweep" for b in at.button)

    at.radio(key="sweep_how").set_value("Paste a spec (YAML)").run()
    for text, message in (("name: x\naxes: {prune.ratoi: [0.3]}", "sweep axis prune.ratoi: unknown recipe key"),
                          ("name: x\nbase: {prune: {method: layer}}\naxes: {prune.ratio: [0.3, 0.3]}",
                           "sweep points 1 (0.3) and 2 (0.3) are the same recipe")):
        at.text_area(key="sweep_yaml").input(text).run()
        assert len(at.error) == 1 and at.error[0].value.startswith(message)
    ratios = ", ".join(str(i / 100) for i in range(10, 31))
    at.text_area(key="sweep_yaml").input("name: big\nbase: {prune: {method: layer}}\naxes: "
                                         f"{{prune.ratio: [{ratios}], recovery.seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}}"
                                         ).run()
    assert not at.error and at.checkbox(key="sweep_yes").label.startswith("210 runs is over 200")
    assert next(b for b in at.button if b.label == "Launch sweep").disabled

    at.text_area(key="sweep_yaml").input(
        f"name: ui\nbase: {{model: {tiny}, recovery: {{max_steps: 1}}, data: {{train: {{source: shapes, fraction: "
        "0.001}, eval: {source: shapes, samples: 2}}}\naxes: {prune.method: [layer], prune.ratio: [0.3], "
        "recovery: [none, projector]}").run()
    assert any(m.value.startswith("**2 runs**") for m in at.markdown)
    next(b for b in at.button if b.label == "Launch sweep").click().run()
    assert not at.exception and not at.error
    [group] = jobs.list_sweeps()
    assert at.session_state["results_sweep"] == f"sweep:{group['id']}" and group["total"] == 2
    assert sorted(j["name"] for j in jobs.list_jobs(sweep=group["id"])) == ["ui-01-layer-0.3-none",
                                                                             "ui-02-layer-0.3-projector"]
    next(b for b in at.button if b.label == "Cancel sweep").click().run()
    assert not at.exception
    states = [j["state"] for j in jobs.list_jobs(sweep=group["id"])]
    assert "cancelled" in states and set(states) <= {"cancelled", "succeeded"}  # the second was still queued
    assert not next(b for b in at.button if b.label == "Resume sweep").disabled


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, tiny):
    """A store holding one finished sweep of two runs on the tiny model, run by real workers."""
    cache = tmp_path_factory.mktemp("sweep-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESSION_CACHE", str(cache))
        patch.setenv("OMP_NUM_THREADS", "1")
        spec = sweep.SweepSpec.from_dict({"name": "done", "base": {
            "model": tiny, "data": {"calibration": {"source": "shapes", "samples": 10},
                                    "eval": {"source": "shapes", "samples": 2}}},
                                          "axes": {"prune.method": ["layer", "width"], "prune.ratio": [0.2]}})
        sweep_id = sweep.launch(spec)
        deadline = time.time() + 600
        while jobs.get_sweep(sweep_id)["finished"] < 2 and time.time() < deadline:
            time.sleep(0.5)
        result = sweep.results(sweep_id)
    assert result["counts"]["succeeded"] == 2, result["jobs"]
    return {"cache": cache, "id": sweep_id, "runs": [r["name"] for r in result["runs"]], "result": result}


def test_a_finished_sweeps_front_and_its_chosen_run_in_compare_and_export(finished_sweep, tiny, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(finished_sweep["cache"]))
    at = app(tiny, "results")
    assert not at.exception and not at.error
    assert at.selectbox(key="results_sweep").value == f"sweep:{finished_sweep['id']}"
    assert any("2 of 2 runs finished" in str(p.proto) for p in at.get("progress"))
    assert len(at.get("plotly_chart")) == 6  # two fronts, then the four charts of every finished run
    label = f"sweep {finished_sweep['id']}"
    picker = at.selectbox(key=f"front_pick_{label}")
    assert picker.options == finished_sweep["runs"]
    second = finished_sweep["runs"][1]
    picker.set_value(second).run()
    assert at.session_state["chosen_run"] == second
    assert any(f"Compare and Export open `{second}`" in c.value for c in at.caption)
    at.switch_page("pages/export.py").run()
    assert not at.exception and at.selectbox(key="export_run").value == second
    at.switch_page("pages/compare.py").run()
    assert not at.exception and at.selectbox(key="compare_run").value == second

    again = app(tiny, "results")  # the budget's answer can be chosen with one click
    choose = next(b for b in again.button if b.label == "Choose it for Compare and Export")
    answer = next(m.value for m in again.markdown if m.value.startswith("**Answered from"))
    assert answer.startswith(f"**Answered from the measured front of {label}.**")
    choose.click().run()
    assert again.session_state["chosen_run"] in finished_sweep["runs"]
    assert again.session_state["chosen_run"] in answer
