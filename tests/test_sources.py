"""Data sources: LLaVA conversation JSON / JSONL with an image root, Hugging Face datasets on disk, ShapesVQA;
lazy reading (only selected records decode), bad records named by index, paths kept inside the image root."""
import json

import numpy as np
import pytest
from PIL import Image

from compression.data import shapes
from compression.data.records import DataError
from compression.data.sources import (DatasetSource, LlavaJsonSource, ShapesSource, SourceSpec, open_source, select)
from tests.tiny import write_llava_dataset


@pytest.fixture()
def llava(tmp_path):
    return write_llava_dataset(tmp_path, n=9, text_only=2)


def test_llava_json_records_keep_every_turn_and_the_image_placement(llava):
    source = open_source(str(llava), "train")
    assert isinstance(source, LlavaJsonSource) and len(source) == 11
    first, second = source.record(0), source.record(1)
    assert [m["role"] for m in first.messages] == ["user", "assistant", "user", "assistant"]  # multi-turn
    assert first.messages[0]["content"][0] == {"type": "image"}  # <image> at the start of the human turn
    assert second.messages[0]["content"][-1] == {"type": "image"}  # ... or at its end
    assert first.answer == "no" and first.question == "is there a cat?" and first.assistant_turns == 2
    assert len(first.images) == 1 and first.images[0].size == (64, 48)
    text_only = source.record(9)
    assert text_only.images == [] and text_only.answer == "it is red"


def test_jsonl_and_json_give_the_same_records(tmp_path):
    as_json = open_source(str(write_llava_dataset(tmp_path, n=5, name="a.json")))
    as_jsonl = open_source(str(write_llava_dataset(tmp_path, n=5, name="b.jsonl", jsonl=True)))
    assert len(as_json) == len(as_jsonl) == 5
    for i in range(5):
        assert as_json.record(i).messages == as_jsonl.record(i).messages


def test_an_image_root_elsewhere_and_paths_that_leave_it(tmp_path):
    path = write_llava_dataset(tmp_path / "pics", n=3)
    moved = tmp_path / "meta" / "test.json"
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    with pytest.raises(DataError, match=r"record 0 of test.json: image images/img-0.png not found under"):
        open_source(str(moved)).record(0)
    source = open_source({"path": str(moved), "image_root": str(tmp_path / "pics")})
    assert source.record(2).images[0].size == (64, 48)
    records = json.loads(moved.read_text())
    (tmp_path / "secret.png").write_bytes((tmp_path / "pics" / "images" / "img-0.png").read_bytes())
    records[1]["image"] = "../secret.png"
    moved.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"record 1 of test.json: image path '../secret.png' leaves the image root"):
        open_source({"path": str(moved), "image_root": str(tmp_path / "pics")}).record(1)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[2].pop("conversations"), "record 2 of data.json: has no 'conversations' list"),
    (lambda r: r[1].__setitem__("image", "images/missing.png"), "record 1 of data.json: image images/missing.png not found"),
    (lambda r: r[3]["conversations"].pop(), "record 3 of data.json: has no answer"),
    (lambda r: r[4]["conversations"][1].__setitem__("from", "human"), "record 4 of data.json: two 'human' turns"),
    (lambda r: r[5]["conversations"][0].__setitem__("value", "<image>\n<image>\nwhich?"),
     "record 5 of data.json: holds 2 <image> placeholder(s) but 1 image(s)"),
    (lambda r: r[5]["conversations"][0].__setitem__("from", "robot"), "record 5 of data.json: turn 0 is from 'robot'"),
    (lambda r: r.__setitem__(6, "text"), "record 6 of data.json: is a str"),
])
def test_bad_records_are_named_by_index(tmp_path, mutate, message):
    path = write_llava_dataset(tmp_path, n=8, multi_turn=False)
    records = json.loads(path.read_text())
    mutate(records)
    path.write_text(json.dumps(records))
    source = open_source(str(path))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        select(source, samples=8)
    # skipping instead: the bad record is counted and named, the rest are used
    picked = select(source, samples=8, on_error="skip")
    assert len(picked.skipped) == 1 and message.split(": ")[0] in picked.skipped[0]
    assert len(picked) == 7 and picked.describe().endswith("1 bad record skipped")


