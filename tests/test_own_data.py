"""A user's own llava-1.5-style checkpoint and LLaVA-format data, end to end, with ShapesVQA out of reach.

The folder has LLaVA-1.5's real vision geometry (336 px, patch 14, 576 visual tokens, vision_feature_layer
-2), a byte-level BPE tokenizer and the llava-hf chat template; the data is LLaVA conversation JSON with
multi-turn and text-only records. ``run`` trains on exactly those records (the supervised tokens are the
assistant turns) and scores on the user's test file; ``eval --data`` and ``analyze --data`` read them too.
"""
import functools
import json

import pytest
import torch

from compression.cli.main import main
from compression.data import shapes
from compression.measure import evaluate
from compression.models import load
from compression.models.prompting import training_inputs
from compression.runs import pipeline
from compression.runs.recipe import Recipe
from tests.tiny import save_llava15, write_llava_dataset


@pytest.fixture(autouse=True)
def no_shapes(monkeypatch):
    """Nothing on the user's path may touch the built-in set."""
    def refuse(*args, **kwargs):
        raise AssertionError("ShapesVQA was used on the path of a user's own model and data")

    monkeypatch.setattr(shapes, "generate", refuse)
    monkeypatch.setattr(shapes, "load_split", refuse)
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    train = write_llava_dataset(root / "data", n=6, seed=1, text_only=2, name="train.json", image_dir="train")
    test = write_llava_dataset(root / "data", n=5, seed=2, multi_turn=False, name="test.json", image_dir="test")
    model = save_llava15(root / "llava-1.5-mine", layers=2)
    return {"root": root, "train": train, "test": test, "model": model}


def _assistant_texts(record_json: dict) -> list[str]:
    return [t["value"] for t in record_json["conversations"] if t["from"] == "gpt"]


def test_supervised_tokens_are_the_assistant_turns(user):
    loaded = load(str(user["model"]))
    assert loaded.prompt.uses_chat_template and loaded.anatomy.visual_tokens == 576
    from compression.data.sources import open_source, select

    records = select(open_source(str(user["train"]), "train"), fraction=1.0).records
    batch = training_inputs(loaded.prompt, records)
    tok = loaded.processor.tokenizer
    raw = {r["id"]: r for r in json.loads(user["train"].read_text())}
    for row, record in enumerate(records):
        answers = _assistant_texts(raw[record.id])
        supervised = batch["input_ids"][row][batch["labels"][row] != -100]
        # the llava-hf template renders each reply as "ASSISTANT: <reply> "; the reply's own tokens are supervised
        # (with the conversation's final space), the space before "USER:" goes with the next turn's token
        assert tok.decode(supervised) == "".join(" " + a for a in answers) + " "
        expected = sum(len(tok(" " + a, add_special_tokens=False)["input_ids"]) for a in answers) + 1
        assert len(supervised) == expected
        n_image = int((batch["input_ids"][row] == loaded.anatomy.image_token_index).sum())
        assert n_image == 576 * len(record.images)


def test_run_trains_and_scores_on_the_users_records(user, monkeypatch):
    monkeypatch.setattr(evaluate, "latency", functools.partial(evaluate.latency, repeats=1, warmup=0, decode_tokens=2))
    recipe = Recipe.from_dict({
        "name": "mine", "model": str(user["model"]),
        "prune": {"method": "layer", "ratio": 0.3},
        "recovery": {"mode": "full", "distillation": "hidden", "batch_size": 4, "learning_rate": 1e-3},
        "data": {"train": {"source": str(user["train"]), "fraction": 1.0},
                 "eval": {"source": {"path": str(user["test"]), "image_root": str(user["root"] / "data")}}}})
    out = user["root"] / "runs" / "mine"
    metrics = pipeline.run_recipe(recipe, out)
    tok = load(str(user["model"])).processor.tokenizer
    raw = json.loads(user["train"].read_text())
    # 8 records (2 text-only), batch 4: two steps over all of them, once
    expected = sum(sum(len(tok(" " + a, add_special_tokens=False)["input_ids"]) for a in _assistant_texts(r)) + 1
                   for r in raw)
    assert metrics["recovery"]["steps"] == 2 and metrics["recovery"]["train_samples"] == 8
    assert metrics["recovery"]["supervised_tokens"] == expected
    data = metrics["data"]
    assert data["train"]["label"] == "train.json" and data["train"]["records"] == 8 and data["train"]["fraction"] == 1
    assert data["eval"]["label"] == "test.json" and data["eval"]["records"] == 5
    assert data["calibration"]["label"] == "train.json" and data["calibration"]["records"] == 6  # images only
    assert len(data["eval"]["source_fingerprint"]) == 16
    assert metrics["eval_data"] == "5 records of test.json" and metrics["prompt"] == "the model's chat template"
    assert metrics["original"]["metric"] == "exact_match" and 0 <= metrics["compressed"]["accuracy"] <= 1
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["data"]["eval"]["selection_fingerprint"] == data["eval"]["selection_fingerprint"]


def test_cli_eval_analyze_and_ask_read_the_users_data(user, capsys):
    assert main(["eval", "--model", str(user["model"]), "--data", str(user["test"]), "--samples", "3",
                 "--no-latency", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == "3 records of test.json" and report["samples"] == 3
    assert report["prompt"] == "the model's chat template"
    assert main(["analyze", "--model", str(user["model"]), "--kind", "layers", "--data", str(user["train"]),
                 "--samples", "4", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["data"] == "4 records of train.json" and len(payload["scores"]) == 2
    assert all(row["score"] > 0 for row in payload["scores"])
    assert main(["ask", "--model", str(user["model"]), "--data", str(user["test"]), "--record", "1", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["question"] == "what colour is the square?" and answer["prompt"] == "the model's chat template"


def test_a_models_own_template_is_used_not_llava_15(tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]"
                "{% else %}{{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}")
    loaded = load(str(save_llava15(tmp_path / "mistral-style", layers=1, chat_template=template)))
    from compression.data.records import single_turn

    text = loaded.prompt.render(single_turn("what is it?"), add_generation_prompt=True)
    assert text == "[INST] <image>\nwhat is it? [/INST]" and "USER:" not in text
    plain = load(str(save_llava15(tmp_path / "no-template", layers=1, chat_template=None)))
    assert not plain.prompt.uses_chat_template and "no chat template" in plain.prompt.name
    assert plain.prompt.render(single_turn("what is it?"), add_generation_prompt=True) == \
        "USER: <image>\nwhat is it? ASSISTANT:"


def test_recipes_for_a_users_model_must_name_its_data(user):
    from compression.runs.recipe import RecipeError

    with pytest.raises(RecipeError, match="data.train: missing; expected a data source for recovery"):
        Recipe.from_dict({"model": str(user["model"]), "recovery": {"mode": "projector"},
                          "data": {"eval": str(user["test"])}})
    with pytest.raises(RecipeError, match="data.eval: missing"):
        Recipe.from_dict({"model": str(user["model"]), "data": {"train": str(user["train"])}})
