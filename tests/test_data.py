"""ShapesVQA: determinism, answers that match the drawn scene, disjoint splits, its LLaVA JSON export."""
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


def test_llava_json_export_reads_back_through_the_one_data_path(tmp_path):
    from compression.data.sources import open_source, select

    samples = data.load_split("test", 12)
    path = data.export_llava_json(samples, tmp_path)
    back = select(open_source(str(path)), samples=12).records
    assert [(r.question, r.answer, r.type) for r in back] == [(s.question, s.answer, s.qtype) for s in samples]
    assert np.array_equal(np.asarray(back[3].images[0]), np.asarray(samples[3].image))


def test_load_image_refuses_non_images_and_downscales_large(tmp_path):
    from compression.data.images import load_image

    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(ValueError, match="x.png is not a readable image"):
        load_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ValueError, match="folder.png is a folder"):
        load_image(tmp_path / "folder.png")
    Image.new("RGB", (3000, 1500)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png").size == (1024, 512)
