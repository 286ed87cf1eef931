"""Sweeps: the spec and its grid, one-line bad input, the Pareto front against a brute-force
definition, the wall-time estimate, the importance pass and the original's evaluation computed
once per sweep, and a sweep run, cancelled and resumed as a group by real worker processes."""
import json
import random
import sqlite3
import time

import pytest

from compression.cli import main as cli
from compression.measure import evaluate
from compression.methods import importance
from compression.runs import jobs, pipeline, studies, sweep
from compression.runs.recipe import Recipe
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", layers=6)


# every test: one thread per worker, fast heartbeats, one job at a time, no worker left behind
pytestmark = pytest.mark.usefixtures("quiet_workers")


GRID = {"name": "grid", "base": {"model": "reference", "recovery": {"max_steps": 40},
                                 "data": {"train": {"source": "shapes", "fraction": 0.05},
                                          "eval": {"source": "shapes", "samples": 200}}},
        "axes": {"prune.method": ["layer", "width"], "prune.ratio": [0.15, 0.3, 0.5],
                 "recovery": ["none", "sft+hidden"]}}


def test_the_grid_is_the_product_of_the_axes_in_order_with_presets_expanded():
    points = sweep.SweepSpec.from_dict(GRID).points()
    assert len(points) == 12
    assert [(p.recipe.prune.method, p.recipe.prune.ratio, p.recipe.recovery.mode) for p in points[:3]] == [
        ("layer", 0.15, "none"), ("layer", 0.15, "full"), ("layer", 0.3, "none")]
    kd = points[1].recipe.recovery
    assert (kd.mode, kd.distillation, kd.learning_rate) == ("full", "hidden", 2e-4)  # the preset's three keys
    assert kd.max_steps == 40 and points[1].recipe.data.train.fraction == 0.05  # ... over the base's
    assert points[0].recipe.recovery.max_steps == 40 and points[0].recipe.data.eval.samples == 200
    # a key at any depth; a data use written as its bare source takes a key below it
    deep = sweep.SweepSpec.from_dict({"name": "deep", "base": {"prune": {"method": "layer", "ratio": 0.3},
                                                               "data": {"train": "shapes"}},
                                      "axes": {"data.train.fraction": [0.01, 0.05]}}).points()
    assert [(p.recipe.data.train.source, p.recipe.data.train.fraction) for p in deep] == [("shapes", 0.01),
                                                                                          ("shapes", 0.05)]
    names = [p.run_name for p in points]
    assert len(set(names)) == 12 and names[1] == "grid-02-layer-0.15-sft-hidden"
    assert points[1].label == "layer · 0.15 · sft+hidden"
    # a section axis may also take a mapping of that section's keys
    mapped = sweep.SweepSpec.from_dict({**GRID, "axes": {"recovery": [{"mode": "lora", "lora_r": 4}]},
                                        "base": {"prune": {"method": "layer", "ratio": 0.3}}}).points()
    assert (mapped[0].recipe.recovery.mode, mapped[0].recipe.recovery.lora_r) == ("lora", 4)


@pytest.mark.parametrize("axes, message", [
    ({"prune.ratio": []}, "sweep axis prune.ratio is empty; expected a list of one or more values"),
    ({"prune.ratoi": [0.3]}, "sweep axis prune.ratoi: unknown recipe key; expected one of prune.method, prune.ratio"),
    ({"pruning": [1]}, "sweep axis pruning: unknown recipe key; expected one of model, prune, recovery"),
    ({"prune.method": ["layer"], "prune.ratio": [0.3, 0.3]},
     "sweep points 1 (layer · 0.3) and 2 (layer · 0.3) are the same recipe; expected each point once"),
    ({"prune.method": ["layer"], "recovery": ["none", {"mode": "none"}]},
     "sweep points 1 (layer · none) and 2 (layer · mode=none) are the same recipe"),
    ({"prune.method": ["layer"], "prune.ratio": [0.3, 1.5]},
     "sweep point 2 (layer · 1.5) field prune.ratio: got 1.5; expected a number < 1.0"),
    ({"recovery": ["sft+hiden"]}, "sweep axis recovery: got 'sft+hiden'; expected one of the presets none, projector"),
    ({"prune.ratio": 0.3}, "sweep axis prune.ratio: got 0.3; expected a list of values"),
    ({"data.eval.samples": [100, 200]}, "sweep axis data.eval.samples: every run of a sweep is scored on the same "
                                        "records; expected data.eval in the base"),
    ({}, "sweep spec has no axes"),
])
def test_bad_spec_is_one_line(axes, message):
    with pytest.raises(sweep.SweepError) as caught:
        sweep.SweepSpec.from_dict({"name": "x", "base": {"prune": {"method": "layer", "ratio": 0.3}}, "axes": axes}
                                  ).points()
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text


