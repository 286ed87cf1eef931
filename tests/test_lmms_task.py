"""The lmms-eval task writer: the rows are the studio's records and prompts, and the task's scorer is the
studio's own (so lmms-eval computes the same metric); lmms-eval itself runs when it is installed."""
import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from compression.cli.main import main
from compression.data import scoring
from compression.data.sources import open_source, select
from tests.tiny import write_llava_dataset


class _Tags(yaml.SafeLoader):
    """Reads lmms-eval's `!function module.name` tags as plain strings."""


_Tags.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def test_task_rows_prompts_and_scorer_match_the_studio(tmp_path, capsys):
    data = write_llava_dataset(tmp_path / "d", n=5, multi_turn=False, name="test.json")
    records = json.loads(data.read_text())
    records[2]["choices"] = ["red", "green", "blue"]
    for r in records:
        r["choices"] = ["red", "green", "blue"]
        r["conversations"][1]["value"] = {"red": "A", "green": "B", "blue": "C"}[r["conversations"][1]["value"]]
    data.write_text(json.dumps(records))
    assert main(["lmms-task", "--data", str(data), "--samples", "4", "--name", "mine", "--out",
                 str(tmp_path / "task"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 4
    task = tmp_path / "task"
    spec = yaml.load((task / "mine.yaml").read_text(), Loader=_Tags)
    assert spec["task"] == "mine" and spec["dataset_path"] == "json"
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(task / "data.jsonl")
    assert spec["metric_list"][0]["metric"] == "multiple_choice" and spec["generation_kwargs"]["max_new_tokens"] == 16
    rows = [json.loads(line) for line in (task / "data.jsonl").read_text().splitlines()]
    studio = select(open_source(str(data)), samples=4).records
    assert [r["question"] for r in rows] == [r.question for r in studio]
    assert rows[0]["prompt"].endswith("Answer with the option's letter from the given choices directly.")
    assert all(p.startswith(str(task / "images")) for r in rows for p in r["image_paths"])
    # the task's process_results is the studio's scorer: same verdicts on the same generations
    spec_utils = importlib.util.spec_from_file_location("lmms_task_utils", task / "utils.py")
    utils = importlib.util.module_from_spec(spec_utils)
    spec_utils.loader.exec_module(utils)
    said = ["A", "(b)", "blue", "the answer is A"]
    ours = scoring.score(studio, said, "multiple_choice").correct
    theirs = [utils.process_results(row, [s])["multiple_choice"] == 1.0 for row, s in zip(rows, said)]
    assert theirs == ours and len(utils.doc_to_visual(rows[0])) == 1
    assert main(["lmms-task", "--data", str(data), "--out", str(task)]) == 2  # not over an existing task
    assert main(["lmms-task", "--out", str(tmp_path / "t2")]) == 2  # no data named


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                    reason="lmms-eval is not installed (it replaces the pinned CPU torch; see README)")
def test_lmms_eval_scores_an_export_like_the_studio(tmp_path):  # pragma: no cover - optional environment
    from tests.tiny import save_llava15

    model = save_llava15(tmp_path / "m", layers=1)
    data = write_llava_dataset(tmp_path / "d", n=3, multi_turn=False, name="test.json")
    assert main(["lmms-task", "--data", str(data), "--name", "tiny_task", "--out", str(tmp_path / "task")]) == 0
    done = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "llava_hf", "--model_args",
                           f"pretrained={model},device=cpu,device_map=cpu,dtype=float32", "--tasks", "tiny_task",
                           "--include_path", str(tmp_path / "task"), "--batch_size", "1", "--output_path",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=1800)
    results = list((tmp_path / "out").rglob("*_results.json"))
    assert results, done.stderr[-2000:]  # lmms-eval may exit 0 after an error: read its results file
    theirs = json.loads(results[0].read_text())["results"]["tiny_task"]["exact_match,none"]
    from compression.measure import evaluate
    from compression.models import load

    ours = evaluate.accuracy(load(str(model)), select(open_source(str(data)), samples=3).records).accuracy
    assert theirs == pytest.approx(ours)
