"""ShapesVQA: determinism, answers that match the drawn scene, disjoint splits, LLaVA JSON round trip."""
import json

import numpy as np
import pytest
from PIL import Image

from compression.data import shapes as data


def test_same_arguments_give_the_same_sample():
    a, b = data.generate("train", 17), data.generate("train", 17)
    assert (a.question, a.answer, a.scene) == (b.question, b.answer, b.scene)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert data.generate("train", 18).id != a.id


def _quadrant_colors(image, quadrant):
    """Colours drawn in one quadrant: pixels far from the grey background."""
    px = np.asarray(image).astype(int)
    half = data.IMAGE_SIZE // 2
    r, c = divmod(quadrant, 2)
    block = px[r * half:(r + 1) * half, c * half:(c + 1) * half].reshape(-1, 3)
    drawn = block[np.abs(block - data.BACKGROUND).max(axis=1) > 40]
    return {tuple(v) for v in drawn}


def test_answers_match_the_drawn_scene():
    for i in range(300):
        s = data.generate("val", i)
        counts = {n: i for i, n in enumerate(data.NUMBERS)}
        # what the pixels show: each occupied quadrant is drawn in exactly its shape's colour
        for q in range(4):
            drawn = _quadrant_colors(s.image, q)
            in_scene = [sh for sh in s.scene if sh.quadrant == q]
            assert drawn == ({data.COLORS[in_scene[0].color]} if in_scene else set())
        if s.qtype == "count":
            assert counts[s.answer] == len(s.scene)
        elif s.qtype == "count_color":
            color = s.question.split()[2]
            assert counts[s.answer] == sum(sh.color == color for sh in s.scene)
        elif s.qtype == "count_shape":
            plural = s.question.split()[2]
            shape = next(k for k, v in data.PLURALS.items() if v == plural)
            assert counts[s.answer] == sum(sh.shape == shape for sh in s.scene)
        elif s.qtype == "color":
            shape = s.question.split()[4]
            assert [sh.color for sh in s.scene if sh.shape == shape] == [s.answer]
        elif s.qtype == "shape":
            pos = s.question.split()[5]
            assert [sh.shape for sh in s.scene if sh.position == pos] == [s.answer]
        elif s.qtype == "position":
            color, shape = s.question.split()[3:5]
            assert [sh.position for sh in s.scene if (sh.color, sh.shape) == (color, shape)] == [s.answer]
        elif s.qtype == "exists":
            color, shape = s.question.split()[3:5]
            assert s.answer == ("yes" if any((sh.color, sh.shape) == (color, shape) for sh in s.scene) else "no")


def test_shapes_are_distinguishable_by_area():
    """Circle, square and triangle of one radius cover clearly different pixel areas."""
    areas = {}
    for shape in data.SHAPES:
        img = data.render((data.Shape(shape, "red", 0),), np.random.default_rng(0))
        areas[shape] = len(np.flatnonzero((np.abs(np.asarray(img).astype(int) - data.BACKGROUND).max(2) > 40)))
    assert areas["triangle"] < 0.75 * areas["circle"]


def test_splits_are_disjoint_by_layout_and_cover_every_type():
    layouts = {split: {data.layout_key(data.generate(split, i).scene) for i in range(400)}
               for split in ("train", "val", "test")}
    assert not layouts["train"] & layouts["test"]
    assert not layouts["train"] & layouts["val"]
    assert not layouts["val"] & layouts["test"]
    test_types = {s.qtype for s in data.load_split("test", 300)}
    assert test_types == set(data.QUESTION_TYPES)
    assert data.SPLIT_SIZES["test"] >= 1000


def test_fraction_is_seeded_and_sized():
    samples = list(range(200))
    assert len(data.fraction(samples, 0.05)) == 10
    assert data.fraction(samples, 0.05, seed=1) == data.fraction(samples, 0.05, seed=1)
    assert data.fraction(samples, 0.05, seed=1) != data.fraction(samples, 0.05, seed=2)
    with pytest.raises(ValueError, match="data fraction 0"):
        data.fraction(samples, 0)


def test_llava_json_round_trip(tmp_path):
    samples = data.load_split("test", 12)
    path = data.export_llava_json(samples, tmp_path)
    back = data.import_llava_json(path)
    assert [(s.question, s.answer, s.qtype) for s in back] == [(s.question, s.answer, s.qtype) for s in samples]
    assert np.array_equal(np.asarray(back[3].image), np.asarray(samples[3].image))


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[2].pop("conversations"), "record 2 of data.json: 'conversations' must be a list"),
    (lambda r: r[1].__setitem__("image", "images/missing.png"), "record 1 of data.json: image images/missing.png not found"),
    (lambda r: r[0]["conversations"][1].__setitem__("from", "human"), "record 0 of data.json: second turn"),
    (lambda r: r[3]["conversations"][0].__setitem__("value", "<image>\n  "), "record 3 of data.json: the human turn has no question"),
    (lambda r: r.__setitem__(4, "text"), "record 4 of data.json: is a str"),
])
def test_bad_records_are_named(tmp_path, mutate, message):
    path = data.export_llava_json(data.load_split("test", 6), tmp_path)
    records = json.loads(path.read_text())
    mutate(records)
    path.write_text(json.dumps(records))
    with pytest.raises(data.DataFormatError, match=message.replace("(", r"\(")):
        data.import_llava_json(path)


def test_corrupt_image_record_is_named(tmp_path):
    path = data.export_llava_json(data.load_split("test", 3), tmp_path)
    records = json.loads(path.read_text())
    (tmp_path / records[1]["image"]).write_bytes(b"\x89PNG not really")
    with pytest.raises(data.DataFormatError, match="record 1 of data.json: image .* is not a readable image"):
        data.import_llava_json(path)


def test_load_image_refuses_non_images_and_downscales_large(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(ValueError, match="x.png is not a readable image"):
        data.load_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="does not exist"):
        data.load_image(tmp_path / "nope.png")
    Image.new("RGB", (3000, 1500)).save(tmp_path / "big.png")
    assert data.load_image(tmp_path / "big.png").size == (1024, 512)