def test_a_grid_over_200_runs_needs_yes(tiny_folder):
    spec = sweep.SweepSpec.from_dict({"name": "big", "base": {"model": "reference"},
                                      "axes": {"prune.method": ["layer"], "prune.ratio": [i / 100 for i in range(1, 22)],
                                               "prune.scorer": ["block_influence", "removal_loss"],
                                               "recovery.seed": list(range(5))}})
    with pytest.raises(sweep.SweepError, match="^sweep big has 210 runs, over 200; pass --yes"):
        sweep.launch(spec)
    assert jobs.list_jobs() == [] and jobs.list_sweeps() == []  # nothing queued


def test_a_budget_the_model_cannot_give_is_refused_before_anything_is_queued():
    spec = sweep.SweepSpec.from_dict({"name": "wide", "base": {"model": "reference"},
                                      "axes": {"prune.method": ["layer", "width"], "prune.ratio": [0.3, 0.5]}})
    with pytest.raises(sweep.SweepError) as caught:
        sweep.launch(spec)
    # the paper's eligible layers [3, 7) of the reference model's 8 hold 44 % of its language model
    assert str(caught.value).startswith("sweep point 4 (width · 0.5): ratio 0.5 is more than layers [3, 7) can give: "
                                        "at most 0.44 is possible")
    assert jobs.list_sweeps() == []
    sweep.check_budgets(spec.points()[:3])  # the others fit


def brute_force_front(points):
    def dominates(a, b):
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    return [i for i, p in enumerate(points) if None not in p and not any(dominates(q, p) for q in points
                                                                         if None not in q)]


def test_the_front_is_exactly_the_non_dominated_set():
    rng = random.Random(0)
    sizes = []
    for _ in range(400):
        n = rng.randint(0, 14)
        # few distinct values, so equal costs, equal accuracies and whole duplicates are common
        points = [(float(rng.randint(0, 5)), rng.randint(0, 5) / 5) for _ in range(n)]
        if n and rng.random() < 0.2:
            points[rng.randrange(n)] = (None, 0.5)  # a run without a latency is on no front
        front = sweep.pareto_front(points)
        assert front == brute_force_front(points), points
        sizes.append(len(front))
    assert max(sizes) >= 4 and 0 in sizes  # the draw covered fronts of many sizes
    assert sweep.pareto_front([(1.0, 0.5), (1.0, 0.5), (2.0, 0.9)]) == [0, 1, 2]  # ties stay together
    assert sweep.pareto_front([(1.0, 0.5), (1.0, 0.6), (0.5, 0.6)]) == [2]


def _metrics(model, accuracy, size, prefill, original_prefill=10.0, steps=None, seconds=None, mode="none"):
    return {"recipe": {"model": model, "prune": {"method": "layer", "ratio": 0.3},
                       "recovery": {"mode": mode, "distillation": "none"}},
            "eval_samples": 100, "data": {"train": {"source": "shapes", "fraction": 0.01}},
            "original": {"accuracy": 0.9, "per_type": {}, "params_total": 1000, "size_bytes": 1000,
                         "prefill_ms": original_prefill},
            "compressed": {"accuracy": accuracy, "per_type": {}, "params_total": size, "size_bytes": size,
                           "prefill_ms": prefill},
            "what_if": {"original": {"prefill_ms": 4.0, "bytes": {"fp32": 2000}},
                        "compressed": {"prefill_ms": 2.0, "bytes": {"fp32": 1400}}},
            "timings": {"total_s": 30.0 + (seconds or 0.0), "recover_s": seconds or 0.0},
            "evaluation": {"accuracy_s": 10.0, "questions_answered": 100},
            "recovery": {"mode": mode, "distillation": "none", "steps": steps, "seconds": seconds}}