def test_corrupt_images_and_folders_are_named(tmp_path):
    path = write_llava_dataset(tmp_path, n=3, multi_turn=False)
    (tmp_path / "images" / "img-1.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "images" / "img-2.png").unlink()
    (tmp_path / "images" / "img-2.png").mkdir()
    source = open_source(str(path))
    with pytest.raises(DataError, match=r"record 1 of data.json: image images/img-1.png is not a readable image"):
        source.check(1)
    with pytest.raises(DataError, match=r"record 2 of data.json: image images/img-2.png is a folder"):
        source.check(2)


def test_text_only_records_train_but_are_not_scored(llava):
    source = open_source(str(llava), "train")
    everything = select(source, fraction=1.0)
    assert len(everything) == 11
    scored = select(source, samples=100, need_images=True)
    assert len(scored) == 9 and all(source.record(i).images for i in scored.indices)


def test_only_the_selected_records_are_decoded(tmp_path, monkeypatch):
    path = write_llava_dataset(tmp_path, n=40, multi_turn=False)
    opened = []
    original = Image.open

    def spy(fp, *args, **kwargs):
        opened.append(str(fp))
        return original(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    source = open_source(str(path), "train")
    selection = select(source, fraction=0.1, seed=3)
    assert len(selection) == 4 and len(opened) == 4  # headers of the four chosen, nothing else
    assert selection.indices == sorted(selection.indices)
    opened.clear()
    record = selection[0]
    assert len(opened) == 1 and record.index == selection.indices[0]  # decoded when the batch needs it
    again = select(open_source(str(path), "train"), fraction=0.1, seed=3)
    assert again.indices == selection.indices and again.fingerprint() == selection.fingerprint()
    assert select(source, fraction=0.1, seed=4).fingerprint() != selection.fingerprint()


def test_a_large_file_is_indexed_without_parsing_every_record(tmp_path):
    rows = [{"id": i, "image": "images/img-0.png", "conversations": [
        {"from": "human", "value": "<image>\nq \"quoted\" {braces} [list] \\ back"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(3000)]
    write_llava_dataset(tmp_path, n=1)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows))
    source = open_source(str(path))
    assert len(source) == 3000
    assert source.record(2999).answer == "a2999" and source.record(1234).question.startswith('q "quoted"')


def test_shapes_is_one_source_among_others():
    source = open_source("shapes", "eval")
    assert isinstance(source, ShapesSource) and source.spec.split == "test"
    record = source.record(3)
    sample = shapes.generate("test", 3)
    assert (record.question, record.answer, record.type) == (sample.question, sample.answer, sample.qtype)
    assert np.array_equal(np.asarray(record.images[0]), np.asarray(sample.image))
    assert open_source("shapes", "train").spec.split == "train"
    assert open_source("shapes:val").spec.split == "val"
    with pytest.raises(DataError, match="ShapesVQA split 'dev'"):
        open_source({"path": "shapes", "split": "dev"})


def test_datasets_on_disk_with_a_column_mapping(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (10, 120, 240)]
    table = datasets.Dataset.from_dict({"img": images, "prompt": ["dark?", "grey?", "light?"],
                                        "label": ["yes", "no", "no"], "category": ["a", "b", "b"]},
                                       features=datasets.Features({"img": datasets.Image(), "prompt": datasets.Value("string"),
                                                                   "label": datasets.Value("string"),
                                                                   "category": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"has no column 'question'.*columns are category, img, label, prompt"):
        open_source(str(tmp_path / "saved"))
    source = open_source({"path": str(tmp_path / "saved"),
                          "columns": {"image": "img", "question": "prompt", "answer": "label", "type": "category"}})
    assert isinstance(source, DatasetSource) and len(source) == 3
    record = source.record(1)
    assert (record.question, record.answer, record.type) == ("grey?", "no", "b")
    assert np.asarray(record.images[0])[0, 0, 0] == 120
    # the same rows as parquet, with ScienceQA-style choices and an index answer
    table.remove_columns("img").add_column("choices", [["x", "y"]] * 3).add_column(
        "answer", ["1", "0", "1"]).to_parquet(str(tmp_path / "rows.parquet"))
    mc = open_source({"path": str(tmp_path / "rows.parquet"), "columns": {"question": "prompt"}})
    assert mc.record(0).choices == ["x", "y"] and mc.record(0).answer == "B" and mc.record(0).images == []


def test_spec_parsing_and_its_one_line_errors(tmp_path):
    assert SourceSpec.parse("shapes").to_value() == "shapes"
    spec = SourceSpec.parse({"path": "a.json", "image_root": "imgs", "columns": {"question": "q"}})
    assert spec.to_value() == {"path": "a.json", "image_root": "imgs", "columns": {"question": "q"}}
    for value, message in [({"path": "a.json", "root": "x"}, "key 'root' is unknown"),
                           ({"image_root": "x"}, "has no 'path'"),
                           ({"path": "a", "columns": {"query": "q"}}, "column 'query' is unknown"),
                           (3, "is a int"), ("  ", "is empty")]:
        with pytest.raises(DataError, match=message):
            SourceSpec.parse(value)
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "missing.json"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="is a .txt"):
        open_source(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.json").write_text('[{"conversations": [')
    with pytest.raises(DataError, match="not valid JSON"):
        open_source(str(tmp_path / "broken.json"))
