"""AppTest of the Token maps page, bad inputs included: non-image and corrupt uploads, a huge image,
an empty question — each a one-line message, never a traceback."""
import io

import pytest
from PIL import Image

from tests.app_support import app, tiny_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return tiny_folder(tmp_path_factory.mktemp("tokens"))


def png(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(at, name: str, content: bytes, mime: str = "image/png"):
    at.radio(key="tokens_origin").set_value("Upload").run()
    at.file_uploader(key="tokens_upload").upload(name, content, mime).run()
    return at


def test_sample_maps_and_survivors(tiny):
    at = app(tiny, "token_maps", tokens_keep=0.5)
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 7  # four score maps, three survivor maps
    assert any("4 visual tokens (2x2) at the projector output" in c.value for c in at.caption)
    titles = " ".join(str(c.proto) for c in at.get("plotly_chart"))
    assert titles.count("2 of 4 kept") == 3  # keep ratio 0.5 of 4 tokens, under each scorer


def test_similarity_and_decoder_layer_scores(tiny):
    at = app(tiny, "token_maps")
    at.radio(key="tokens_semantic").set_value("similarity").run()
    at.selectbox(key="tokens_where").set_value("decoder layer 3").run()
    assert not at.exception and not at.error
    assert any("input of decoder layer 3" in c.value for c in at.caption)


def test_uploaded_image_is_scored(tiny):
    at = upload(app(tiny, "token_maps"), "red.png", png(120, 80))
    assert not at.exception and not at.error
    assert not any(c.value.startswith("Expected answer") for c in at.caption)  # an upload has no known answer
    assert len(at.get("plotly_chart")) == 7


@pytest.mark.parametrize("name, content, expected", [
    ("notes.png", b"this is not an image at all", "is not a readable image"),
    ("broken.png", png(64, 64)[:60], "is not a readable image"),
    ("huge.png", png(5000, 4000), "expected at most 16,777,216 pixels"),
])
def test_bad_uploads_are_one_line_messages(tiny, name, content, expected):
    at = upload(app(tiny, "token_maps"), name, content)
    assert not at.exception
    assert len(at.error) == 1 and expected in at.error[0].value and "\n" not in at.error[0].value
    assert not at.get("plotly_chart")


def test_large_image_is_downscaled_not_refused(tiny):
    at = upload(app(tiny, "token_maps"), "big.png", png(3000, 2000))
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 7


def test_empty_question_is_a_message(tiny):
    at = app(tiny, "token_maps")
    [question] = [t for t in at.text_input if t.label == "Question"]
    question.input("   ").run()
    assert not at.exception
    assert at.error[0].value == "The question is empty; expected a question about the image."
    assert not at.get("plotly_chart")