def test_summary_has_the_original_the_fronts_and_the_what_if_beside_each_point():
    runs = [{"name": "a", "metrics": _metrics("m", 0.85, 700, 6.0, 12.0)},
            {"name": "b", "metrics": _metrics("m", 0.80, 800, 5.0, 8.0)},   # larger and worse than a: off the size front
            {"name": "c", "metrics": _metrics("m", 0.95, 900, 9.0, 10.0)}]  # more accurate than the original
    for r in runs:
        r["recipe"] = r["metrics"]["recipe"]
    summary = sweep.summarize(runs)
    assert summary["front"] == ["a", "c"]
    assert summary["fronts"]["size"] == ["a", "c"]  # the original (1000 bytes, 0.9) is dominated by c
    assert summary["fronts"]["prefill_ms"] == ["a", "b", "c"]
    [original] = summary["originals"]
    assert (original["name"], original["accuracy"], original["prefill_ms"]) == ("original: m", 0.9, 10.0)  # median
    a = next(p for p in sweep.points(runs) if p["name"] == "a")
    assert a["size_bytes_estimated"] == pytest.approx(1000 * 1400 / 2000)
    assert a["prefill_ms_estimated"] == pytest.approx(12.0 * 2.0 / 4.0)  # this run's own original, scaled
    table = sweep.points(runs)
    assert sweep.best_within(table, max_size_bytes=850)["name"] == "a"
    assert sweep.best_within(table, max_size_bytes=650) is None
    assert sweep.best_within(table)["name"] == "c"


def test_estimate_reads_measured_timings_else_says_it_used_the_default():
    spec = sweep.SweepSpec.from_dict({"name": "e", "base": {"model": "reference", "recovery": {"max_steps": 20},
                                                           "data": {"eval": {"source": "shapes", "samples": 100}}},
                                      "axes": {"prune.method": ["layer"], "prune.ratio": [0.2, 0.4],
                                               "recovery": ["none", "projector"]}})
    points = spec.points()
    history = [{**_metrics("reference", 0.8, 700, 5.0, steps=20, seconds=40.0, mode="projector"), "job_wall_s": 76.0},
               {**_metrics("other", 0.8, 700, 5.0), "job_wall_s": 1000.0}]
    measured = sweep.estimate(points, history)
    # a run: start 6 s (36 - 30) + fixed 20 s (30 - 0 recovery - 10 accuracy) + 100 questions at 0.1 s;
    # for projector points the recovery: 2 s a step (40 s / 20 steps) x 20 steps; the original once: 10 s
    assert measured.seconds == pytest.approx(4 * (6 + 20 + 10) + 2 * 40 + 10)
    assert measured.runs == 4 and "measured: medians of 1 earlier runs here" in measured.basis
    default = sweep.estimate(points, history=[])
    d = sweep.DEFAULT_SECONDS
    assert default.seconds == pytest.approx(4 * (d["start"] + d["base"] + 100 * d["question"]) + 2 * 20 * d["step"]
                                            + 100 * d["question"])
    assert "default: no finished run of this model" in default.basis


