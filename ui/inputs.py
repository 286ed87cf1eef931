"""The image + question picker shared by the Token maps and Compare pages: a record of the chosen data
(the sidebar's data picker) or an uploaded image, and a question. Bad input (a non-image, a corrupt or
huge file, an empty question) becomes one line on the page; the page stops there."""
from __future__ import annotations

import streamlit as st
from PIL import Image

from compression.data.images import load_image
from ui import common

UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif"]


def image_and_question(key: str) -> tuple[Image.Image, str, str | None]:
    """``(image, question, expected answer or None)`` chosen on the page."""
    left, right = st.columns([1, 2])
    with left:
        source = common.data_source("eval", required=False)
        origins = (["A record of the data"] if source is not None else []) + ["Upload"]
        origin = st.radio("Image", origins, horizontal=True, key=f"{key}_origin")
        if origin == "Upload":
            upload = st.file_uploader("PNG or JPEG", type=UPLOAD_TYPES, key=f"{key}_upload")
            if upload is None:
                st.info("Upload an image to continue" + (", or pick a record of the data." if source else "."))
                st.stop()
            with common.shown_as_message():
                image = load_image(upload)
            default_question, expected = "What is in the image?", None
        else:
            index = st.number_input(f"Record of {source.label}", 0, len(source) - 1, 0, key=f"{key}_index")
            with common.shown_as_message():
                record = source.record(int(index))
            if not record.images:
                st.info(f"Record {record.index} is text-only; pick a record with an image.")
                st.stop()
            image, default_question, expected = record.images[0], record.question, record.answer
        st.image(image.resize((192, 192), Image.Resampling.NEAREST) if max(image.size) <= 128 else image,
                 caption=f"{image.width}x{image.height}", width=192)
    with right:
        question = st.text_input("Question", value=default_question, key=f"{key}_question_{default_question}")
        if expected:
            st.caption(f"Expected answer: **{expected}**")
        if not question.strip():
            st.error("The question is empty; expected a question about the image.")
            st.stop()
    return image, question, expected


def png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