def test_importance_and_the_originals_evaluation_run_once_per_sweep(tiny_folder, monkeypatch):
    """Every point of the sweep through the pipeline: the importance pass (layers for the layer runs;
    heads and neurons for the width runs) and the original's accuracy happen once, not once a run."""
    calls = {"layers": 0, "units": 0, "original accuracy": 0, "compressed accuracy": 0}
    layer_importance, unit_importance, accuracy = importance.layer_importance, importance.unit_importance, \
        evaluate.accuracy
    original_model = {}

    def count_layers(*args, **kwargs):
        calls["layers"] += 1
        return layer_importance(*args, **kwargs)

    def count_units(*args, **kwargs):
        calls["units"] += 1
        return unit_importance(*args, **kwargs)

    def count_accuracy(loaded, *args, **kwargs):
        calls["original accuracy" if loaded.model is original_model.get("model") else "compressed accuracy"] += 1
        return accuracy(loaded, *args, **kwargs)

    load = pipeline.load

    def remembering_load(source, *args, **kwargs):
        loaded = load(source, *args, **kwargs)
        original_model.setdefault("model", loaded.model)
        return loaded

    monkeypatch.setattr(pipeline, "load", remembering_load)
    monkeypatch.setattr(importance, "layer_importance", count_layers)
    monkeypatch.setattr(importance, "unit_importance", count_units)
    monkeypatch.setattr(evaluate, "accuracy", count_accuracy)
    monkeypatch.setattr(evaluate, "latency", lambda models, *a, **k: {n: {"prefill_ms": 1.0, "decode_tokens_per_s": 1.0}
                                                                      for n in models})
    spec = sweep.SweepSpec.from_dict({"name": "once", "base": {
        "model": str(tiny_folder), "data": {"calibration": {"source": "shapes", "samples": 10},
                                            "eval": {"source": "shapes", "samples": 3}}},
                                      "axes": {"prune.method": ["layer", "width"], "prune.ratio": [0.1, 0.15, 0.2]}})
    points = spec.points()
    shared_lines = []
    for p in points:
        original_model.clear()
        pipeline.run_recipe(p.recipe, jobs.runs_dir() / p.run_name, log=shared_lines.append)
    assert len(points) == 6
    assert calls == {"layers": 1, "units": 2, "original accuracy": 1, "compressed accuracy": 6}
    assert sum("computed and cached" in line for line in shared_lines) == 3
    assert sum("original accuracy on 3 records: measured and cached" in line for line in shared_lines) == 1
    originals = {json.loads((jobs.runs_dir() / p.run_name / "metrics.json").read_text())["original"]["accuracy"]
                 for p in points}
    assert len(originals) == 1  # every run reports the same measured original


def _wait(predicate, timeout=600, poll=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("timed out")


def test_a_sweep_runs_as_jobs_shares_the_original_and_is_cancelled_and_resumed_as_a_group(tiny_folder, monkeypatch,
                                                                                         capsys):
    monkeypatch.setenv("COMPRESSION_MAX_JOBS", "2")  # two workers at once: the shared passes are locked
    spec = sweep.SweepSpec.from_dict({
        "name": "group", "base": {"model": str(tiny_folder), "prune": {"method": "layer", "ratio": 0.3},
                                  "recovery": {"mode": "projector", "batch_size": 4, "epochs": 50,
                                               "checkpoint_every": 2},
                                  "data": {"train": {"source": "shapes", "fraction": 0.005},
                                           "eval": {"source": "shapes", "samples": 3}}},
        "axes": {"recovery.max_steps": [1, 2, 5000]}})
    sweep_id = sweep.launch(spec)
    rows = sorted(jobs.list_jobs(sweep=sweep_id), key=lambda j: j["created"])
    assert [j["name"] for j in rows] == ["group-01-1", "group-02-2", "group-03-5000"]
    assert all(j["sweep"] == sweep_id for j in rows)
    first, second, long = (j["id"] for j in rows)
    _wait(lambda: jobs.get(first)["state"] == jobs.get(second)["state"] == "succeeded"
          and jobs.get(long)["state"] == "running" and jobs.get(long)["stage"] == "recover")
    logs = "\n".join(jobs.log_tail(j, 400) for j in (first, second, long))
    # the two short runs started together; the long one is still recovering (it evaluates last)
    assert logs.count("importance layers (block_influence, 10 samples): computed and cached") == 1
    assert logs.count("importance layers (block_influence, 10 samples): read from the cache") == 2
    assert logs.count("original accuracy on 3 records: measured and cached") == 1
    assert logs.count("original accuracy on 3 records: read from the cache") == 1

    after_cancel = {j["id"]: j["state"] for j in jobs.cancel_sweep(sweep_id)}
    assert after_cancel == {first: "succeeded", second: "succeeded", long: "cancelled"}
    assert not jobs._alive(jobs.get(long)["pid"], long)
    with pytest.raises(jobs.JobError, match="has no queued or running jobs"):
        jobs.cancel_sweep(sweep_id)

    result = sweep.results(sweep_id)
    assert [r["name"] for r in result["runs"]] == [first, second] and result["done"]
    assert set(result["front"]) <= {first, second} and result["front"]
    assert result["runs"][0]["metrics"] == json.loads((jobs.runs_dir() / first / "metrics.json").read_text())

    assert {j["id"]: j["state"] for j in jobs.resume_sweep(sweep_id)}[long] in ("queued", "running")
    assert jobs.get(first)["state"] == "succeeded" and jobs.get(first)["attempts"] == 1  # not run again
    assert cli.main(["sweep", "cancel", sweep_id, "--json"]) == 1  # one run did not succeed
    out = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in out["runs"]] == [first, second] and out["front"] == result["front"]
    assert {"original", "compressed", "what_if", "recipe", "timings"} <= set(out["runs"][0]["metrics"])
    assert jobs.get(long)["state"] == "cancelled"


def test_a_store_from_before_sweeps_gains_the_column(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSION_CACHE", str(tmp_path))
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        conn.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, name TEXT, recipe TEXT NOT NULL, state TEXT NOT NULL, "
                     "stage TEXT, step INTEGER DEFAULT 0, total INTEGER DEFAULT 0, loss REAL, eta_s REAL, pid INTEGER, "
                     "created REAL NOT NULL, started REAL, finished REAL, heartbeat REAL, error TEXT, run_dir TEXT, "
                     "attempts INTEGER DEFAULT 0)")
        conn.execute("INSERT INTO jobs (id, recipe, state, created) VALUES ('old-1', 'model: reference', 'succeeded', 1)")
    [old] = jobs.list_jobs()
    assert old["id"] == "old-1" and old["sweep"] is None
    assert jobs.list_sweeps() == []


def test_cli_sweep_bad_input_exits_2_with_one_line(tmp_path, capsys):
    cases = {"empty.yaml": "name: x\nbase: {prune: {method: layer, ratio: 0.3}}\naxes: {prune.ratio: []}\n",
             "unknown.yaml": "name: x\naxes: {prune.ratoi: [0.3]}\n",
             "dup.yaml": "name: x\nbase: {prune: {method: layer}}\naxes: {prune.ratio: [0.3, 0.3]}\n",
             "big.yaml": "name: x\nbase: {prune: {method: layer}}\naxes: {prune.ratio: [%s], recovery.seed: "
                         "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}\n" % ", ".join(str(i / 100) for i in range(1, 20))}
    expected = {"empty.yaml": "error: sweep axis prune.ratio is empty",
                "unknown.yaml": "error: sweep axis prune.ratoi: unknown recipe key",
                "dup.yaml": "error: sweep points 1 (0.3) and 2 (0.3) are the same recipe",
                "big.yaml": "error: sweep x has 209 runs, over 200; pass --yes"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert cli.main(["sweep", str(tmp_path / name), "--detach"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected[name]) and err.count("\n") == 1, err
    assert cli.main(["sweep", "show", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: no sweep 'nope'")
    assert cli.main(["sweep", "resume"]) == 2
    assert "needs a sweep id" in capsys.readouterr().err
    assert jobs.list_jobs() == []


def test_the_shipped_study_is_small_data_with_its_command():
    [study] = [s for s in studies.shipped() if s["name"] == "reference-grid"]
    assert len(study["runs"]) == 12 and study["command"].startswith(
        "python -m compression sweep compression/assets/studies/reference-grid/sweep.yaml")
    assert study["rerun"] == "python -m compression sweep compression/assets/studies/reference-grid/sweep.yaml"
    spec = sweep.SweepSpec.from_yaml(studies.STUDIES_DIR / "reference-grid" / "sweep.yaml")
    # read through today's Recipe: fields added since the study was made take their defaults
    assert [Recipe.from_dict(r["recipe"]).to_dict() for r in study["runs"]] == [p.recipe.to_dict() for p in spec.points()], \
        "the shipped study was made from other recipes than its spec makes now: re-run its command"
    for run in study["runs"]:
        assert {"original", "compressed", "kept", "what_if", "timings", "recipe", "evaluation"} <= set(run["metrics"])
    # the original was evaluated once for the whole sweep, then read from the cache
    assert [r["metrics"]["evaluation"]["original_accuracy"] for r in study["runs"]].count("measured in this run") == 1
    assert len({r["metrics"]["original"]["accuracy"] for r in study["runs"]}) == 1
    assert study["front"] and set(study["front"]) <= {r["name"] for r in study["runs"]}
    folder = studies.STUDIES_DIR / "reference-grid"
    assert sorted(p.name for p in folder.iterdir()) == ["study.json", "sweep.yaml"]  # no weights
    assert (folder / "study.json").stat().st_size < 1_000_000
